"""Neighbourhood attention: the one op behind every SASA layer.

Layout ("heads last", so one head's channels are contiguous for the kernels)::

    q    (B, G, Hq, Wq, D)        queries on the output grid
    k    (B, G, Hk, Wk, D)        keys on the key grid
    v    (B, G, Hk, Wk, Dv)       values, or (B, G, Hk, Wk, M, Dv) together with ``mix``
    rel  (G, K, D) or None        relative key term, K = kh * kw window slots
    mix  (M, K) or None           value mixture weights per window slot (SASA attention stem)
    out  (B, G, Hq, Wq, Dv)

For query ``(i, j)`` the window holds key positions ``(sh*i + oh + a, sw*j + ow + b)`` for
``a < kh, b < kw``; slot ``t = a*kw + b`` (row-major). Slots that fall outside the key grid are
excluded from the softmax (masked). Zero padding *inside* the softmax is obtained by the caller
padding ``k``/``v`` and passing a non-negative offset, so all slots are in range.

    logit_t = sum_d q_d * (k_d(t) + rel[g, t, d])       (no 1/sqrt(D) temperature, as in SASA)
    p       = softmax over the in-range slots
    out_e   = sum_t p_t * v_e(t)                        (mix: v_e(t) = sum_m mix[m, t] * v[.., m, e])

Two implementations of one definition:

* :func:`neighborhood_attention_reference` — the unfold formulation (every window materialised,
  ``K`` copies of ``k`` and ``v``); readable, autograd does the backward. It *is* the definition.
* the native op ``torch.ops.relzoo.neighborhood_attn`` (+ ``_backward``) (``ops/neighborhood_attn/``,
  C++/OpenMP and CUDA), which keeps only the ``(B, G, Hq, Wq, K)`` probabilities for backward.

and a third path for GPUs: FlexAttention (``"flex"``) over the flattened grids with a 2-D neighbourhood
block mask (only blocks of 128 x 128 (query, key) pairs that hold window slots are computed) and the
relative term as a ``score_mod`` reading ``q . rel`` per slot. It needs a head width of at least 16
and has no value mixture (``mix``); on CPU it runs forward only.

:func:`neighborhood_attention` chooses between them with the ``backend`` switch
(:mod:`zoo.ops.backend`, :data:`~zoo.ops.backend.NEIGHBORHOOD_BACKENDS`).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from zoo.errors import ConfigError, InputError, InputTypeError, OpsError
from zoo.ops.backend import NEIGHBORHOOD_BACKENDS, check_backend, resolve
from zoo.ops.build import on_load, use_native
from zoo.ops.relative_attn import compiled_flex_attention, flex_available

__all__ = ["neighborhood_attention", "neighborhood_attention_reference", "OP_NAME"]

OP_NAME = "neighborhood_attn"
_FWD = "relzoo::neighborhood_attn"
_BWD = "relzoo::neighborhood_attn_backward"


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(x) for x in value)
    if len(value) != 2:
        raise ConfigError(f"{name} must be an int or a pair of ints, got {value!r}")
    return value  # type: ignore[return-value]


def _check(q, k, v, rel, mix, kernel_size, stride):
    """Validate shapes/dtypes; returns (kh, kw, sh, sw, M)."""
    kh, kw = kernel_size
    sh, sw = stride
    if kh < 1 or kw < 1 or sh < 1 or sw < 1:
        raise InputError(f"kernel_size and stride must be >= 1, got kernel_size={kernel_size}, stride={stride}")
    if q.dim() != 5 or k.dim() != 5:
        raise InputError(f"q and k must be (B, G, H, W, D), got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise InputError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or head width")
    if mix is None:
        if v.dim() != 5 or v.shape[:4] != k.shape[:4]:
            raise InputError(f"v must be (B, G, Hk, Wk, Dv) matching k {tuple(k.shape)}, got {tuple(v.shape)}")
        m = 1
    else:
        m = mix.shape[0]
        if mix.dim() != 2 or mix.shape[1] != kh * kw:
            raise InputError(f"mix must be (M, kh*kw) = (M, {kh * kw}), got {tuple(mix.shape)}")
        if v.dim() != 6 or v.shape[:4] != k.shape[:4] or v.shape[4] != m:
            raise InputError(f"with mix, v must be (B, G, Hk, Wk, M={m}, Dv) matching k, got {tuple(v.shape)}")
    if rel is not None and tuple(rel.shape) != (q.shape[1], kh * kw, q.shape[-1]):
        raise InputError(f"rel must be (G, kh*kw, D) = {(q.shape[1], kh * kw, q.shape[-1])}, got {tuple(rel.shape)}")
    tensors = [t for t in (q, k, v, rel, mix) if t is not None]
    if not all(t.is_floating_point() for t in tensors) or len({t.dtype for t in tensors}) != 1:
        raise InputTypeError(f"neighborhood attention needs one floating dtype, got {[t.dtype for t in tensors]}")
    if len({t.device for t in tensors}) != 1:
        raise InputError(f"all inputs must be on one device, got {[str(t.device) for t in tensors]}")
    return kh, kw, sh, sw, m


# ----------------------------------------------------------------------------------------------
# reference: unfold formulation
# ----------------------------------------------------------------------------------------------

def _windows(x: torch.Tensor, hq: int, wq: int, kernel, stride, offset):
    """Gather every window: x (N, C, H, W) -> (N, C, K, hq, wq) plus a validity mask (K, hq, wq).

    Positions outside ``x`` read as 0 and are marked invalid in the mask.
    """
    (kh, kw), (sh, sw), (oh, ow) = kernel, stride, offset
    n, c, h, w = x.shape
    # pad so that every window lies inside, then start the grid at the first window's corner
    top, left = max(0, -oh), max(0, -ow)
    bottom = max(0, sh * (hq - 1) + oh + kh - h)
    right = max(0, sw * (wq - 1) + ow + kw - w)
    ones = torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device)
    xp = F.pad(x, (left, right, top, bottom))[:, :, oh + top:, ow + left:]
    mp = F.pad(ones, (left, right, top, bottom))[:, :, oh + top:, ow + left:]
    cols = F.unfold(xp, (kh, kw), stride=(sh, sw))  # (N, C*K, L) with L >= hq*wq windows
    nh = (xp.shape[2] - kh) // sh + 1
    nw = (xp.shape[3] - kw) // sw + 1
    cols = cols.view(n, c, kh * kw, nh, nw)[:, :, :, :hq, :wq]
    mask = F.unfold(mp, (kh, kw), stride=(sh, sw)).view(kh * kw, nh, nw)[:, :hq, :wq] > 0.5
    return cols, mask


def _has_empty_window(hq: int, wq: int, hk: int, wk: int, kernel, stride, offset) -> bool:
    """Whether some query's window lies entirely outside the (Hk, Wk) key grid."""
    def axis_empty(nq, nk, k, s, o):
        return any(s * i + o + k - 1 < 0 or s * i + o >= nk for i in range(nq))
    return axis_empty(hq, hk, kernel[0], stride[0], offset[0]) or axis_empty(wq, wk, kernel[1], stride[1], offset[1])


