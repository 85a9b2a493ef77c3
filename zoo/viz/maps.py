"""``zoo.viz.attention_maps(model, x)``: what every attention layer of a model computes for one input,
as tensors, family by family.

The model runs once on ``x`` (eval mode, no gradients); forward hooks on the layers RelZoo knows record
their inputs, and each layer's maps are computed from that input with the layer's own public pieces
(its projections, tables, ``reference_affinity``, ``relative_table``, ``forward_with_logits``) and the
public ops that define the layer (``get_bucket_ids_2d``, ``neighborhood_attention_reference``), so a
map is what the layer computes, not a re-derivation of it (tests hold them to the layers' outputs):

============================== ==================== ===================================================
layer                          maps                 what they hold
============================== ==================== ===================================================
iRPE attention (DETR, DeiT)    :class:`IRPEMaps`    bucket id of every key for one query; each table's
                                                    learned values on the bucket grid
DETR decoder cross-attention   :class:`CrossMaps`   per object query, its attention over the image
RGA_Module                     :class:`RGAMaps`     spatial attention (H, W), channel attention (C,)
RSA                            :class:`RSAMaps`     the relational kernel of one position over its
                                                    (kT, kH, kW) neighbourhood, per head
MultiheadNonlocal2d (RPA)      :class:`RPAMaps`     for one query: the relative term q.A_k over the keys,
                                                    the attention with and without it, per head
SASAttention2d, AttentionConv  :class:`SASAMaps`    for one pixel: the k x k window's attention with
                                                    and without the relative embedding, and its logit term
============================== ==================== ===================================================

Positions (the query of iRPE and RPA, the RSA position, the SASA pixel) are given once as a
``point`` in fractions of the input's height and width (0.5, 0.5 = the centre) and mapped onto each
layer's own grid; ``frame`` picks the RSA frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.ops import box_convert

from zoo.errors import ConfigError, InputError
from zoo.layers.irpe import METHOD, METHOD_NAMES, RPEAttention, RPEMultiheadAttention, get_bucket_ids_2d, iRPE, iRPE_Cross
from zoo.layers.rga import RGA_Module
from zoo.layers.rpa import MultiheadNonlocal2d, relative_attend_query_reference
from zoo.layers.rsa import RSA
from zoo.layers.sasa import AttentionConv, SASAttention2d
from zoo.models.detr import DETR
from zoo.ops.neighborhood_attn import neighborhood_attention_reference

__all__ = ["attention_maps", "AttentionMaps", "IRPEMaps", "CrossMaps", "Detections", "RGAMaps", "RSAMaps",
           "RPAMaps", "SASAMaps", "Placement", "bucket_map", "rpe_table", "grid_cell", "feature_stride"]

_METHOD_LABELS = {v: k for k, v in METHOD_NAMES.items() if k != "euclidean"}


# =============================================================================================
# What the maps hold


@dataclass
class IRPEMaps:
    """iRPE of one attention module for one query.

    ``feature_size`` (H, W) and ``skip`` (tokens before the grid); ``query`` (row, col) on the grid. Per
    table (``"q"``, ``"k"``, ``"v"``; method cross: ``"k.rows"``, ``"k.cols"``, ...):
    ``bucket_maps[t]`` (H, W) int64, the bucket id of every key for the query (the q table reads the
    pair the other way round, as the layer does); ``num_buckets[t]`` the table's buckets without the
    skip bucket; ``tables[t]`` (table heads, rows, cols) float, each bucket's learned value (bias mode) or
    the norm of its vector (contextual), on the bucket grid (product: rows = row-offset bucket, cols =
    column-offset bucket; other methods one row); ``methods[t]`` the method's name.
    """

    feature_size: tuple[int, int]
    skip: int
    query: tuple[int, int]
    bucket_maps: dict[str, Tensor] = field(default_factory=dict)
    num_buckets: dict[str, int] = field(default_factory=dict)
    tables: dict[str, Tensor] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)
    modes: dict[str, str] = field(default_factory=dict)


@dataclass
class CrossMaps:
    """DETR decoder cross-attention: ``attention`` (Q, H, W), each object query's weights over the encoder
    grid (head-averaged; each row sums to one over the unpadded cells)."""

    feature_size: tuple[int, int]
    attention: Tensor


@dataclass
class Detections:
    """DETR's predictions for the input: ``boxes`` (Q, 4) xyxy in input pixels, ``scores`` (Q,) and
    ``labels`` (Q,) (the best real class of each query)."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor


