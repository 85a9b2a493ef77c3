"""Relation-Aware Global Attention (RGA), Zhang et al., CVPR 2020 (spec ``shared/specs/rga.md`` §1).

:class:`RGA_Module` is a drop-in for the original ``RGA_Module`` of
``microsoft/Relation-Aware-Global-Attention-Networks``: same constructor arguments, same
sub-module names and therefore the same ``state_dict`` keys (the original's checkpoints load
unchanged). Two differences, both harmless for a drop-in:

- the original constructor prints ``Use_Spatial_Att: ...; Use_Channel_Att: ...``; this one does not;
- two backends (:mod:`zoo.ops.backend`, no native op): ``backend="auto"`` (the default) computes the
  relation convolutions with the exact low-rank identity of spec §1.7 instead of materialising the
  ``N x N`` / ``C x C`` relation tensors (``benchmarks/rga.py``: ~20x less time and ~8x less memory
  for ``rga_att1``'s spatial relation); ``backend="reference"`` is the direct (original)
  formulation. Both give the same numbers. The older ``low_rank=True/False`` still works, with a
  DeprecationWarning.

The module only runs at the spatial size it was built for (``in_spatial == H * W``), as the
original, because ``in_spatial`` sets the widths of the channel-branch convolutions.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.errors import ConfigError, InputError
from zoo.ops.backend import PURE_TORCH, check_backend, from_deprecated, resolve

__all__ = ["RGA_Module", "relation_conv_direct", "relation_conv_low_rank"]


def _cbr(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv (no bias) -> BatchNorm2d -> ReLU; keys ``0.weight``, ``1.*``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def _attention_mlp(in_channels: int, down_ratio: int) -> nn.Sequential:
    """``W_spatial`` / ``W_channel``: conv -> BN -> ReLU -> conv to 1 -> BN(1), no final ReLU.

    The hidden width is ``(1 + N') // d`` (counting the unary channel), not ``N' // d``.
    """
    hidden = in_channels // down_ratio
    if hidden < 1:
        raise ConfigError(
            f"RGA_Module: attention MLP hidden width ({in_channels} // down_ratio={down_ratio}) is 0; "
            "use a smaller down_ratio or larger in_channel/in_spatial"
        )
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(),
        nn.Conv2d(hidden, 1, kernel_size=1, bias=False),
        nn.BatchNorm2d(1),
    )


def _apply_pointwise(layers: nn.Sequential, z: Tensor) -> Tensor:
    """Run a Sequential of 1x1 Conv2d / BatchNorm2d / ReLU on ``z [B, M, channels]`` (channels last).

    Same numbers (and the same BatchNorm statistics and running-stat updates) as running it on the
    ``[B, channels, M, 1]`` map; each conv is one matrix product with no layout copy.
    """
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            z = F.linear(z, layer.weight.flatten(1))
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm):  # BatchNorm2d, or SyncBatchNorm after conversion
            # [B*M, channels, 1, 1]: the statistics run over all B*M values, as over (B, H, W)
            z = layer(z.reshape(-1, z.shape[-1], 1, 1)).reshape(z.shape)
        else:
            z = layer(z)
    return z


def relation_conv_direct(theta: Tensor, phi: Tensor, weight: Tensor) -> Tensor:
    """Reference relation convolution: the original's computation as one function.

    Args:
        theta, phi: ``[B, M, D]`` embeddings of the M "positions" (D = embedding size).
        weight: ``[K, 2M]``, the 1x1 conv weight of ``gg_*`` flattened.

    Returns ``[B, M, K]``: the conv (before its BN) applied to the relation feature of every
    position ``i``, which is ``[R[i, :], R[:, i]]`` (row first, then column) with
    ``R[i, j] = theta_i . phi_j``. Materialises ``R`` (``[B, M, M]``) and the features (``[B, M, 2M]``).
    """
    relation = torch.bmm(theta, phi.transpose(1, 2))  # [B, M, M]
    features = torch.cat([relation, relation.transpose(1, 2)], dim=2)  # [B, M, 2M]: row, then column
    return F.linear(features, weight)


def relation_conv_low_rank(theta: Tensor, phi: Tensor, weight: Tensor) -> Tensor:
    """Same result as :func:`relation_conv_direct` without forming the ``M x M`` relation (spec §1.7).

    With ``W1 = weight[:, :M]`` (acts on the row part) and ``W2 = weight[:, M:]`` (column part):
    ``out[i, k] = sum_j W1[k, j] theta_i.phi_j + sum_j W2[k, j] theta_j.phi_i
               = theta_i . (W1 phi)[k] + phi_i . (W2 theta)[k]``,
    two ``[K, M] x [M, D]`` products and two ``[M, D] x [D, K]`` ones: ``O(B M D K)`` instead of
    ``O(B M^2 (D + K))``. Shapes as in :func:`relation_conv_direct`.
    """
    num_positions = theta.shape[1]
    w_row, w_col = weight[:, :num_positions], weight[:, num_positions:]
    phi_row = torch.matmul(w_row, phi)  # [B, K, D]: sum_j W1[k, j] phi_j
    theta_col = torch.matmul(w_col, theta)  # [B, K, D]: sum_j W2[k, j] theta_j
    return torch.bmm(theta, phi_row.transpose(1, 2)) + torch.bmm(phi, theta_col.transpose(1, 2))


class RGA_Module(nn.Module):  # noqa: N801 - the original's class name, kept for drop-in use
    """Relation-aware global attention over positions (RGA-S) and/or channels (RGA-C).

    Args:
        in_channel: C, channels of the input.
        in_spatial: N, **must equal H*W of the input** (it sets the channel branch's conv widths).
        use_spatial: build the spatial branch (RGA-S).
        use_channel: build the channel branch (RGA-C). Both: RGA-SC, applied sequentially
            (spatial first; the channel branch sees the spatially attended map).
        cha_ratio: C' = C // cha_ratio (spatial embeddings, channel-relation embedding).
        spa_ratio: N' = N // spa_ratio (channel embeddings, spatial-relation embedding).
        down_ratio: reduction inside the attention MLPs ``W_spatial`` / ``W_channel``.
        backend: ``"auto"`` (default, the fast form): relation convolutions through the low-rank
            identity (spec §1.7) and the 1x1 convs as plain matrix products; ``"reference"``: the
            original's computation, materialising the ``N x N`` / ``C x C`` relations and their maps.
            Same numbers (to float round-off), same parameters, same BatchNorm statistics.
        low_rank: deprecated spelling of ``backend``: True = ``"auto"``, False = ``"reference"``.

    Input ``[B, C, H, W]`` with ``H*W == in_spatial``; output the same shape. There is no
    residual: the output replaces the feature map.
    """

    def __init__(
        self,
        in_channel: int,
        in_spatial: int,
        use_spatial: bool = True,
        use_channel: bool = True,
        cha_ratio: int = 8,
        spa_ratio: int = 8,
        down_ratio: int = 8,
        *,
        backend: str = "auto",
        low_rank: Optional[bool] = None,
    ) -> None:
        super().__init__()
        if not (use_spatial or use_channel):
            raise ConfigError("RGA_Module: at least one of use_spatial / use_channel must be True")
        for name, value in (("in_channel", in_channel), ("in_spatial", in_spatial), ("cha_ratio", cha_ratio),
                            ("spa_ratio", spa_ratio), ("down_ratio", down_ratio)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"RGA_Module: {name} must be a positive int, got {value!r}")
        self.in_channel = in_channel
        self.in_spatial = in_spatial
        self.use_spatial = use_spatial
        self.use_channel = use_channel
        self.backend = from_deprecated("RGA_Module", "low_rank", low_rank, {True: "auto", False: "reference"},
                                       check_backend(backend, PURE_TORCH, "RGA_Module backend"))
        self.inter_channel = in_channel // cha_ratio  # C'
        self.inter_spatial = in_spatial // spa_ratio  # N'
        if self.inter_channel < 1 or self.inter_spatial < 1:
            raise ConfigError(
                f"RGA_Module: in_channel // cha_ratio = {self.inter_channel} and in_spatial // spa_ratio = "
                f"{self.inter_spatial} must both be >= 1"
            )
        c, n, c_, n_ = in_channel, in_spatial, self.inter_channel, self.inter_spatial

        # Registration order = the original's state_dict order (spec §1.2).
        if use_spatial:
            self.gx_spatial = _cbr(c, c_)
        if use_channel:
            self.gx_channel = _cbr(n, n_)
        if use_spatial:
            self.gg_spatial = _cbr(2 * n, n_)
        if use_channel:
            self.gg_channel = _cbr(2 * c, c_)
        if use_spatial:
            self.W_spatial = _attention_mlp(1 + n_, down_ratio)
        if use_channel:
            self.W_channel = _attention_mlp(1 + c_, down_ratio)
        if use_spatial:
            self.theta_spatial = _cbr(c, c_)
            self.phi_spatial = _cbr(c, c_)
        if use_channel:
            self.theta_channel = _cbr(n, n_)
            self.phi_channel = _cbr(n, n_)

    def extra_repr(self) -> str:
        return (f"in_channel={self.in_channel}, in_spatial={self.in_spatial}, use_spatial={self.use_spatial}, "
                f"use_channel={self.use_channel}, backend={self.backend!r}")

    # ------------------------------------------------------------------------------------------
    # Direct form (backend "reference"): the original's computation, literally (relation tensors and
    # their 2N-channel maps are materialised and fed to the gg_* convolutions).

    def _spatial_logits_direct(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> pre-sigmoid spatial attention ``[B, 1, H, W]`` (spec §1.3)."""
        b, _, h, w = x.shape
        theta = self.theta_spatial(x).flatten(2)  # [B, C', N]
        phi = self.phi_spatial(x).flatten(2)  # [B, C', N]
        relation = torch.bmm(theta.transpose(1, 2), phi)  # [B, N, N]: R[i, j] = theta_i . phi_j
        # channel k of position i: R[i, k] (row) for k < N, then R[k - N, i] (column)
        relation_map = torch.cat([relation.transpose(1, 2), relation], dim=1).reshape(b, -1, h, w)
        embedded = self.gg_spatial(relation_map)  # [B, N', H, W]
        unary = self.gx_spatial(x).mean(dim=1, keepdim=True)  # [B, 1, H, W]
        return self.W_spatial(torch.cat([unary, embedded], dim=1))

    def _channel_logits_direct(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> pre-sigmoid channel attention ``[B, 1, C, 1]`` (spec §1.4).

        The N positions act as the channels of the 1x1 convs and the C channels as positions.
        """
        xc = x.flatten(2).transpose(1, 2).unsqueeze(-1)  # [B, N, C, 1]
        theta = self.theta_channel(xc).squeeze(-1)  # [B, N', C]
        phi = self.phi_channel(xc).squeeze(-1)  # [B, N', C]
        relation = torch.bmm(theta.transpose(1, 2), phi)  # [B, C, C]
        relation_map = torch.cat([relation.transpose(1, 2), relation], dim=1).unsqueeze(-1)  # [B, 2C, C, 1]
        embedded = self.gg_channel(relation_map)  # [B, C', C, 1]
        unary = self.gx_channel(xc).mean(dim=1, keepdim=True)  # [B, 1, C, 1]
        return self.W_channel(torch.cat([unary, embedded], dim=1))

    # ------------------------------------------------------------------------------------------
    # Fast form (backend "auto"): the relation convolutions through the low-rank identity, and every
    # 1x1 conv as one matrix product in a channels-last [B, positions, channels] layout (no im2col, no
    # layout copies but one transpose of x for the spatial branch).

    def _logits_low_rank(self, tokens: Tensor, branch: str) -> Tensor:
        """One branch's attention logits from channels-last ``tokens`` [B, P, C] -> [B, P, 1].

        ``branch`` ('spatial' or 'channel') names its modules: theta_/phi_/gg_/gx_/W_<branch>.
        """
        theta = _apply_pointwise(getattr(self, f"theta_{branch}"), tokens)  # [B, P, C']
        phi = _apply_pointwise(getattr(self, f"phi_{branch}"), tokens)
        gg = getattr(self, f"gg_{branch}")
        pre = relation_conv_low_rank(theta, phi, gg[0].weight.flatten(1))  # [B, P, P']
        embedded = _apply_pointwise(gg[1:], pre)
        unary = _apply_pointwise(getattr(self, f"gx_{branch}"), tokens).mean(dim=2, keepdim=True)  # [B, P, 1]
        return _apply_pointwise(getattr(self, f"W_{branch}"), torch.cat([unary, embedded], dim=2))

    def _spatial_logits_low_rank(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2).contiguous()  # [B, N, C]: N positions, C channels
        return self._logits_low_rank(tokens, "spatial").reshape(b, 1, h, w)

    def _channel_logits_low_rank(self, x: Tensor) -> Tensor:
        # [B, C, N] is already "channels last" for this branch: C positions, N channels
        logits = self._logits_low_rank(x.flatten(2), "channel")  # [B, C, 1]
        return logits.transpose(1, 2).unsqueeze(-1)  # [B, 1, C, 1], the original's layout

    def forward_with_logits(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Returns ``(output [B, C, H, W], spatial_logits [B, 1, H, W] | None, channel_logits [B, 1, C, 1] | None)``.

        The logits are the pre-sigmoid attention maps (outputs of ``W_spatial`` / ``W_channel``).
        """
        if x.dim() != 4:
            raise InputError(f"RGA_Module expects a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
        _, c, h, w = x.shape
        if c != self.in_channel:
            raise InputError(f"RGA_Module built for in_channel={self.in_channel}, got input with {c} channels")
        if h * w != self.in_spatial:
            raise InputError(
                f"RGA_Module built for in_spatial={self.in_spatial} positions, got a {h}x{w} map ({h * w}); "
                "the module only runs at the input size it was constructed for"
            )
        spatial_logits = channel_logits = None
        direct = resolve(self.backend, PURE_TORCH, "RGA_Module backend") == "reference"
        spatial_fn = self._spatial_logits_direct if direct else self._spatial_logits_low_rank
        channel_fn = self._channel_logits_direct if direct else self._channel_logits_low_rank
        if self.use_spatial:
            spatial_logits = spatial_fn(x)
            x = torch.sigmoid(spatial_logits) * x  # one map broadcast over the C channels
        if self.use_channel:
            channel_logits = channel_fn(x)  # on the spatially attended map for RGA-SC
            x = torch.sigmoid(channel_logits).transpose(1, 2) * x  # [B, C, 1, 1] broadcast over positions
        return x, spatial_logits, channel_logits

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, C, H, W]`` (attended feature map)."""
        return self.forward_with_logits(x)[0]