def _autocast(tensors):
    """The inputs in torch.autocast's dtype when autocast is on for their device (the layers' float32
    parameters ``rel`` / ``mix`` meet activations in bfloat16 / float16 there), as autocast runs matmuls;
    otherwise unchanged."""
    device = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]


def neighborhood_attention_reference(q, k, v, rel=None, mix=None, *, kernel_size, stride=1, offset=0):
    """Unfold formulation of the op (see module docstring for shapes and semantics)."""
    kernel, stride, offset = _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), _pair(offset, "offset")
    kh, kw, _, _, m = _check(q, k, v, rel, mix, kernel, stride)
    b, g, hq, wq, d = q.shape
    hk, wk = k.shape[2:4]
    K = kh * kw
    # (B*G, D, Hk, Wk) -> windows (B*G, D, K, Hq, Wq)
    kwin, valid = _windows(k.permute(0, 1, 4, 2, 3).reshape(b * g, d, hk, wk), hq, wq, kernel, stride, offset)
    kwin = kwin.view(b, g, d, K, hq, wq)
    if rel is not None:
        kwin = kwin + rel.permute(0, 2, 1).reshape(1, g, d, K, 1, 1)
    logits = torch.einsum("bgijd,bgdtij->bgijt", q, kwin)
    logits = logits.masked_fill(~valid.permute(1, 2, 0), float("-inf"))
    # a query whose window is entirely outside gets all -inf: give it zero weights, not NaN (decided from
    # the geometry, not from the mask's values, so torch.export sees no data-dependent branch)
    empty = ~valid.any(0)  # (Hq, Wq)
    has_empty = _has_empty_window(hq, wq, hk, wk, kernel, stride, offset)
    if has_empty:
        logits = logits.masked_fill(empty[..., None], 0.0)
    probs = torch.softmax(logits, dim=-1)
    if has_empty:
        probs = probs.masked_fill(empty[..., None], 0.0)
    dv = v.shape[-1]
    vflat = v.reshape(b, g, hk, wk, m * dv).permute(0, 1, 4, 2, 3).reshape(b * g, m * dv, hk, wk)
    vwin, _ = _windows(vflat, hq, wq, kernel, stride, offset)
    vwin = vwin.view(b, g, m, dv, K, hq, wq)
    if mix is None:
        return torch.einsum("bgijt,bgetij->bgije", probs, vwin[:, :, 0])
    return torch.einsum("bgijt,mt,bgmetij->bgije", probs, mix, vwin)