@dataclass
class RGAMaps:
    """One RGA module: ``spatial`` (H, W) sigmoid attention of each position, ``channel`` (C,) of each
    channel (None for a branch the module does not have)."""

    feature_size: tuple[int, int]
    spatial: Optional[Tensor]
    channel: Optional[Tensor]


@dataclass
class RSAMaps:
    """One RSA layer at ``position`` (t, y, x) of its (T, H, W) grid: ``kernel`` (nh, kT, kH, kW), the
    relational kernel each head applies to the values of the position's neighbourhood,
    sum_j kappa_h[j] H2[j] (spec rsa §1.3): with feat_type 'V' the layer's output at the position is
    sum over the neighbourhood of ``kernel`` times the normalised values."""

    feature_size: tuple[int, int, int]
    position: tuple[int, int, int]
    kernel: Tensor
    kernel_type: str


@dataclass(frozen=True)
class Placement:
    """Where a grid's cells sit on the grid of the layer's input (for drawing over the image): cell (i, j)
    covers input cells from ``origin + (i, j) * step`` over ``step`` cells; ``input_grid`` is that grid's size.
    An embedding conv without padding (RPA's locality) makes its grid smaller and shifted."""

    input_grid: tuple[int, int]
    origin: tuple[float, float]
    step: tuple[int, int]


@dataclass
class RPAMaps:
    """One RPA non-local block for the query ``query`` (y, x) of its (H, W) hidden grid, per head:
    ``affinity`` (heads, H, W) the relative logit term q . A_k[key - query] over the keys (before the
    scale); ``attention`` (heads, H, W) the block's attention, ``attention_without`` the same softmax
    without the relative term (both sum to one)."""

    feature_size: tuple[int, int]
    query: tuple[int, int]
    affinity: Tensor
    attention: Tensor
    attention_without: Tensor
    mode: str
    placement: Optional[Placement] = None


@dataclass
class SASAMaps:
    """One local self-attention layer at ``pixel`` (y, x) of its query grid, per head over the k x k window
    (row = row offset): ``attention`` (heads, k, k) the layer's weights, ``attention_without`` without the
    relative embedding, ``relative`` the embedding's logit term q . r; slots outside the image (mask
    padding) have weight 0 and relative NaN."""

    feature_size: tuple[int, int]
    pixel: tuple[int, int]
    attention: Tensor
    attention_without: Tensor
    relative: Tensor


@dataclass
class AttentionMaps:
    """Everything :func:`attention_maps` found: ``layers`` module name -> maps, in forward order;
    ``input_size`` (H, W) of the input (a video's frame); ``network_input_size`` the size the layers' grids
    cover, different when the network resizes its input itself (torchvision's detectors do);
    ``detections`` for DETR."""

    input_size: tuple[int, int]
    layers: dict = field(default_factory=dict)
    detections: Optional[Detections] = None
    network_input_size: Optional[tuple[int, int]] = None

    def of(self, kind: type) -> dict:
        """The layers whose maps are of ``kind`` (e.g. ``maps.of(RGAMaps)``)."""
        return {name: m for name, m in self.layers.items() if isinstance(m, kind)}


# =============================================================================================
# Grids


def grid_cell(point: Sequence[float], size: Sequence[int]) -> tuple[int, ...]:
    """The cell of a grid of ``size`` that holds ``point`` (fractions of each extent, in [0, 1])."""
    return tuple(min(int(f * n), n - 1) for f, n in zip(point, size))


def feature_stride(input_extent: int, feature_extent: int) -> int:
    """The stride of a feature grid over the input: the power of two nearest input / feature (the
    networks here downsample by powers of two; a grid over a padded input is a little larger)."""
    return 2 ** max(0, round(math.log2(input_extent / feature_extent)))


