"""DETR with iRPE in the encoder (microsoft/Cream ``iRPE/DETR-with-iRPE``), spec ``irpe.md`` §5.

Module tree and state_dict keys are the original's (``backbone.0.body.*`` torchvision ResNet
with frozen BN, ``input_proj``, ``query_embed``, ``transformer.{encoder,decoder}.*``,
``class_embed``, ``bbox_embed.layers.*``; iRPE tables at
``transformer.encoder.layers.{i}.self_attn.rpe_{q,k,v}.*``), so ``checkpoint['model']`` of
the released files loads after the ``irpe-detr`` conversion (which only unwraps it).

Pipeline: images (list of 3 x H_i x W_i, normalised) -> zero-padded batch + mask -> ResNet-50
layer4 (stride 32) -> 1x1 input_proj to ``hidden_dim`` -> sine position embedding -> encoder
(self-attention with iRPE on the padded h x w grid) -> decoder with ``num_queries`` learned
queries -> class logits (num_classes + 1, last = no object) and sigmoid boxes (cx, cy, w, h)
relative to each image's own unpadded size.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert

from zoo.convert import register_hook
from zoo.errors import ConfigError, ConversionError, InputError
from zoo.layers.irpe import RPEMultiheadAttention, rpe_config_from_spec
from zoo.models._features import FeaturePoint
from zoo.models._inputs import check_batch, weight_dtype
from zoo.models.resnet import FrozenBatchNorm2d, ResNet, freeze_stages, load_imagenet_resnet50
from zoo.registry import register_model

__all__ = ["DETR", "PostProcess", "PositionEmbeddingSine", "Transformer", "nested_tensor_from_tensor_list",
           "kwargs_from_checkpoint", "detr_r50_irpe", "detr_r50_irpe_product_ctx_7x7",
           "detr_r50_irpe_product_ctx_9x9", "detr_irpe_mini"]


# --------------------------------------------------------------------------------------
# Batching and boxes
# --------------------------------------------------------------------------------------

def nested_tensor_from_tensor_list(images: Sequence[torch.Tensor], channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``channels`` x H_i x W_i images at the bottom/right to the batch's max size.

    Returns (batch (B, channels, H, W), mask (B, H, W) bool, True = padding).
    """
    if len(images) == 0:
        raise InputError("DETR got an empty list of images")
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != channels:
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise InputError(f"DETR expects images of shape ({channels}, H, W); image {i} is {shape}")
    h = max(img.shape[1] for img in images)
    w = max(img.shape[2] for img in images)
    first = images[0]
    batch = first.new_zeros(len(images), channels, h, w)
    mask = torch.ones(len(images), h, w, dtype=torch.bool, device=first.device)
    for img, pad_img, m in zip(images, batch, mask):
        pad_img[:, :img.shape[1], :img.shape[2]].copy_(img)
        m[:img.shape[1], :img.shape[2]] = False
    return batch, mask


class PostProcess(nn.Module):
    """DETR outputs -> per-image detections in pixels of the ORIGINAL image (all queries kept, no NMS).

    ``forward(outputs, target_sizes)``: ``target_sizes`` (B, 2) = [height, width] per image.
    Returns a list of B dicts: ``scores`` (Q,), ``labels`` (Q,) (argmax over the real classes,
    the no-object logit is excluded), ``boxes`` (Q, 4) xyxy in pixels.
    """

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: torch.Tensor) -> list[dict]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        target_sizes = torch.as_tensor(target_sizes, device=logits.device)
        if target_sizes.shape != (logits.shape[0], 2):
            raise InputError(f"target_sizes must be (B, 2) = ({logits.shape[0]}, 2) [h, w], got {tuple(target_sizes.shape)}")
        prob = F.softmax(logits, -1)
        scores, labels = prob[..., :-1].max(-1)
        img_h, img_w = target_sizes.unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1).to(boxes.dtype)
        xyxy = box_convert(boxes, "cxcywh", "xyxy") * scale[:, None, :]
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, xyxy)]


# --------------------------------------------------------------------------------------
# Backbone and position embedding
# --------------------------------------------------------------------------------------