# ----------------------------------------------------------------------------------------------
# native op: autograd + fake registration on the C++ schema
# ----------------------------------------------------------------------------------------------

@on_load(OP_NAME)
def _register_native() -> None:
    """Fake (meta) kernels for torch.compile and autograd for the C++-defined ops; run once on load."""

    @torch.library.register_fake(_FWD)
    def _fwd_fake(q, k, v, rel, mix, kernel_size, stride, offset):
        b, g, hq, wq, _ = q.shape
        return q.new_empty((b, g, hq, wq, v.shape[-1])), q.new_empty((b, g, hq, wq, kernel_size[0] * kernel_size[1]))

    @torch.library.register_fake(_BWD)
    def _bwd_fake(grad_out, q, k, v, rel, mix, probs, kernel_size, stride, offset):
        drel = rel.new_empty(rel.shape) if rel is not None else q.new_empty((0,))
        dmix = mix.new_empty(mix.shape) if mix is not None else q.new_empty((0,))
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), drel, dmix

    def setup_context(ctx, inputs, output):
        q, k, v, rel, mix, kernel_size, stride, offset = inputs
        ctx.save_for_backward(q, k, v, rel, mix, output[1])
        ctx.geometry = (kernel_size, stride, offset)

    def backward(ctx, grad_out, _grad_probs):
        # probs is an auxiliary output saved for backward; its gradient is not supported (always None here)
        q, k, v, rel, mix, probs = ctx.saved_tensors
        dq, dk, dv, drel, dmix = torch.ops.relzoo.neighborhood_attn_backward(
            grad_out.contiguous(), q, k, v, rel, mix, probs, *ctx.geometry)
        return dq, dk, dv, (drel if rel is not None else None), (dmix if mix is not None else None), None, None, None

    torch.library.register_autograd(_FWD, backward, setup_context=setup_context)


# ----------------------------------------------------------------------------------------------
# FlexAttention: the window as a block mask, the relative term as a score_mod
# ----------------------------------------------------------------------------------------------

def flex_supported(q, mix) -> bool:
    """Whether the FlexAttention path can run this call: no value mixture, head width >= 16 (its
    kernels' smallest tile) and FlexAttention available on the device."""
    return mix is None and q.shape[-1] >= 16 and flex_available(q.device)


# Heuristic for backend="auto" on CUDA until a GPU run measures it (benchmarks/gpu.sh prints both paths):
# FlexAttention computes whole 128 x 128 blocks, so it pays off for large windows only.
_FLEX_MIN_SLOTS = 25


def _window_geometry(hq, wq, hk, wk, kernel, stride, offset):
    """(slot index, inside-window) of a flattened (query, key) pair, as functions of index tensors."""
    (kh, kw), (sh, sw), (oh, ow) = kernel, stride, offset

    def slot(qi, ki):
        a = ki // wk - (qi // wq) * sh - oh
        b = ki % wk - (qi % wq) * sw - ow
        return a, b

    def inside(qi, ki):
        a, b = slot(qi, ki)
        return (a >= 0) & (a < kh) & (b >= 0) & (b < kw)

    return slot, inside


@lru_cache(maxsize=32)
def _block_mask(hq, wq, hk, wk, kernel, stride, offset, device):
    from torch.nn.attention.flex_attention import create_block_mask

    _, inside = _window_geometry(hq, wq, hk, wk, kernel, stride, offset)
    return create_block_mask(lambda b, h, qi, ki: inside(qi, ki), None, None, hq * wq, hk * wk, device=device)


