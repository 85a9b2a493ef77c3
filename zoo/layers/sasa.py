"""Local (neighbourhood) self-attention layers of the SASA family (spec ``shared/specs/sasa.md``).

* :class:`RelativeSelfAttention` — the fastai notebook module (spec §3), same constructor and
  state_dict keys (``qx.0.weight`` ... ``row_embeddings``, ``col_embeddings``).
* :class:`AttentionConv`, :class:`AttentionStem` — drop-ins for the most-used public PyTorch
  implementation (leaderj1001, spec §4, §6), same constructor and keys.
* :class:`SASAttention2d` — the paper's layer (spec §1): per-head attention over the k x k window,
  row/column relative embeddings, out-of-image positions masked out of the softmax, strides by a
  2x2 average pool after the attention.
* :class:`SASAttentionStem` — the paper's spatially-aware attention stem (spec §2).

Every neighbourhood layer computes its 1x1 projections and calls one op,
:func:`zoo.ops.neighborhood_attention`. Layers differ only in how they lay out heads, the relative
table and the padding.

Backends (:mod:`zoo.ops.backend`; the four neighbourhood layers, not the stem): ``backend="auto"``
(constructor argument, kept as the ``backend`` attribute) runs the native neighbourhood kernel where
it builds (``ops/neighborhood_attn/``), else the unfold reference; on CUDA, for windows of 5 x 5 and more,
FlexAttention with a 2-D block mask (:func:`zoo.ops.neighborhood_attn.flex_supported`); ``"native"``
demands the kernel; ``"flex"`` FlexAttention (not :class:`AttentionStem`, whose values are mixtures;
CPU: inference only); ``"reference"`` is the unfold formulation. ``forward(x, backend=None)``
overrides it for one call.

``bug_compatible`` (all three drop-in layers): the default is correct behaviour; ``True`` reproduces
the original's defects exactly, which is what weights trained with them need:

* notebook: every group adds the *last* group's embedding slice (row offsets never used);
* leaderj1001: softmax per channel instead of per head (``groups`` has no effect), and ``stride > 1``
  is refused as the original crashes on it.

Padding semantics are the originals' in both modes (zero padding inside the softmax); masking lives
in :class:`SASAttention2d`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from zoo.errors import ConfigError, InputError
from zoo.ops.backend import NEIGHBORHOOD_BACKENDS, check_backend
from zoo.ops.neighborhood_attn import neighborhood_attention

__all__ = ["RelativeSelfAttention", "AttentionConv", "AttentionStem", "SASAttention2d", "SASAttentionStem"]


def _heads_last(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, G*D, H, W) -> (B, G, H, W, D), the op's layout."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).permute(0, 1, 3, 4, 2)


def _channels_first(y: torch.Tensor) -> torch.Tensor:
    """(B, G, H, W, D) -> (B, G*D, H, W)."""
    b, g, h, w, d = y.shape
    return y.permute(0, 1, 4, 2, 3).reshape(b, g * d, h, w)


def _row_col_table(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Layout (b) of spec §1: rows (C/2, kh), cols (C/2, kw) -> E (C, kh*kw).

    E[c, a*kw + b] = rows[c, a] for c < C/2 and cols[c - C/2, b] for c >= C/2.
    """
    half, kh = rows.shape
    kw = cols.shape[1]
    top = rows[:, :, None].expand(half, kh, kw)
    bottom = cols[:, None, :].expand(half, kh, kw)
    return torch.cat([top, bottom], 0).reshape(2 * half, kh * kw)


def _check_input(x: torch.Tensor, channels: int, layer: str) -> None:
    if x.dim() != 4 or x.shape[1] != channels:
        raise InputError(f"{layer} expects input (B, {channels}, H, W), got {tuple(x.shape)}")


# ------------------------------------------------------------------------------------------------
# fastai notebook
# ------------------------------------------------------------------------------------------------