# =============================================================================================
# iRPE


def _tables(rpe: Union[iRPE, iRPE_Cross, None], name: str) -> list[tuple[str, iRPE]]:
    if rpe is None:
        return []
    if isinstance(rpe, iRPE_Cross):
        return [(f"{name}.rows", rpe.rp_rows), (f"{name}.cols", rpe.rp_cols)]
    return [(name, rpe)]


def bucket_map(rpe: iRPE, height: int, width: int, query: Sequence[int], skip: int = 0,
               reverse: bool = False) -> Tensor:
    """(H, W) int64: the bucket id of every key of an H x W grid for the query at ``query`` (row, col).

    ``reverse``: the bucket of (key, query) instead, which is what the q table of an attention reads.
    """
    cfg = rpe.rpe_config
    ids, _ = get_bucket_ids_2d(rpe.method, height, width, skip, cfg["alpha"], cfg["beta"], cfg["gamma"])
    row = skip + query[0] * width + query[1]
    line = ids[skip:, row] if reverse else ids[row, skip:]
    return line.reshape(height, width)


def rpe_table(rpe: iRPE) -> Tensor:
    """(table heads, rows, cols): each bucket's learned bias, or the L2 norm of its contextual vector, on
    the bucket grid (product: S x S; others 1 x S with S = 2 int(beta) + 1); the skip bucket left out."""
    if rpe.mode == "bias":
        values = rpe.lookup_table_bias.detach()
    else:
        weight = rpe.lookup_table_weight.detach()  # (heads, d, nb) transposed, (heads, nb, d) for values
        values = weight.norm(dim=1 if rpe.transposed else 2)
    size = 2 * int(rpe.rpe_config["beta"]) + 1
    if rpe.method == METHOD.PRODUCT:
        return values[:, : size * size].reshape(-1, size, size)
    return values[:, :size].reshape(-1, 1, size)


def _irpe_maps(module: nn.Module, tokens: int, hw: Optional[Sequence[int]], point) -> Optional[IRPEMaps]:
    tables = (_tables(module.rpe_q, "q") + _tables(module.rpe_k, "k") + _tables(module.rpe_v, "v"))
    if not tables:
        return None
    height, width = (int(hw[0]), int(hw[1])) if hw is not None else (int(math.sqrt(tokens)),) * 2
    skip = tokens - height * width
    query = grid_cell(point, (height, width))
    maps = IRPEMaps((height, width), skip, query)
    for name, rpe in tables:
        maps.bucket_maps[name] = bucket_map(rpe, height, width, query, skip, reverse=name.startswith("q"))
        maps.num_buckets[name] = rpe.num_buckets - (1 if skip > 0 else 0)
        maps.tables[name] = rpe_table(rpe)
        maps.methods[name] = _METHOD_LABELS[rpe.method]
        maps.modes[name] = rpe.mode
    return maps


# =============================================================================================
# RGA, RSA, RPA, SASA: maps from the input a layer received


def _rga_maps(module: RGA_Module, x: Tensor) -> RGAMaps:
    _, spatial, channel = module.forward_with_logits(x)
    return RGAMaps(tuple(x.shape[-2:]), None if spatial is None else spatial[0, 0].sigmoid(),
                   None if channel is None else channel[0, 0, :, 0].sigmoid())


def _l2_normalised(z: Tensor, dim: int) -> Tensor:
    return z / torch.sqrt(z.pow(2).sum(dim, keepdim=True) + 1e-6)  # eps inside the root, as the layer


