"""RSANet-R50 for Something-Something v1/v2 (spec ``shared/specs/rsa.md`` §2-§3).

A 3D-inflated ResNet-50 (the shared :class:`zoo.models.resnet.ResNet` with ``conv_dims=3``:
every conv has temporal size 1, so frames mix only in the RSA layers) whose 3x3 conv is an
:class:`zoo.layers.rsa.RSA` layer in seven blocks (``layer1.2, layer2.1, layer2.3, layer3.1,
layer3.3, layer3.5, layer4.1``), kernel (5, 7, 7), 8 heads, 'VplusR' kernel and context.
Head (§2.2): average over H, W per frame, dropout, a per-frame ``new_fc`` (Conv1d, kernel 1)
and the mean of the per-frame logits over T.

Keys are the original's without DataParallel's ``module.``: ``base_model.*`` and
``new_fc.{weight,bias}`` (``shared/fixtures/rsa/rsanet_r50_keys.json``). This module also holds
the conversion hooks of ``convert/rsa.yaml`` (:func:`convert_rsa_names`,
:func:`kwargs_from_checkpoint`).
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Optional, Sequence, Union

from torch import Tensor, nn

from zoo.convert import register_hook
from zoo.errors import ConfigError, ConversionError, InputError
from zoo.layers.rsa import RSA
from zoo.models._features import FeaturePoint
from zoo.models._head import GlobalPool
from zoo.models._inputs import check_batch, weight_dtype
from zoo.models.resnet import ResNet, load_imagenet_resnet50
from zoo.registry import register_model

__all__ = ["RSANet", "RSA_POSITIONS", "rsanet_r50", "rsanet_r50_ssv1_16f", "rsanet_r50_ssv2_16f", "rsanet_mini",
           "convert_rsa_names", "kwargs_from_checkpoint"]

logger = logging.getLogger(__name__)

# Block indices (0-based, per stage) whose 3x3 conv is an RSA layer in the released network.
RSA_POSITIONS = ((2,), (1, 3), (1, 3, 5), (1,))


class RSANet(nn.Module):
    """RSANet: inflated ResNet with RSA layers, per-frame classifier averaged over frames.

    Args:
        num_classes: classes of ``new_fc`` (174 for both Something-Something versions).
        num_segments: frames per clip (16 for the released models). The original's head only
            works for exactly this many frames, so other clip lengths are refused.
        dropout: before ``new_fc`` (0.3 in the released scripts and SSv2 log, 0.5 in the SSv1 log).
        layers, width_div: blocks per stage and channel divisor of the shared ResNet
            ((3, 4, 6, 3), 1 for R50; smaller values give reduced test networks).
        rsa_positions: per stage, the block indices whose 3x3 conv is RSA.
        nh, kernel_size, kernel_type, feat_type: of every RSA layer (dk = dv = dd = planes / nh).
        stochastic_depth: p of the ResNet's linear stochastic-depth rule (0.2 released; training only).
        backend: of every RSA layer: ``"auto"`` (default, the chunked memory-efficient formulation) or
            ``"reference"`` (the original's).
        pretrained_backbone: True loads torchvision's ImageNet ResNet-50 into the stem and the
            non-RSA blocks (2D kernels get a temporal axis of size 1) as the original's training
            did; a string is another source of such a state dict. RSA blocks stay random.
        in_chans: channels of each frame (3: RGB).
        global_pool: the pooling of each frame's map before ``new_fc`` (``'avg'``, the original's;
            ``'max'``, ``'avgmax'``).

    Input: (B, 3 * T, H, W), frames stacked along channels (channel 3 t + c, the original's
    layout), or (B, 3, T, H, W) (3 = ``in_chans``). Output: logits (B, num_classes), no softmax;
    with ``num_classes`` 0 the pooled features averaged over the frames (B, C).
    """

    def __init__(self, num_classes: int = 174, num_segments: int = 16, dropout: float = 0.3,
                 layers: Sequence[int] = (3, 4, 6, 3), width_div: int = 1,
                 rsa_positions: Sequence[Sequence[int]] = RSA_POSITIONS, nh: int = 8,
                 kernel_size: Sequence[int] = (5, 7, 7), kernel_type: str = "VplusR", feat_type: str = "VplusR",
                 stochastic_depth: float = 0.2, backend: str = "auto",
                 pretrained_backbone: Union[bool, str] = False, in_chans: int = 3, global_pool: str = "avg") -> None:
        super().__init__()
        if not isinstance(num_segments, int) or num_segments < 1:
            raise ConfigError(f"num_segments must be a positive int, got {num_segments!r}")
        if len(rsa_positions) != 4:
            raise ConfigError(f"rsa_positions needs one list of block indices per stage (4), got {rsa_positions!r}")
        for stage, (blocks, n_blocks) in enumerate(zip(rsa_positions, layers), start=1):
            bad = [b for b in blocks if not 0 <= b < n_blocks]
            if bad:
                raise ConfigError(f"rsa_positions: stage {stage} has {n_blocks} blocks, no block {bad}")
        self.num_classes, self.num_segments = num_classes, num_segments
        self.rsa_positions = tuple(tuple(int(b) for b in blocks) for blocks in rsa_positions)
        kernel_size = tuple(kernel_size)

        def spatial_layer(stage: int, block: int, width: int, stride: int) -> Optional[nn.Module]:
            if block not in self.rsa_positions[stage - 1]:
                return None
            return RSA(width, width, nh=nh, dk=0, dv=0, dd=0, kernel_size=kernel_size, stride=(1, stride, stride),
                       kernel_type=kernel_type, feat_type=feat_type, backend=backend)

        # The original zero-initialises every bn3 and inits all convs (RSA's too) kaiming fan_out:
        # exactly the shared ResNet's init with zero_init_residual.
        self.base_model = ResNet(layers=tuple(layers), width_div=width_div, conv_dims=3, spatial_layer=spatial_layer,
                                 zero_init_residual=True, stochastic_depth=stochastic_depth, in_chans=in_chans)
        self.in_chans = in_chans
        self.num_features = self.base_model.out_channels
        self.dropout = nn.Dropout(p=dropout)
        self.reset_classifier(num_classes, global_pool)
        if pretrained_backbone:
            self.load_imagenet_backbone(None if pretrained_backbone is True else str(pretrained_backbone))

    def rsa_blocks(self) -> list[str]:
        """Names of the blocks with an RSA layer, e.g. ``['layer1.2', ...]``."""
        return [f"layer{s}.{b}" for s, blocks in enumerate(self.rsa_positions, start=1) for b in blocks]

    def load_imagenet_backbone(self, source: Optional[str] = None, sha256: Optional[str] = None) -> None:
        """ImageNet ResNet-50 weights, inflated to 3D, into the stem and every non-RSA block (spec §2.4.3).

        Every key of an RSA block (its conv1, bn1, bn2, conv3, bn3 too) is skipped, as in the
        original, so RSA blocks start fully random; the ImageNet fc is dropped.
        """
        skip = tuple(f"{name}." for name in self.rsa_blocks())
        load_imagenet_resnet50(self.base_model, source=source, sha256=sha256, skip=skip)

    def to_clip(self, x: Tensor) -> Tensor:
        """(B, 3T, H, W) or (B, 3, T, H, W) -> (B, 3, T, H, W), checking T == num_segments (3 = in_chans)."""
        c0, t = self.in_chans, self.num_segments
        check_batch(x, model="RSANet", layout=f"(B, {c0}T, H, W) or (B, {c0}, T, H, W)", rank=(4, 5), channels=None,
                    dtype=weight_dtype(self), min_size=self.base_model.feature_points()[-1].reduction)
        if x.dim() == 4:
            b, c, h, w = x.shape
            if c != c0 * t:
                raise InputError(f"RSANet expects (B, {c0} * num_segments = {c0 * t}, H, W) frames "
                                 f"stacked along channels, got {tuple(x.shape)}")
            # channel 3 t + c -> (B, T, 3, H, W) -> (B, 3, T, H, W)
            return x.view(b, t, c0, h, w).transpose(1, 2)
        if x.dim() == 5:
            if x.shape[1] != c0 or x.shape[2] != t:
                raise InputError(f"RSANet expects (B, {c0}, T = num_segments = {t}, H, W), got {tuple(x.shape)}")
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """Input as :meth:`forward` -> layer4's map (B, 2048 / width_div, T, h, w)."""
        return self.base_model.forward_features(self.to_clip(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """layer4's map -> logits (B, num_classes), the mean of per-frame logits; ``pre_logits``: the
        per-frame pooled features averaged over the frames (B, C) (what ``new_fc`` sees, up to the mean)."""
        per_frame = self.global_pool(x)  # (B, C, T): the original's AdaptiveAvgPool3d((T, 1, 1))
        if pre_logits:
            return per_frame.mean(dim=2)
        return self.new_fc(self.dropout(per_frame)).mean(dim=2)  # (B, num_classes, T) -> (B, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3T, H, W) or (B, 3, T, H, W) -> logits (B, num_classes): mean of per-frame logits."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.new_fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new per-frame classifier ``new_fc`` (Conv1d, kernel 1; xavier init, zero bias, as the original;
        0: none), and optionally another pooling of each frame."""
        if global_pool is not None:
            if not global_pool:
                raise ConfigError("global_pool='' is not possible for RSANet: its per-frame classifier takes pooled frames")
            self.global_pool = GlobalPool(global_pool, start_dim=3)
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ConfigError(f"num_classes must be a non-negative int (0: no classifier), got {num_classes!r}")
        if num_classes:
            self.new_fc = nn.Conv1d(self.num_features, num_classes, kernel_size=1)
            nn.init.xavier_uniform_(self.new_fc.weight)
            nn.init.zeros_(self.new_fc.bias)
        else:
            self.new_fc = nn.Identity()
        self.num_classes = num_classes

    # -- backbone (zoo.models._features): 5D maps (B, C, T, h, w) of the stem and every stage --
    feature_head = ("global_pool", "dropout", "new_fc")

    def feature_points(self) -> list[FeaturePoint]:
        return [dataclasses.replace(p, module=f"base_model.{p.module}") for p in self.base_model.feature_points()]

    def forward_intermediates(self, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
        """Input as :meth:`forward` -> the maps at ``indices``, each (B, C, T, h, w)."""
        return self.base_model.forward_intermediates(self.to_clip(x), indices)


@register_model
def rsanet_r50(**kwargs) -> RSANet:
    """RSANet-R50 (RSA in 7 blocks, kernel (5,7,7), 8 heads), per-frame classifier averaged over frames."""
    return RSANet(**kwargs)


@register_model
def rsanet_r50_ssv1_16f(**kwargs) -> RSANet:
    """RSANet-R50, 16 frames, Something-Something v1 (174 classes)."""
    return RSANet(**kwargs)


@register_model
def rsanet_r50_ssv2_16f(**kwargs) -> RSANet:
    """RSANet-R50, 16 frames, Something-Something v2 (174 classes)."""
    return RSANet(**kwargs)


# -------------------------------------------------------------------------------------------------
# Conversion hooks (convert/rsa.yaml)
# -------------------------------------------------------------------------------------------------

def _diagonal_dominance(t: Tensor) -> float:
    """mean |diagonal| / mean |off-diagonal| of a (1, d, d) tensor (inf for a diagonal one)."""
    m = t.detach().float().reshape(t.shape[-2], t.shape[-1]).abs()
    d = m.shape[0]
    diag = m.diagonal().mean()
    off = (m.sum() - m.diagonal().sum()) / max(d * d - d, 1)
    return float("inf") if off == 0 else float(diag / off)


@register_hook
def convert_rsa_names(state_dict: dict, checkpoint, target_state_dict) -> dict:
    """State-dict hook: give the internal version's two unnamed (1, d, d) parameters their names.

    The training logs (spec §3) show an internal RSA module (``RelationInvolution``) whose
    ``E_conv`` / ``E_feat`` / ``E_feat_2`` the map's renames turn into H1 / H2 / G, plus two
    (1, d, d) parameters whose names the logs do not give. For every RSA layer of the target
    that lacks ``P1`` and/or ``I``, the layer's leftover (1, d, d) tensors are assigned: with two,
    the more diagonal-dominant one is ``I`` (it starts as the identity and stays
    diagonal-dominant in training), the other ``P1``. Released-name checkpoints pass unchanged.
    """
    original_keys = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
    if any(".E_feat." in str(k) for k in original_keys):
        logger.warning("checkpoint uses the internal RSA names (E_conv/E_feat/E_feat_2): E_feat and E_feat_2 have the "
                       "same shape, so which is H2 and which is G cannot be checked here (spec rsa §3). Check the "
                       "accuracy on a few hundred validation videos; the other reading is the other map "
                       "('rsa' reads E_feat as H2, 'rsa-internal-swapped' reads it as G).")
    if target_state_dict is None:
        return state_dict
    out = dict(state_dict)
    layers = sorted({k[: -len(suffix)] for k in target_state_dict for suffix in (".P1", ".I") if k.endswith(suffix)})
    for layer in layers:
        wanted = [name for name in ("P1", "I") if f"{layer}.{name}" in target_state_dict and f"{layer}.{name}" not in out]
        if not wanted:
            continue
        leftovers = [k for k, v in out.items()
                     if k.startswith(layer + ".") and "." not in k[len(layer) + 1:] and k not in target_state_dict
                     and v.dim() == 3 and v.shape[0] == 1 and v.shape[1] == v.shape[2]]
        if len(leftovers) != len(wanted):
            continue  # nothing to decide here; the strict load reports what is missing/unexpected
        if len(wanted) == 1:
            out[f"{layer}.{wanted[0]}"] = out.pop(leftovers[0])
            continue
        a, b = leftovers
        i_key, p_key = (a, b) if _diagonal_dominance(out[a]) >= _diagonal_dominance(out[b]) else (b, a)
        logger.info("%s: unnamed (1,d,d) parameters %s -> I (more diagonal-dominant), %s -> P1",
                    layer, i_key.rsplit(".", 1)[1], p_key.rsplit(".", 1)[1])
        out[f"{layer}.I"] = out.pop(i_key)
        out[f"{layer}.P1"] = out.pop(p_key)
    return out


@register_hook
def kwargs_from_checkpoint(checkpoint) -> dict:
    """Constructor kwargs of RSANet read from a checkpoint's shapes (either naming).

    Always ``num_classes`` (rows of ``new_fc.weight``); ``layers``, ``width_div``,
    ``rsa_positions``, ``kernel_size`` and ``nh`` only where they differ from the released
    RSANet-R50, so a reduced or modified network converts with its own architecture.
    """
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
    if not isinstance(state, dict):
        return {}
    state = {re.sub(r"^module\.", "", str(k)): v for k, v in state.items() if isinstance(v, Tensor)}
    kwargs: dict = {}
    if "new_fc.weight" in state:
        kwargs["num_classes"] = int(state["new_fc.weight"].shape[0])
    blocks: dict[int, set] = {1: set(), 2: set(), 3: set(), 4: set()}
    rsa: dict[int, set] = {1: set(), 2: set(), 3: set(), 4: set()}
    kernel = nh = None
    for key, value in state.items():
        m = re.match(r"base_model\.layer([1-4])\.(\d+)\.(.*)$", key)
        if not m:
            continue
        stage, block, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        blocks[stage].add(block)
        if rest == "conv2.projection.weight":
            rsa[stage].add(block)
        if rest in ("conv2.H2.weight", "conv2.E_feat.weight") and value.dim() == 5:
            kernel = tuple(int(s) for s in value.shape[2:])
            planes = state[f"base_model.layer{stage}.{block}.conv1.weight"].shape[0]
            nh = int(planes // value.shape[0])  # dd = planes / nh in the released derivation
    if not all(blocks.values()):
        return kwargs  # not an RSANet state dict; the strict load will say what is wrong
    for stage, found in blocks.items():
        if found != set(range(len(found))):  # the block count is read off the indices: they must be 0..n-1
            gaps = sorted(set(range(max(found) + 1)) - found) if max(found) < 1000 else ["..."]
            raise ConversionError(f"the checkpoint's blocks of layer{stage} are numbered {sorted(found)[:8]}"
                                  f"{'...' if len(found) > 8 else ''}, not 0..{len(found) - 1} (missing {gaps[:8]}); "
                                  f"it is not an RSANet state dict this map can read")
    layers = tuple(max(blocks[s]) + 1 for s in range(1, 5))
    positions = tuple(tuple(sorted(rsa[s])) for s in range(1, 5))
    width = state["base_model.conv1.weight"].shape[0] if "base_model.conv1.weight" in state else 64
    derived = {"layers": layers, "width_div": 64 // int(width), "rsa_positions": positions,
               "kernel_size": kernel or (5, 7, 7), "nh": nh or 8}
    defaults = {"layers": (3, 4, 6, 3), "width_div": 1, "rsa_positions": RSA_POSITIONS, "kernel_size": (5, 7, 7), "nh": 8}
    kwargs.update({k: [list(p) for p in v] if k == "rsa_positions" else (list(v) if isinstance(v, tuple) else v)
                   for k, v in derived.items() if v != defaults[k]})
    return kwargs


@register_model
def rsanet_mini(**kwargs) -> RSANet:
    """RelZoo-mini: RSANet with one block per stage at 1/8 width, RSA (kernel (3,5,5), 2 heads) in
    stages 1-3, 8 frames; trained on the synthetic moving-shapes clips (``zoo data make moving-shapes``)."""
    return RSANet(**{"num_classes": 8, "num_segments": 8, "layers": [1, 1, 1, 1], "width_div": 8,
                     "rsa_positions": [[0], [0], [0], []], "nh": 2, "kernel_size": [3, 5, 5],
                     "stochastic_depth": 0.0, "dropout": 0.0, **kwargs})