class PositionEmbeddingSine(nn.Module):
    """Sine embedding of (y, x) with 2 * num_pos_feats channels, [pos_y, pos_x] (spec §5.2).

    With ``normalize`` the cumulative counts of valid pixels are divided by each image's own
    valid extent (+1e-6) and scaled to [0, scale]. mask (B, H, W) bool True = pad ->
    (B, 2 * num_pos_feats, H, W).
    """

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000, normalize: bool = False,
                 scale: Optional[float] = None):
        super().__init__()
        if scale is not None and not normalize:
            raise ConfigError("PositionEmbeddingSine: scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        not_mask = ~mask
        y = not_mask.cumsum(1, dtype=torch.float32)
        x = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y = y / (y[:, -1:, :] + eps) * self.scale
            x = x / (x[:, :, -1:] + eps) * self.scale
        k = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x[:, :, :, None] / dim_t
        pos_y = y[:, :, :, None] / dim_t
        # even channels sin, odd channels cos, interleaved
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class _Backbone(nn.Module):
    """Holds the ResNet as ``body`` (keys ``body.*``); returns layer4 features and the resized mask."""

    def __init__(self, body: ResNet, trainable_layers: int = 3):
        super().__init__()
        self.body = body
        self.num_channels = body.out_channels
        # The original trains layer2-4 only (3); stem and layer1 stay frozen (requires_grad False).
        freeze_stages(body, trainable_layers)

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        features = self.body.forward_features(images)
        # nearest resize of the pixel mask to the feature grid (F.interpolate's default mode)
        feature_mask = F.interpolate(mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
        return features, feature_mask


class _Joiner(nn.Sequential):
    """``[backbone, position_embedding]`` as in the original, so keys read ``backbone.0.body.*``."""

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        features, feature_mask = self[0](images, mask)
        pos = self[1](feature_mask).to(features.dtype)
        return features, feature_mask, pos


# --------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------

def _activation(name: str):
    table = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
    if name not in table:
        raise ConfigError(f"activation must be one of {sorted(table)}, got '{name}'")
    return table[name]


def _with_pos(x: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    return x if pos is None else x + pos


class TransformerEncoderLayer(nn.Module):
    """Self-attention (``RPEMultiheadAttention``, iRPE on the h x w grid) + FFN; post-norm unless ``normalize_before``.

    src / pos: (L, B, d_model); returns (L, B, d_model).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False, rpe_config=None):
        super().__init__()
        self.self_attn = RPEMultiheadAttention(d_model, nhead, dropout=dropout, rpe_config=rpe_config)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def _ffn(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(self, src, src_mask=None, src_key_padding_mask=None, pos=None, hw=None):
        if self.normalize_before:
            x = self.norm1(src)
            q = k = _with_pos(x, pos)
            src = src + self.dropout1(self.self_attn(q, k, x, attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
                                                     need_weights=False, hw=hw)[0])
            return src + self.dropout2(self._ffn(self.norm2(src)))
        q = k = _with_pos(src, pos)  # position only on queries and keys
        src2 = self.self_attn(q, k, src, attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
                              need_weights=False, hw=hw)[0]  # the original computed and discarded the weights
        src = self.norm1(src + self.dropout1(src2))
        return self.norm2(src + self.dropout2(self._ffn(src)))


class TransformerDecoderLayer(nn.Module):
    """Self-attention over queries, cross-attention to the memory, FFN (plain ``nn.MultiheadAttention``).

    tgt / query_pos: (Q, B, d); memory / pos: (L, B, d); returns (Q, B, d).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def _ffn(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, pos=None, query_pos=None):
        def self_block(x):
            q = k = _with_pos(x, query_pos)
            return self.self_attn(q, k, x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask,
                                  need_weights=False)[0]

        def cross_block(x):
            return self.multihead_attn(_with_pos(x, query_pos), _with_pos(memory, pos), memory, attn_mask=memory_mask,
                                       key_padding_mask=memory_key_padding_mask, need_weights=False)[0]

        if self.normalize_before:
            tgt = tgt + self.dropout1(self_block(self.norm1(tgt)))
            tgt = tgt + self.dropout2(cross_block(self.norm2(tgt)))
            return tgt + self.dropout3(self._ffn(self.norm3(tgt)))
        tgt = self.norm1(tgt + self.dropout1(self_block(tgt)))
        tgt = self.norm2(tgt + self.dropout2(cross_block(tgt)))
        return self.norm3(tgt + self.dropout3(self._ffn(tgt)))


class TransformerEncoder(nn.Module):
    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None):
        super().__init__()
        # deep copies: each layer has its own weights and its own iRPE tables
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src, mask=None, src_key_padding_mask=None, pos=None, hw=None):
        out = src
        for layer in self.layers:
            out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, pos=pos, hw=hw)
        return self.norm(out) if self.norm is not None else out


