"""DeiT with iRPE (microsoft/Cream ``iRPE/DeiT-with-iRPE``), spec ``irpe.md`` §7.

A timm-0.3.2 ``VisionTransformer`` (the layout DeiT's checkpoints use) whose attention is
:class:`zoo.layers.irpe.RPEAttention`. Keys: ``cls_token``, ``pos_embed``,
``patch_embed.proj.*``, ``blocks.{i}.{norm1, attn.qkv, attn.proj, attn.rpe_{q,k,v}, norm2,
mlp.fc1, mlp.fc2}.*``, ``norm.*``, ``head.*`` — the released checkpoints'
``checkpoint['model']`` loads through the ``irpe-deit`` conversion (which only unwraps it).

Tokens: 1 class token + (224/16)^2 = 196 patches; iRPE treats the class token as a skip
token (one extra bucket) and the patches as a 14 x 14 grid. The absolute position
embedding is kept, as in the original. Lookup tables start at zero (no re-init, unlike DETR).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from zoo.convert import register_hook
from zoo.errors import ArgumentError, ConfigError
from zoo.layers.irpe import RPEAttention, get_rpe_config
from zoo.models._features import FeaturePoint
from zoo.models._head import classifier_layer
from zoo.models._inputs import check_batch
from zoo.registry import register_model

__all__ = ["VisionTransformer", "deit_rpe_config"]


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout; (B, N, D) -> (B, N, D)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth per sample (training only), with inverted scaling."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)); (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 rpe_config=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RPEAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                                 proj_drop=drop, rpe_config=rpe_config)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided conv: (B, 3, H, W) -> (B, H/p * W/p, D)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        if img_size % patch_size:
            raise ConfigError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        check_batch(x, model="VisionTransformer", layout=f"(B, {self.proj.in_channels}, {self.img_size}, {self.img_size})",
                    rank=4, channels=self.proj.in_channels, dtype=self.proj.weight.dtype,
                    size=(self.img_size, self.img_size))
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT/DeiT classifier with iRPE attention in every block (same rpe_config for all).

    Args: img_size, patch_size, in_chans, num_classes (0: no head, the model returns the pooled
    features), embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
    drop_path_rate (linearly increasing over blocks), rpe_config (from
    :func:`zoo.layers.irpe.get_rpe_config` with skip=1, or None), global_pool (``'token'``: the class
    token, the original's; ``'avg'``: the mean of the patch tokens, timm's other choice).
    Input (B, in_chans, img_size, img_size) -> logits (B, num_classes).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, rpe_config=None,
                 global_pool: str = "token"):
        super().__init__()
        self.num_classes = num_classes
        self.global_pool = _check_token_pool(global_pool)
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, rates[i], rpe_config)
            for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = classifier_layer(embed_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the class token and the patch tokens with their position embedding (B, 1 + N, D)."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> every token's final (normed) features (B, 1 + N, embed_dim), the class token first."""
        x = self._tokens(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The tokens -> the class token (``global_pool`` 'token') or the patch tokens' mean ('avg'), (B, D),
        then the head."""
        x = x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head for ``num_classes`` (0: none), and optionally another pooling ('token' or 'avg')."""
        if global_pool is not None:
            self.global_pool = _check_token_pool(global_pool)
        self.head = classifier_layer(self.embed_dim, num_classes)
        self.num_classes = num_classes

    # -- backbone (zoo.models._features): every block's patch tokens as a (B, D, H / p, W / p) map --
    feature_head = ("norm", "head")

    def feature_points(self) -> list[FeaturePoint]:
        return [FeaturePoint(f"blocks.{i}", self.embed_dim, self.patch_embed.patch_size) for i in range(len(self.blocks))]

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """(B, C, H, W) -> the outputs of the blocks ``indices`` (class token dropped, not normed), each
        reshaped to (B, embed_dim, H / patch_size, W / patch_size)."""
        grid = self.patch_embed.img_size // self.patch_embed.patch_size
        x = self._tokens(x)
        maps = []
        for block in self.blocks[:max(indices) + 1]:
            x = block(x)
            maps.append(x[:, 1:].transpose(1, 2).reshape(x.shape[0], self.embed_dim, grid, grid))
        return [maps[i] for i in indices]


def _check_token_pool(global_pool: str) -> str:
    if global_pool not in ("token", "avg"):
        raise ConfigError(f"global_pool must be 'token' (the class token) or 'avg' (the patch tokens' mean), "
                          f"got {global_pool!r}")
    return global_pool


def deit_rpe_config(ratio: float = 1.9, method: str = "product", rpe_on: str = "k"):
    """The released models' iRPE: contextual, shared heads, skip 1 (class token)."""
    return get_rpe_config(ratio=ratio, method=method, mode="ctx", shared_head=True, skip=1, rpe_on=rpe_on)


_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}