def _rsa_maps(layer: RSA, x: Tensor, point, frame: Optional[int]) -> RSAMaps:
    """Steps 1-3 of spec rsa §1.3 at one position, then the kernel on the neighbourhood (sum over j of
    kappa_h[j] H2[j])."""
    _, _, T, H, W = x.shape
    t = T // 2 if frame is None else min(max(int(frame), 0), T - 1)
    y, w = grid_cell(point, (H, W))
    nh, dk, dv, dd = layer.nh, layer.dk, layer.dv, layer.dd
    z = layer.projection(x)
    if layer.kernel_type == "V":
        q, _ = torch.split(z, [nh * dk, dv], dim=1)
        kappa = _l2_normalised(q[0, :, t, y, w].view(nh, dk), 1)  # (nh, dd): the query is the kernel
    else:
        q, k, _ = torch.split(z, [nh * dk, dk, dv], dim=1)
        q = _l2_normalised(q[0, :, t, y, w].view(nh, dk), 1)
        k = _l2_normalised(k, 1)
        relation = F.conv3d(k, layer.H1.weight, padding=layer.pad, groups=dk)[0, :, t, y, w].view(dk, dd)
        if layer.kernel_type == "VplusR":
            relation = relation + layer.P1[0]
        kappa = q @ relation  # (nh, dd)
    kernel = torch.einsum("hj,jabc->habc", kappa, layer.H2.weight[:, 0])
    return RSAMaps((T, H, W), (t, y, w), kernel, layer.kernel_type)


def _rpa_maps(layer: MultiheadNonlocal2d, x: Tensor, point) -> RPAMaps:
    """The block's logits and attention for one query row, head by head (spec rpa §1.3)."""
    affinities, withs, withouts = [], [], []
    for head, conv in enumerate(layer.embed_conv):
        embed = conv(x)  # the head's q, k, v: (B, 3d, H, W)
        height, width = embed.shape[-2:]
        qy, qx = grid_cell(point, (height, width))
        i = qy * width + qx
        q, k, _ = embed[:1].flatten(2).split(layer.hidden_channels, dim=1)  # (1, d, N)
        logits = q[0, :, i] @ k[0]  # (N,)
        if layer.rpa_mode is None:
            relative = torch.zeros_like(logits)
        else:
            table = layer.reference_affinity("k", head, (height, width))  # (d, 2H-1, 2W-1), centre = no shift
            if tuple(table.shape[1:]) == (2 * height - 1, 2 * width - 1):
                # key (y, x) reads the cell of its displacement from the query: a window of the table
                window = table[:, height - 1 - qy: 2 * height - 1 - qy, width - 1 - qx: 2 * width - 1 - qx]
                relative = torch.einsum("c,chw->hw", q[0, :, i], window).flatten()
            else:  # bug-compatible transposed table: read it the original's way
                relative = relative_attend_query_reference(q, table, (height, width))[0, i]
        affinities.append(relative.view(height, width))
        withs.append(torch.softmax(layer.scale * (logits + relative), dim=0).view(height, width))
        withouts.append(torch.softmax(layer.scale * logits, dim=0).view(height, width))
    # hidden cell i is centred on input cell i s - p + dl (k - 1) / 2 and spans s of them
    origin = tuple(dl * (k - 1) / 2 - p + 0.5 - s / 2
                   for k, s, p, dl in zip(layer.kernel_size, layer.stride, layer.padding, layer.dilation))
    placement = Placement(tuple(x.shape[-2:]), origin, tuple(layer.stride))
    return RPAMaps((height, width), (qy, qx), torch.stack(affinities), torch.stack(withs), torch.stack(withouts),
                   str(layer.rpa_mode), placement)


def _window_probabilities(q: Tensor, keys: Tensor, rel: Optional[Tensor], k: int, offset: tuple[int, int]) -> Tensor:
    """Attention of one query over its k x k window through the op's definition: q (G, D) at a 1 x 1 query
    grid, keys (G, Hk, Wk, D); the values are one-hot over the window's slots, so the output is the
    weight of each slot. Returns (G, k, k)."""
    g, hk, wk, _ = keys.shape
    slots = keys.new_zeros(1, g, hk, wk, k * k)
    for a in range(k):
        for b in range(k):
            ya, xb = offset[0] + a, offset[1] + b
            if 0 <= ya < hk and 0 <= xb < wk:
                slots[:, :, ya, xb, a * k + b] = 1.0
    out = neighborhood_attention_reference(q.view(1, g, 1, 1, -1), keys[None], slots, rel, kernel_size=k,
                                           stride=1, offset=offset)
    return out.view(g, k, k)