class TransformerDecoder(nn.Module):
    def __init__(self, decoder_layer: nn.Module, num_layers: int, norm: nn.Module, return_intermediate: bool = True):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(decoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(self, tgt, memory, **kwargs) -> torch.Tensor:
        """Returns (num_layers, Q, B, d) normed outputs of every layer (or (1, Q, B, d) of the last)."""
        out = tgt
        intermediate = []
        for layer in self.layers:
            out = layer(out, memory, **kwargs)
            if self.return_intermediate:
                intermediate.append(self.norm(out))
        if self.return_intermediate:
            return torch.stack(intermediate)
        return self.norm(out).unsqueeze(0)


class Transformer(nn.Module):
    """DETR's encoder-decoder; ``enc_rpe2d`` (spec string, '' = none) puts iRPE in every encoder layer.

    ``forward(src (B, d, h, w), mask (B, h, w), query_embed (Q, d), pos_embed (B, d, h, w))``
    returns (hs (num_dec_layers, B, Q, d), memory (B, d, h, w)).
    """

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, activation: str = "relu",
                 normalize_before: bool = False, return_intermediate_dec: bool = False, enc_rpe2d: str = ""):
        super().__init__()
        rpe_config = rpe_config_from_spec(enc_rpe2d, skip=0)
        encoder_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation, normalize_before,
                                                rpe_config=rpe_config)
        self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers,
                                          nn.LayerNorm(d_model) if normalize_before else None)
        decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, nn.LayerNorm(d_model),
                                          return_intermediate=return_intermediate_dec)
        self._reset_parameters()
        self.d_model = d_model
        self.nhead = nhead

    def _reset_parameters(self) -> None:
        # Like the original this includes the iRPE lookup tables (so DETR's tables start non-zero).
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src, mask, query_embed, pos_embed):
        B, C, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)  # (h*w, B, C), row-major tokens
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        query_embed = query_embed.unsqueeze(1).repeat(1, B, 1)
        mask = mask.flatten(1)
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed, hw=(h, w))
        hs = self.decoder(torch.zeros_like(query_embed), memory, memory_key_padding_mask=mask, pos=pos_embed,
                          query_pos=query_embed)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).reshape(B, C, h, w)