def _deit(size: str, ratio: float, method: str, rpe_on: str, **kwargs) -> VisionTransformer:
    embed_dim, num_heads = _SIZES[size]
    kwargs.setdefault("embed_dim", embed_dim)
    kwargs.setdefault("num_heads", num_heads)
    if "rpe_config" in kwargs:
        raise ArgumentError("this registered model fixes its iRPE; build VisionTransformer(rpe_config=...) for another")
    return VisionTransformer(patch_size=16, rpe_config=deit_rpe_config(ratio, method, rpe_on), **kwargs)


# Released checkpoints (ratio 1.9 product: 7x7 + 1 cls bucket = 50).

@register_model
def deit_tiny_patch16_224_ctx_product_50_shared_k(**kwargs) -> VisionTransformer:
    """DeiT-Ti + iRPE (product, contextual, shared, on keys)."""
    return _deit("tiny", 1.9, "product", "k", **kwargs)


@register_model
def deit_small_patch16_224_ctx_product_50_shared_k(**kwargs) -> VisionTransformer:
    """DeiT-S + iRPE (product, contextual, shared, on keys)."""
    return _deit("small", 1.9, "product", "k", **kwargs)


@register_model
def deit_small_patch16_224_ctx_product_50_shared_qk(**kwargs) -> VisionTransformer:
    """DeiT-S + iRPE (product, contextual, shared, on queries and keys)."""
    return _deit("small", 1.9, "product", "qk", **kwargs)


@register_model
def deit_small_patch16_224_ctx_product_50_shared_qkv(**kwargs) -> VisionTransformer:
    """DeiT-S + iRPE (product, contextual, shared, on queries, keys and values)."""
    return _deit("small", 1.9, "product", "qkv", **kwargs)


@register_model
def deit_base_patch16_224_ctx_product_50_shared_k(**kwargs) -> VisionTransformer:
    """DeiT-B + iRPE (product, contextual, shared, on keys)."""
    return _deit("base", 1.9, "product", "k", **kwargs)


@register_model
def deit_base_patch16_224_ctx_product_50_shared_qkv(**kwargs) -> VisionTransformer:
    """DeiT-B + iRPE (product, contextual, shared, on queries, keys and values)."""
    return _deit("base", 1.9, "product", "qkv", **kwargs)


# Defined by the original without released weights (names count buckets used at 14x14 + cls).

@register_model
def deit_small_patch16_224_ctx_euc_20_shared_k(**kwargs) -> VisionTransformer:
    """DeiT-S + iRPE (euclidean, ratio 20, contextual, shared, on keys); no released weights."""
    return _deit("small", 20, "euc", "k", **kwargs)


@register_model
def deit_small_patch16_224_ctx_quant_51_shared_k(**kwargs) -> VisionTransformer:
    """DeiT-S + iRPE (quantized, ratio 33, contextual, shared, on keys); no released weights."""
    return _deit("small", 33, "quant", "k", **kwargs)


@register_model
def deit_small_patch16_224_ctx_cross_56_shared_k(**kwargs) -> VisionTransformer:
    """DeiT-S + iRPE (cross, ratio 20, contextual, shared, on keys); no released weights."""
    return _deit("small", 20, "cross", "k", **kwargs)


# Conversion hooks (convert/irpe-deit.yaml): the original's main.py saves its argparse args.

def _args(checkpoint) -> dict:
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if args is None:
        return {}
    return dict(vars(args)) if hasattr(args, "__dict__") else dict(args)


@register_hook
def model_from_checkpoint(checkpoint) -> Optional[str]:
    """``model_name`` hook: the timm model name the run trained (``args.model``), or None."""
    name = _args(checkpoint).get("model")
    return name if isinstance(name, str) else None


@register_hook
def kwargs_from_checkpoint(checkpoint) -> dict:
    """``model_kwargs`` hook: ``num_classes`` (``args.nb_classes``) and ``img_size`` (``args.input_size``)
    where the run recorded them."""
    args = _args(checkpoint)
    kwargs = {}
    if isinstance(args.get("nb_classes"), int):
        kwargs["num_classes"] = args["nb_classes"]
    if isinstance(args.get("input_size"), int):
        kwargs["img_size"] = args["input_size"]
    return kwargs