def _flex(q, k, v, rel, mix, kernel, stride, offset):
    if mix is not None:
        raise ConfigError("neighborhood attention backend 'flex' has no value mixture (the SASA stem's mix); "
                          "use 'auto', 'native' or 'reference'")
    if not flex_available(q.device):
        raise OpsError(f"neighborhood attention backend 'flex': FlexAttention is not available here "
                       f"(torch {torch.__version__})")
    if q.shape[-1] < 16:
        raise ConfigError(f"neighborhood attention backend 'flex' needs a head width >= 16, got {q.shape[-1]}")
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, rel)):
        raise ConfigError("neighborhood attention backend 'flex' on the CPU is inference only (FlexAttention has "
                          "no CPU backward); use 'auto' or 'native' for training, or run under torch.no_grad()")
    b, g, hq, wq, d = q.shape
    hk, wk, dv = k.shape[2], k.shape[3], v.shape[-1]
    kh, kw = kernel
    slot, inside = _window_geometry(hq, wq, hk, wk, kernel, stride, offset)
    score_mod = None
    if rel is not None:
        # q . rel per slot, (B, G, Lq, K): the relative term of every pair in the window
        q_rel = torch.einsum("bgijd,gtd->bgijt", q, rel.to(q.dtype)).reshape(b, g, hq * wq, kh * kw)

        def score_mod(score, bi, h, qi, ki):
            a, c = slot(qi, ki)
            index = (a.clamp(0, kh - 1) * kw + c.clamp(0, kw - 1))
            return score + torch.where(inside(qi, ki), q_rel[bi, h, qi, index], 0.0)

    out = compiled_flex_attention(q.device.type)(
        q.reshape(b, g, hq * wq, d), k.reshape(b, g, hk * wk, d), v.reshape(b, g, hk * wk, dv),
        score_mod=score_mod, block_mask=_block_mask(hq, wq, hk, wk, kernel, stride, offset, q.device), scale=1.0)
    return out.reshape(b, g, hq, wq, dv)


def neighborhood_attention(q, k, v, rel=None, mix=None, *, kernel_size, stride=1, offset=0,
                           backend: str = "auto") -> torch.Tensor:
    """Neighbourhood attention (module docstring for shapes and semantics).

    ``backend`` (:mod:`zoo.ops.backend`, :data:`~zoo.ops.backend.NEIGHBORHOOD_BACKENDS`): ``"auto"`` on CUDA
    FlexAttention for windows of at least 25 slots when :func:`flex_supported` (not yet measured against
    the CUDA kernel: ``benchmarks/gpu.sh``), else the native kernel when it builds and has one for the
    device (per ``RELZOO_OPS``), else the reference; ``"flex"``; ``"native"`` the kernel or an
    :class:`~zoo.errors.OpsError`; ``"reference"`` :func:`neighborhood_attention_reference`.
    The native kernels compute in float32/float64; half and bfloat16 inputs run in float32 and are
    cast back. Under ``torch.autocast`` every input runs in the autocast dtype (the layers' float32 ``rel`` /
    ``mix`` included). The native op has no double backward.
    """
    kernel, stride, offset = _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), _pair(offset, "offset")
    q, k, v, rel, mix = _autocast([q, k, v, rel, mix])
    _check(q, k, v, rel, mix, kernel, stride)
    check_backend(backend, NEIGHBORHOOD_BACKENDS)
    choice = resolve(backend, NEIGHBORHOOD_BACKENDS)
    if choice == "flex" or (choice == "auto" and q.device.type == "cuda" and kernel[0] * kernel[1] >= _FLEX_MIN_SLOTS
                            and flex_supported(q, mix)):
        return _flex(q, k, v, rel, mix, kernel, stride, offset)
    if not use_native(OP_NAME, "auto" if choice == "auto" else choice, q.device.type):
        return neighborhood_attention_reference(q, k, v, rel, mix, kernel_size=kernel, stride=stride, offset=offset)
    dtype = q.dtype
    compute = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    args = [t.to(compute).contiguous() if t is not None else None for t in (q, k, v, rel, mix)]
    out, _ = torch.ops.relzoo.neighborhood_attn(*args, list(kernel), list(stride), list(offset))
    return out.to(dtype)