class MLP(nn.Module):
    """Linear layers with ReLU between them (``layers.{i}`` keys)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [hidden_dim] * (num_layers - 1)
        self.num_layers = num_layers
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + dims, dims + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


# --------------------------------------------------------------------------------------
# DETR
# --------------------------------------------------------------------------------------

class DETR(nn.Module):
    """DETR detector (Carion et al.) as in DETR-with-iRPE.

    Call ``model(images)`` with a list of normalised 3 x H_i x W_i tensors (sizes may differ)
    or one such tensor, or ``model(batch, mask)`` with a padded (B, 3, H, W) batch and its (B, H, W) bool mask
    (True = padding; None = no padding). Returns ``pred_logits`` (B, Q, num_classes + 1),
    ``pred_boxes`` (B, Q, 4) normalised (cx, cy, w, h), and with ``aux_loss``
    ``aux_outputs`` (list of the same for the first num_dec_layers - 1 decoder layers).
    ``return_intermediates=True`` adds ``intermediates``: backbone_features, feature_mask,
    pos_embed, encoder_memory (B, d, h, w) and decoder_hs (num_dec_layers, B, Q, d).
    ``get_classifier`` / ``reset_classifier(num_classes)``: the class embedding; as a backbone
    (:mod:`zoo.models._features`) the ResNet body's maps of a padded batch.
    """

    def __init__(self, backbone: nn.Module, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool = False):
        super().__init__()
        self.num_queries = num_queries
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.num_classes = num_classes
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone[0].num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss

    @property
    def in_chans(self) -> int:
        return self.backbone[0].body.in_chans

    def get_classifier(self) -> nn.Module:
        return self.class_embed

    def reset_classifier(self, num_classes: int) -> None:
        """A new class embedding for ``num_classes`` ids (+ the no-object logit)."""
        _check_positive(num_classes=num_classes)
        self.class_embed = nn.Linear(self.transformer.d_model, num_classes + 1)
        self.num_classes = num_classes

    # -- backbone (zoo.models._features): the ResNet body's maps --
    feature_head = ("transformer", "class_embed", "bbox_embed", "query_embed", "input_proj")

    def feature_points(self) -> list[FeaturePoint]:
        return [dataclasses.replace(p, module=f"backbone.0.body.{p.module}")
                for p in self.backbone[0].body.feature_points()]

    def forward_intermediates(self, images: Union[Sequence[torch.Tensor], torch.Tensor],
                              indices: Sequence[int]) -> list[torch.Tensor]:
        """A (B, 3, H, W) batch or a list of (3, H_i, W_i) images (zero-padded into one) -> the body's maps."""
        batch, _ = self._batch(images, None)
        return self.backbone[0].body.forward_intermediates(batch, indices)

    def _batch(self, images, mask):
        """The model's inputs (see the class docstring) -> (batch (B, C, H, W), mask (B, H, W) bool).

        Each image is checked first (:mod:`zoo.models._inputs`): C channels, the weights' floating dtype
        (not cast here), at least the backbone's total stride in height and width."""
        channels = self.in_chans
        layout = f"(B, {channels}, H, W), ({channels}, H, W) or a list of ({channels}, H, W) images"
        checks = dict(model="DETR", layout=layout, channels=channels, dtype=weight_dtype(self),
                      min_size=self.backbone[0].body.feature_points()[-1].reduction)
        if isinstance(images, torch.Tensor) and images.dim() == 3:
            images = [images]  # one image
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            check_batch(images, rank=4, **checks)
            batch = images
            if mask is None:
                mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device)
            elif tuple(mask.shape) != (images.shape[0], *images.shape[2:]):
                raise InputError(f"mask must be (B, H, W) = {(images.shape[0], *images.shape[2:])}, got {tuple(mask.shape)}")
            mask = mask.bool()
        elif isinstance(images, torch.Tensor):
            raise InputError(f"DETR expects {layout}, got {tuple(images.shape)}")
        else:
            if mask is not None:
                raise InputError("mask is only given with a padded batch tensor; a list of images is padded here")
            images = list(images)
            for image in images:
                check_batch(image, rank=3, channel_dim=0, **checks)
            if not images:  # an empty batch: empty outputs (forward)
                weight = self.class_embed.weight
                return (weight.new_zeros(0, channels, checks["min_size"], checks["min_size"]),
                        torch.zeros(0, checks["min_size"], checks["min_size"], dtype=torch.bool, device=weight.device))
            batch, mask = nested_tensor_from_tensor_list(images, channels)
        return batch, mask

    def _empty_outputs(self, batch: torch.Tensor) -> dict:
        """What :meth:`forward` returns for a batch of no images: every output with batch size 0."""
        logits = batch.new_zeros(0, self.num_queries, self.num_classes + 1)
        boxes = batch.new_zeros(0, self.num_queries, 4)
        out = {"pred_logits": logits, "pred_boxes": boxes}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": logits, "pred_boxes": boxes}
                                  for _ in range(len(self.transformer.decoder.layers) - 1)]
        return out

    def forward(self, images: Union[Sequence[torch.Tensor], torch.Tensor], mask: Optional[torch.Tensor] = None,
                return_intermediates: bool = False) -> dict:
        batch, mask = self._batch(images, mask)
        if batch.shape[0] == 0:
            if return_intermediates:
                raise InputError("DETR: return_intermediates needs at least one image")
            return self._empty_outputs(batch)
        features, feature_mask, pos = self.backbone(batch, mask)
        hs, memory = self.transformer(self.input_proj(features), feature_mask, self.query_embed.weight, pos)
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        if return_intermediates:
            out["intermediates"] = {"backbone_features": features, "feature_mask": feature_mask, "pos_embed": pos,
                                    "encoder_memory": memory, "decoder_hs": hs}
        return out