class _Conv1x1(nn.Sequential):
    """fastai2 ``ConvLayer(ni, nf, ks=1, norm_type=None, act_cls=None)``: a biased 1x1 conv at index 0."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 1, bias=True))
        nn.init.normal_(self[0].bias, 0.0, 0.01)  # fastai2 (mid-2020) draws conv biases N(0, 0.01)


class RelativeSelfAttention(nn.Module):
    """The fastai notebook's local self-attention (spec §3).

    Args:
        d_in, d_out: channels in/out; ``d_out`` even and divisible by ``groups``.
        ks: window size (the notebook uses odd sizes; even sizes work here, offsets -p..ks-1-p).
        groups: heads; head g owns channels g*d .. g*d+d-1, d = d_out / groups.
        stride: queries at (s*i, s*j), output (ceil(H/s), ceil(W/s)).
        bug_compatible: False (default): head g adds its own slice of the relative table
            E (d_out, ks, ks) (rows for the first d_out/2 channels, columns for the rest).
            True: every head adds the LAST head's slice, exactly as the notebook does
            (``row_embeddings`` then gets no gradient for groups >= 2).

    Keys, values and queries are biased 1x1 convs of the unpadded input; keys and values are then
    zero-padded (after the conv), and padded slots stay in the softmax (logit q.r, value 0).
    No 1/sqrt(d) temperature, no output projection.

    Shapes: x (B, d_in, H, W) -> (B, d_out, ceil(H/stride), ceil(W/stride)).
    Backends: ``"auto"``, ``"native"``, ``"reference"`` (module docstring).
    """

    def __init__(self, d_in: int, d_out: int, ks: int, groups: int, stride: int = 1, bug_compatible: bool = False,
                 *, backend: str = "auto"):
        super().__init__()
        if d_out % groups or d_out % 2:
            raise ConfigError(f"d_out={d_out} must be even and divisible by groups={groups}")
        if ks < 1 or stride < 1:
            raise ConfigError(f"ks and stride must be >= 1, got ks={ks}, stride={stride}")
        self.d_in, self.d_out, self.ks, self.groups, self.stride = d_in, d_out, ks, groups, stride
        self.bug_compatible = bug_compatible
        self.backend = check_backend(backend, NEIGHBORHOOD_BACKENDS, "RelativeSelfAttention backend")
        self.qx = _Conv1x1(d_in, d_out)
        self.kx = _Conv1x1(d_in, d_out)
        self.vx = _Conv1x1(d_in, d_out)
        self.row_embeddings = nn.Parameter(torch.randn(d_out // 2, ks))
        self.col_embeddings = nn.Parameter(torch.randn(d_out // 2, ks))

    def relative_table(self) -> torch.Tensor:
        """(groups, ks*ks, d): the relative key term each head adds."""
        g, d, kk = self.groups, self.d_out // self.groups, self.ks * self.ks
        table = _row_col_table(self.row_embeddings, self.col_embeddings).view(g, d, kk)
        if self.bug_compatible:
            table = table[-1:].expand(g, d, kk)
        return table.transpose(1, 2)

    def forward(self, x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        _check_input(x, self.d_in, type(self).__name__)
        s, p = self.stride, (self.ks - 1) // 2
        q = self.qx(x[:, :, ::s, ::s])  # a 1x1 conv commutes with subsampling
        # zero padding AFTER the conv: padded keys/values are 0 even though the convs have a bias
        pad = (p, self.ks - 1 - p, p, self.ks - 1 - p)
        k, v = F.pad(self.kx(x), pad), F.pad(self.vx(x), pad)
        g = self.groups
        out = neighborhood_attention(_heads_last(q, g), _heads_last(k, g), _heads_last(v, g), self.relative_table(),
                                     kernel_size=self.ks, stride=s, offset=0,
                                     backend=self.backend if backend is None else backend)
        return _channels_first(out)

    def extra_repr(self) -> str:
        return (f"{self.d_in}, {self.d_out}, ks={self.ks}, groups={self.groups}, stride={self.stride}, "
                f"bug_compatible={self.bug_compatible}")


# ------------------------------------------------------------------------------------------------
# leaderj1001
# ------------------------------------------------------------------------------------------------

def _leader_geometry(layer: nn.Module) -> None:
    """Constructor checks shared by AttentionConv/AttentionStem (queries at s*i, windows from row s*i - padding)."""
    k, s, p = layer.kernel_size, layer.stride, layer.padding
    if 2 * p < k - 1:
        raise ConfigError(
            f"{type(layer).__name__}: padding={p} is too small for kernel_size={k} (need padding >= {k // 2}); "
            "the original fails on this configuration too")
    if layer.bug_compatible and s != 1:
        raise ConfigError(f"{type(layer).__name__}(bug_compatible=True): stride={s} is not supported by the original "
                          "(it crashes); use bug_compatible=False for strided attention")


class AttentionConv(nn.Module):
    """leaderj1001 ``AttentionConv`` (spec §4): same constructor, same state_dict keys and init.

    Shapes: x (B, in_channels, H, W) -> (B, out_channels, ceil(H/stride), ceil(W/stride)).

    Query (i, j) sits at input (s*i, s*j); its k x k window covers input rows s*i - padding ...
    s*i - padding + k - 1 (the original's window at stride 1, which needs padding >= (k-1)/2).
    x is zero-padded BEFORE the 1x1 key/value convs, so padded keys/values equal the conv bias
    (0 with bias=False) and take part in the softmax. ``rel_h`` is added to the keys of the first
    out_channels/2 channels, ``rel_w`` to the last out_channels/2 (layout (b), spec §1).

    bug_compatible=False (default): one softmax per head of out_channels/groups channels, logits
    summed over the head's channels; any stride. True: the original's per-channel softmax
    (``groups`` has no effect) and stride 1 only.

    Backends: ``"auto"``, ``"native"``, ``"reference"`` (module docstring).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 groups: int = 1, bias: bool = False, bug_compatible: bool = False, *, backend: str = "auto"):
        super().__init__()
        if out_channels % groups or out_channels % 2:
            raise ConfigError(f"out_channels={out_channels} must be even and divisible by groups={groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.groups = kernel_size, stride, padding, groups
        self.bug_compatible = bug_compatible
        self.backend = check_backend(backend, NEIGHBORHOOD_BACKENDS, "AttentionConv backend")
        _leader_geometry(self)
        self.rel_h = nn.Parameter(torch.randn(out_channels // 2, 1, 1, kernel_size, 1))
        self.rel_w = nn.Parameter(torch.randn(out_channels // 2, 1, 1, 1, kernel_size))
        self.key_conv = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.query_conv = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.value_conv = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        for conv in (self.key_conv, self.query_conv, self.value_conv):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def relative_table(self) -> torch.Tensor:
        """(heads, k*k, d) with heads = out_channels (bug_compatible) or groups."""
        k = self.kernel_size
        table = _row_col_table(self.rel_h.reshape(-1, k), self.rel_w.reshape(-1, k))  # (C, k*k)
        heads = self.out_channels if self.bug_compatible else self.groups
        return table.view(heads, self.out_channels // heads, k * k).transpose(1, 2)

    def forward(self, x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        _check_input(x, self.in_channels, type(self).__name__)
        s, p = self.stride, self.padding
        q = self.query_conv(x[:, :, ::s, ::s])
        xp = F.pad(x, (p, p, p, p))  # padding BEFORE the convs: padded keys/values = bias
        k, v = self.key_conv(xp), self.value_conv(xp)
        heads = self.out_channels if self.bug_compatible else self.groups
        out = neighborhood_attention(_heads_last(q, heads), _heads_last(k, heads), _heads_last(v, heads),
                                     self.relative_table(), kernel_size=self.kernel_size, stride=s, offset=0,
                                     backend=self.backend if backend is None else backend)
        return _channels_first(out)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bug_compatible={self.bug_compatible}")


class AttentionStem(nn.Module):
    """leaderj1001 ``AttentionStem`` (spec §6): same constructor, same state_dict keys and init.

    Shapes: x (B, in_channels, H, W) -> (B, out_channels, ceil(H/stride), ceil(W/stride)).

    Window geometry and padding as :class:`AttentionConv` (with the CIFAR stem's k=4, padding=2 the
    window covers offsets -2..+1). The value at window slot (a, b) is a mixture of ``m`` value maps,
    sum_m p[m, a, b] v^m, p = softmax over m of emb_mix[m] . (emb_a[:, a] + emb_b[:, b]), one p for all
    channels. Logits are q.k only (no relative term).

    bug_compatible as :class:`AttentionConv`: True = per-channel softmax, stride 1 only.
    Backends: ``"auto"``, ``"native"``, ``"reference"`` (module docstring).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 groups: int = 1, m: int = 4, bias: bool = False, bug_compatible: bool = False, *,
                 backend: str = "auto"):
        super().__init__()
        if out_channels % groups:
            raise ConfigError(f"out_channels={out_channels} must be divisible by groups={groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.groups, self.m = kernel_size, stride, padding, groups, m
        self.bug_compatible = bug_compatible
        self.backend = check_backend(backend, what="AttentionStem backend")
        _leader_geometry(self)
        self.emb_a = nn.Parameter(torch.randn(out_channels // groups, kernel_size))
        self.emb_b = nn.Parameter(torch.randn(out_channels // groups, kernel_size))
        self.emb_mix = nn.Parameter(torch.randn(m, out_channels // groups))
        self.key_conv = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.query_conv = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.value_conv = nn.ModuleList(nn.Conv2d(in_channels, out_channels, 1, bias=bias) for _ in range(m))
        for conv in (self.key_conv, self.query_conv, *self.value_conv):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def mixture(self) -> torch.Tensor:
        """(m, k*k): weight of value map m at window slot a*k + b."""
        logits = (self.emb_mix @ self.emb_a)[:, :, None] + (self.emb_mix @ self.emb_b)[:, None, :]  # (m, k, k)
        return torch.softmax(logits, dim=0).reshape(self.m, -1)

    def forward(self, x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        _check_input(x, self.in_channels, type(self).__name__)
        s, p = self.stride, self.padding
        heads = self.out_channels if self.bug_compatible else self.groups
        q = _heads_last(self.query_conv(x[:, :, ::s, ::s]), heads)
        xp = F.pad(x, (p, p, p, p))
        k = _heads_last(self.key_conv(xp), heads)
        v = torch.stack([_heads_last(conv(xp), heads) for conv in self.value_conv], dim=4)  # (B, G, H, W, m, d)
        out = neighborhood_attention(q, k, v, None, self.mixture(), kernel_size=self.kernel_size, stride=s,
                                     offset=0, backend=self.backend if backend is None else backend)
        return _channels_first(out)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, m={self.m}, bug_compatible={self.bug_compatible}")


# ------------------------------------------------------------------------------------------------
# the paper's layers
# ------------------------------------------------------------------------------------------------

_PADDING_MODES = {"mask": "mask", "masked": "mask", "zeros": "zeros", "zeros_in_softmax": "zeros"}


class SASAttention2d(nn.Module):
    """The paper's local self-attention layer (spec §1, §5), with a fast native kernel.

    Args:
        in_channels, out_channels: ``out_channels`` divisible by ``heads``, head width even.
        kernel_size: spatial extent k (window offsets -(k-1)//2 .. k//2).
        stride: 1, or s > 1: attention at stride 1 followed by an s x s average pool with stride s
            (the paper's 2x2 pool for downsampling), output ceil(H/s) x ceil(W/s).
        heads: N; each head has its own d = out_channels / N channels of one q/k/v 1x1 projection.
        padding_mode: ``'mask'`` (default): only pixels inside the image take part in the softmax
            (the literal reading of the paper's N_k(i, j)); ``'zeros'``: keys/values are zero-padded
            after the projections and padded slots stay in the softmax, as public unfold code does.
        bias: bias of the q/k/v projections (the paper mentions none).

    Relative embedding per head (reading (a) of spec §1): the first d/2 channels of head n see
    ``rel_row[n*d/2 : (n+1)*d/2, a]`` for row offset a, the last d/2 see ``rel_col[..., b]``;
    logit = q . (k + r), no temperature, softmax over the window, weighted sum of the values.

    Parameters: 3 * in * out (+ bias) + out * k. Shapes: (B, in, H, W) -> (B, out, ceil(H/s), ceil(W/s)).
    Backends: ``"auto"``, ``"native"``, ``"reference"`` (module docstring).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 7, stride: int = 1, heads: int = 8,
                 padding_mode: str = "mask", bias: bool = False, *, backend: str = "auto"):
        super().__init__()
        if out_channels % heads or (out_channels // heads) % 2:
            raise ConfigError(f"out_channels={out_channels} must split into heads={heads} of even width")
        if padding_mode not in _PADDING_MODES:
            raise ConfigError(f"padding_mode must be one of {sorted(_PADDING_MODES)}, got {padding_mode!r}")
        if kernel_size < 1 or stride < 1:
            raise ConfigError(f"kernel_size and stride must be >= 1, got {kernel_size}, {stride}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.heads, self.padding_mode = stride, heads, _PADDING_MODES[padding_mode]
        self.backend = check_backend(backend, NEIGHBORHOOD_BACKENDS, "SASAttention2d backend")
        self.query = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.key = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.value = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        d = out_channels // heads
        self.rel_row = nn.Parameter(torch.randn(out_channels // 2, kernel_size) * d ** -0.5)
        self.rel_col = nn.Parameter(torch.randn(out_channels // 2, kernel_size) * d ** -0.5)
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else None

    def relative_table(self) -> torch.Tensor:
        """(heads, k*k, d): head n, slot a*k + b -> concat(rel_row[n-th slice, a], rel_col[n-th slice, b])."""
        n, k, half = self.heads, self.kernel_size, self.out_channels // self.heads // 2
        rows = self.rel_row.view(n, half, k, 1).expand(n, half, k, k)
        cols = self.rel_col.view(n, half, 1, k).expand(n, half, k, k)
        return torch.cat([rows, cols], 1).reshape(n, 2 * half, k * k).transpose(1, 2)

    def forward(self, x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        _check_input(x, self.in_channels, type(self).__name__)
        k, p = self.kernel_size, (self.kernel_size - 1) // 2
        q, key, v = self.query(x), self.key(x), self.value(x)
        if self.padding_mode == "zeros":
            pad = (p, k - 1 - p, p, k - 1 - p)
            key, v, offset = F.pad(key, pad), F.pad(v, pad), 0
        else:
            offset = -p  # windows reach outside the image; the op masks those slots
        n = self.heads
        out = neighborhood_attention(_heads_last(q, n), _heads_last(key, n), _heads_last(v, n), self.relative_table(),
                                     kernel_size=k, stride=1, offset=offset,
                                     backend=self.backend if backend is None else backend)
        out = _channels_first(out)
        return self.pool(out) if self.pool is not None else out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"heads={self.heads}, padding_mode={self.padding_mode!r}")


class SASAttentionStem(nn.Module):
    """The paper's spatially-aware attention stem layer (spec §2), before its BN and 4x4 max pool.

    Self-attention inside each non-overlapping ``block x block`` tile of the image (the max-pool
    window that follows), ``heads`` heads, logits q.k (no temperature). Values are spatially
    aware: v(i, j) = sum_m p[m, i % block, j % block] W_V^m x(i, j), with
    p = softmax over m of emb_mix[m] . (emb_row[:, i % block] + emb_col[:, j % block]), one p shared
    by all heads. The number of mixtures is not stated in the paper (spec §2); 4 as the public code.

    Shapes: (B, in, H, W) -> (B, out, H, W). H, W not divisible by ``block`` are zero-padded to
    whole tiles and padded pixels are masked out of the softmax. One implementation (dense attention
    within each tile), so no ``backend``.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 64, block: int = 4, heads: int = 4,
                 mixtures: int = 4, bias: bool = False):
        super().__init__()
        if out_channels % heads:
            raise ConfigError(f"out_channels={out_channels} must be divisible by heads={heads}")
        self.in_channels, self.out_channels, self.block, self.heads, self.mixtures = \
            in_channels, out_channels, block, heads, mixtures
        self.query = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.key = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.value = nn.Conv2d(in_channels, out_channels * mixtures, 1, bias=bias)  # the m value maps stacked
        emb = out_channels // heads
        self.emb_row = nn.Parameter(torch.randn(emb, block))
        self.emb_col = nn.Parameter(torch.randn(emb, block))
        self.emb_mix = nn.Parameter(torch.randn(mixtures, emb))

    def mixture(self) -> torch.Tensor:
        """(m, block, block): weight of value map m at position (i % block, j % block)."""
        logits = (self.emb_mix @ self.emb_row)[:, :, None] + (self.emb_mix @ self.emb_col)[:, None, :]
        return torch.softmax(logits, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_channels, type(self).__name__)
        b, _, h, w = x.shape
        t, n, m, c = self.block, self.heads, self.mixtures, self.out_channels
        hp, wp = math.ceil(h / t) * t, math.ceil(w / t) * t
        x = F.pad(x, (0, wp - w, 0, hp - h))
        mix = self.mixture().repeat(1, hp // t, wp // t)  # (m, hp, wp): tiles the in-block pattern
        v = (self.value(x).view(b, m, c, hp, wp) * mix[None, :, None]).sum(1)

        def tiles(z):  # (B, C, hp, wp) -> (B, heads, tiles, t*t, d)
            z = z.view(b, n, c // n, hp // t, t, wp // t, t)
            return z.permute(0, 1, 3, 5, 4, 6, 2).reshape(b, n, (hp // t) * (wp // t), t * t, c // n)

        logits = tiles(self.query(x)) @ tiles(self.key(x)).transpose(-1, -2)  # (B, n, tiles, t*t, t*t)
        if (hp, wp) != (h, w):  # keys in the zero padding are not pixels: mask them
            inside = F.pad(x.new_ones(h, w), (0, wp - w, 0, hp - h)) > 0.5
            inside = inside.view(hp // t, t, wp // t, t).permute(0, 2, 1, 3).reshape(-1, t * t)  # (tiles, t*t)
            logits = logits.masked_fill(~inside[:, None, :], float("-inf"))
        out = torch.softmax(logits, dim=-1) @ tiles(v)  # (B, n, tiles, t*t, d)
        out = out.view(b, n, hp // t, wp // t, t, t, c // n).permute(0, 1, 6, 2, 4, 3, 5).reshape(b, c, hp, wp)
        return out[:, :, :h, :w]

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, block={self.block}, heads={self.heads}, "
                f"mixtures={self.mixtures}")