def _heads_last(z: Tensor, heads: int) -> Tensor:
    """(C, H, W) -> (heads, H, W, C / heads), the op's layout."""
    c, h, w = z.shape
    return z.view(heads, c // heads, h, w).permute(0, 2, 3, 1)


def _sasa_maps(layer: Union[SASAttention2d, AttentionConv], x: Tensor, point) -> SASAMaps:
    x = x[:1]
    k = layer.kernel_size
    if isinstance(layer, SASAttention2d):
        heads, queries = layer.heads, layer.query(x)[0]
        keys = layer.key(x)[0]
        i, j = grid_cell(point, queries.shape[-2:])
        p = (k - 1) // 2
        if layer.padding_mode == "zeros":  # padded keys (zeros) take part in the softmax: window from (i, j) padded
            keys, offset = F.pad(keys, (p, k - 1 - p, p, k - 1 - p)), (i, j)
        else:  # windows reach outside the image, the op leaves those slots out
            offset = (i - p, j - p)
    else:  # AttentionConv: x padded before the key conv; query (i, j) sits at input (s i, s j)
        heads = layer.out_channels if layer.bug_compatible else layer.groups
        s, p = layer.stride, layer.padding
        queries = layer.query_conv(x[:, :, ::s, ::s])[0]
        keys = layer.key_conv(F.pad(x, (p, p, p, p)))[0]
        i, j = grid_cell(point, queries.shape[-2:])
        offset = (s * i, s * j)
    q = _heads_last(queries, heads)[:, i, j]  # (G, D)
    keys = _heads_last(keys, heads)
    rel = layer.relative_table()  # (G, k*k, D)
    attention = _window_probabilities(q, keys, rel, k, offset)
    without = _window_probabilities(q, keys, None, k, offset)
    relative = torch.einsum("gd,gtd->gt", q, rel).view(-1, k, k)
    if isinstance(layer, SASAttention2d) and layer.padding_mode == "mask":
        rows = torch.arange(k, device=relative.device).view(k, 1) + offset[0]
        cols = torch.arange(k, device=relative.device).view(1, k) + offset[1]
        outside = (rows < 0) | (rows >= keys.shape[1]) | (cols < 0) | (cols >= keys.shape[2])
        relative = relative.masked_fill(outside, float("nan"))
    return SASAMaps(tuple(queries.shape[-2:]), (i, j), attention, without, relative)


# =============================================================================================
# Running the model


def _input_of(args: tuple, kwargs: dict, name: str = "x") -> Tensor:
    return args[0] if args else kwargs[name]


def _detections(outputs: dict, image_size: tuple[int, int]) -> Detections:
    probs = outputs["pred_logits"][0].softmax(-1)
    scores, labels = probs[:, :-1].max(-1)
    h, w = image_size
    boxes = box_convert(outputs["pred_boxes"][0], "cxcywh", "xyxy") * torch.tensor([w, h, w, h], dtype=torch.float32)
    return Detections(boxes, scores, labels)


@torch.no_grad()
def attention_maps(model: nn.Module, x: Tensor, *, point: Sequence[float] = (0.5, 0.5),
                   frame: Optional[int] = None) -> AttentionMaps:
    """Run ``model`` on one input and return the maps of every attention layer it has (module docstring).

    Args:
        model: any network holding RelZoo's attention layers (a registered model or one built by hand).
        x: one input as the model's preprocessing makes it, without the batch dimension: an image
            (3, H, W), or a clip (3T, H, W) / (3, T, H, W) for video models.
        point: (row, col) in fractions of the input's height and width: the query (iRPE, RPA), the
            position (RSA) and the pixel (SASA) whose maps are computed, on each layer's own grid.
        frame: the RSA frame (index into the T frames; default the middle one).
    The model is put in eval mode for the run and every module back into the mode it had.
    """
    if not isinstance(x, Tensor) or x.dim() not in (3, 4):
        raise InputError(f"attention_maps takes one input without a batch dimension, (3, H, W) or (3T, H, W) "
                         f"(video: or (3, T, H, W)), got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not (len(point) == 2 and all(0.0 <= float(f) <= 1.0 for f in point)):
        raise ConfigError(f"point must be (row, col) fractions in [0, 1], got {tuple(point)!r}")
    point = (float(point[0]), float(point[1]))
    device = next(model.parameters()).device
    x = x.to(device)
    maps = AttentionMaps(tuple(x.shape[-2:]))
    found: dict[str, object] = {}  # name -> maps, filled by the hooks in forward order
    hw_seen: dict[str, tuple] = {}  # encoder grid of DETR, read by its cross-attention

    def pre_attention(name):
        def hook(module, args, kwargs):
            query = _input_of(args, kwargs, "query" if isinstance(module, RPEMultiheadAttention) else "x")
            hw = kwargs.get("hw", args[1] if isinstance(module, RPEAttention) and len(args) > 1 else None)
            if hw is not None:
                hw_seen["grid"] = tuple(int(v) for v in hw)
            tokens = query.shape[0] if isinstance(module, RPEMultiheadAttention) else query.shape[1]
            result = _irpe_maps(module, tokens, hw, point)
            if result is not None:
                found[name] = result
        return hook

    def pre_cross(module, args, kwargs):
        kwargs = dict(kwargs, need_weights=True, average_attn_weights=True)
        return args, kwargs

    def post_cross(name):
        def hook(module, args, output):
            weights = output[1][0]  # (Q, L), head-averaged
            height, width = hw_seen["grid"]
            found[name] = CrossMaps((height, width), weights.reshape(-1, height, width))
        return hook

    def post_layer(name, make):
        def hook(module, args, output):
            found[name] = make(module, args[0])
        return hook

    makers = {RGA_Module: lambda m, inp: _rga_maps(m, inp),
              RSA: lambda m, inp: _rsa_maps(m, inp, point, frame),
              MultiheadNonlocal2d: lambda m, inp: _rpa_maps(m, inp, point),
              SASAttention2d: lambda m, inp: _sasa_maps(m, inp, point),
              AttentionConv: lambda m, inp: _sasa_maps(m, inp, point)}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (RPEMultiheadAttention, RPEAttention)):
            handles.append(module.register_forward_pre_hook(pre_attention(name), with_kwargs=True))
        elif isinstance(module, nn.MultiheadAttention) and isinstance(model, DETR) and ".decoder." in f".{name}.":
            if name.endswith("multihead_attn"):
                handles.append(module.register_forward_pre_hook(pre_cross, with_kwargs=True))
                handles.append(module.register_forward_hook(post_cross(name)))
        elif type(module) in makers:
            handles.append(module.register_forward_hook(post_layer(name, makers[type(module)])))
    if handles and isinstance(model, GeneralizedRCNN):  # it resizes the images again: keep the size it made
        def resized(module, args, output):
            seen_size.append(tuple(int(v) for v in output[0].image_sizes[0]))
        seen_size: list = []
        handles.append(model.transform.register_forward_hook(resized))
    if not handles:
        raise ConfigError(f"{type(model).__name__} has no attention layer that zoo.viz knows "
                          "(iRPE, RGA_Module, RSA, MultiheadNonlocal2d, SASAttention2d, AttentionConv)")
    modes = [(module, module.training) for module in model.modules()]  # put back exactly as they were
    model.eval()
    try:
        if isinstance(model, (DETR, GeneralizedRCNN)):
            outputs = model([x])
        else:
            outputs = model(x[None])
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    maps.network_input_size = seen_size[0] if isinstance(model, GeneralizedRCNN) and seen_size else maps.input_size
    if isinstance(model, DETR):
        maps.detections = _detections({k: v.float().cpu() for k, v in outputs.items() if k != "aux_outputs"},
                                      maps.input_size)
    maps.layers = {name: _to_cpu(m) for name, m in found.items()}
    return maps


def _to_cpu(maps):
    for key, value in vars(maps).items():
        if isinstance(value, Tensor):
            setattr(maps, key, value.detach().float().cpu() if value.is_floating_point() else value.cpu())
        elif isinstance(value, dict):
            setattr(maps, key, {k: (v.detach().cpu() if isinstance(v, Tensor) else v) for k, v in value.items()})
    return maps