def _check_positive(**values) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")


def build_detr(*, num_classes: int = 91, hidden_dim: int = 256, nheads: int = 8, enc_layers: int = 6,
               dec_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1, num_queries: int = 100,
               pre_norm: bool = False, enc_rpe2d: str = "", aux_loss: bool = True, backbone_width_div: int = 1,
               backbone_layers: Sequence[int] = (3, 4, 6, 3), dilation: bool = False,
               position_embedding: str = "sine", pretrained_backbone: bool = False, frozen_bn: bool = True,
               trainable_backbone_layers: int = 3, in_chans: int = 3) -> DETR:
    """DETR from the original ``main.py`` argument names (see :func:`detr_r50_irpe`).

    ``frozen_bn`` and ``trainable_backbone_layers`` (0..5 of conv1, layer1..4) are ours: the
    original freezes every BN and trains layer2-4 of an ImageNet backbone (True, 3); a model
    trained from scratch needs ordinary BatchNorm and every stage (False, 5). ``in_chans``: input
    channels (3: RGB).
    """
    _check_positive(num_classes=num_classes, hidden_dim=hidden_dim, nheads=nheads, enc_layers=enc_layers,
                    dec_layers=dec_layers, dim_feedforward=dim_feedforward, num_queries=num_queries,
                    backbone_width_div=backbone_width_div)
    if hidden_dim % nheads:
        raise ConfigError(f"hidden_dim ({hidden_dim}) must be divisible by nheads ({nheads})")
    if position_embedding not in ("sine", "v2"):
        raise ConfigError(f"position_embedding '{position_embedding}' is not supported (only 'sine', alias 'v2')")
    body = ResNet(layers=tuple(backbone_layers), width_div=backbone_width_div,
                  norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d,
                  replace_stride_with_dilation=(False, False, bool(dilation)), in_chans=in_chans)
    if pretrained_backbone:
        load_imagenet_resnet50(body)
    backbone = _Joiner(_Backbone(body, trainable_backbone_layers), PositionEmbeddingSine(hidden_dim // 2, normalize=True))
    transformer = Transformer(d_model=hidden_dim, nhead=nheads, num_encoder_layers=enc_layers,
                              num_decoder_layers=dec_layers, dim_feedforward=dim_feedforward, dropout=dropout,
                              normalize_before=pre_norm, return_intermediate_dec=True, enc_rpe2d=enc_rpe2d or "")
    return DETR(backbone, transformer, num_classes=num_classes, num_queries=num_queries, aux_loss=aux_loss)


# --------------------------------------------------------------------------------------
# Registered models
# --------------------------------------------------------------------------------------

@register_model
def detr_r50_irpe(enc_rpe2d: Optional[str] = None, rpe: Optional[str] = None, **kwargs) -> DETR:
    """DETR-R50 with iRPE in the encoder; ``enc_rpe2d`` (alias ``rpe``) is any spec string, '' = plain DETR.

    Other kwargs use the original ``main.py`` names: num_classes (91 -> 92 logits), hidden_dim,
    nheads, enc_layers, dec_layers, dim_feedforward, dropout, num_queries, pre_norm, aux_loss,
    dilation, position_embedding; plus backbone_width_div / backbone_layers for reduced or
    ResNet-101 backbones, pretrained_backbone (ImageNet ResNet-50), and frozen_bn /
    trainable_backbone_layers (see :func:`build_detr`).
    """
    if enc_rpe2d is not None and rpe is not None and enc_rpe2d != rpe:
        raise ConfigError(f"enc_rpe2d='{enc_rpe2d}' and its alias rpe='{rpe}' disagree; give one")
    spec = enc_rpe2d if enc_rpe2d is not None else rpe
    return build_detr(enc_rpe2d="rpe-2.0-product-ctx-1-k" if spec is None else spec, **kwargs)


@register_model
def detr_r50_irpe_product_ctx_7x7(**kwargs) -> DETR:
    """DETR-R50 + iRPE rpe-1.9-product-ctx-1-k (7x7 buckets, contextual on keys, shared heads)."""
    kwargs.setdefault("enc_rpe2d", "rpe-1.9-product-ctx-1-k")
    return detr_r50_irpe(**kwargs)


@register_model
def detr_r50_irpe_product_ctx_9x9(**kwargs) -> DETR:
    """DETR-R50 + iRPE rpe-2.0-product-ctx-1-k (9x9 buckets, contextual on keys, shared heads)."""
    kwargs.setdefault("enc_rpe2d", "rpe-2.0-product-ctx-1-k")
    return detr_r50_irpe(**kwargs)


#: RelZoo-mini DETR (issue 10): every layer of detr_r50_irpe_product_ctx_9x9, narrower and shallower.
_MINI = dict(enc_rpe2d="rpe-2.0-product-ctx-1-k", num_classes=4, hidden_dim=64, nheads=4, enc_layers=2,
             dec_layers=2, dim_feedforward=256, dropout=0.0, num_queries=12, aux_loss=True, backbone_width_div=8,
             backbone_layers=[1, 1, 1, 1], dilation=True, frozen_bn=False, trainable_backbone_layers=5)


@register_model
def detr_irpe_mini(**kwargs) -> DETR:
    """RelZoo-mini: DETR + iRPE (9x9 product buckets, contextual on keys) on a 1-1-1-1 block ResNet at
    1/8 width with a dilated layer4 (stride 16), trainable BatchNorm; d 64, 4 heads, 2 + 2 layers,
    12 queries, 3 classes (ids 1-3 of shapes-det, so num_classes 4)."""
    return detr_r50_irpe(**{**_MINI, **kwargs})


# --------------------------------------------------------------------------------------
# Conversion hook: original training checkpoints record their architecture in `args`
# --------------------------------------------------------------------------------------

_ARG_NAMES = ("hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward", "dropout", "num_queries",
              "pre_norm", "enc_rpe2d", "aux_loss", "dilation", "position_embedding")


@register_hook
def kwargs_from_checkpoint(checkpoint) -> dict:
    """Constructor kwargs of :func:`detr_r50_irpe` read from an original checkpoint's ``args`` Namespace.

    A checkpoint stripped to ``{'model': ...}`` has no ``args``: returns {} (the config's
    defaults, or kwargs given to the converter, describe the model). Backbones: 'resnet50',
    'resnet101' and reduced '<name>_div<N>' (width / N, as in the test fixture).
    """
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if args is None:
        return {}
    values = vars(args) if hasattr(args, "__dict__") else dict(args)
    kwargs = {name: values[name] for name in _ARG_NAMES if name in values}
    if kwargs.get("enc_rpe2d") is None and "enc_rpe2d" in kwargs:
        kwargs["enc_rpe2d"] = ""
    if values.get("masks"):
        raise ConversionError("checkpoint was trained with --masks (panoptic segmentation head), not supported")
    dataset = values.get("dataset_file", "coco")
    kwargs["num_classes"] = {"coco": 91, "coco_panoptic": 250}.get(dataset, 20)
    backbone = str(values.get("backbone", "resnet50"))
    match = re.search(r"_div(\d+)$", backbone)
    if match:
        kwargs["backbone_width_div"] = int(match.group(1))
        backbone = backbone[:match.start()].split("_")[-1]
    if backbone == "resnet101":
        kwargs["backbone_layers"] = [3, 4, 23, 3]
    elif backbone != "resnet50":
        raise ConversionError(f"checkpoint backbone '{values.get('backbone')}' is not supported "
                              "(resnet50, resnet101 or a reduced '<name>_div<N>' ResNet-50)")
    return kwargs
