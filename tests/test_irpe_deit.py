"""DeiT + iRPE: layout and parameter counts of the released models (spec §7), conversion, attention cross-check."""
from __future__ import annotations

import argparse

import pytest
import torch

import zoo
from zoo.layers.irpe import RPEAttention, RPEMultiheadAttention, get_rpe_config
from zoo.models.deit import VisionTransformer, deit_rpe_config

# spec §7 table: name -> (#params in M, top-1, top-5)
RELEASED = {
    "deit_tiny_patch16_224_ctx_product_50_shared_k": (5.76, 73.7, 92.0),
    "deit_small_patch16_224_ctx_product_50_shared_k": (22.09, 80.9, 95.4),
    "deit_small_patch16_224_ctx_product_50_shared_qk": (22.13, 81.0, 95.5),
    "deit_small_patch16_224_ctx_product_50_shared_qkv": (22.17, 81.2, 95.5),
    "deit_base_patch16_224_ctx_product_50_shared_k": (86.61, 82.3, 95.9),
    "deit_base_patch16_224_ctx_product_50_shared_qkv": (86.68, 82.8, 96.1),
}
UNRELEASED = ["deit_small_patch16_224_ctx_euc_20_shared_k", "deit_small_patch16_224_ctx_quant_51_shared_k",
              "deit_small_patch16_224_ctx_cross_56_shared_k"]


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_models_params_and_registry(name):
    params_m, top1, top5 = RELEASED[name]
    with torch.device("meta"):
        model = zoo.create_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == params_m
    cfg = zoo.model_info(name)
    entry = cfg.weights["imagenet"]
    assert entry.source == f"https://github.com/wkcn/iRPE-model-zoo/releases/download/1.0/{name}.pth"
    assert entry.converter == "irpe-deit" and entry.sha256 is None
    assert {r.metric: r.value for r in cfg.reported} == {"top1": top1, "top5": top5}


def test_unreleased_models_registered_without_weights():
    for name in UNRELEASED:
        cfg = zoo.model_info(name)
        assert cfg.weights == {} and cfg.default_weights is None
    with torch.device("meta"):
        cross = zoo.create_model(UNRELEASED[2])
        quant = zoo.create_model(UNRELEASED[1])
    sd = cross.state_dict()
    assert sd["blocks.0.attn.rpe_k.rp_rows.lookup_table_weight"].shape == (1, 64, 82)
    assert sd["blocks.0.attn.rpe_k.rp_cols.lookup_table_weight"].shape == (1, 64, 82)
    assert quant.state_dict()["blocks.0.attn.rpe_k.lookup_table_weight"].shape == (1, 64, 134)


def test_base_key_layout_matches_spec():
    with torch.device("meta"):
        model = zoo.create_model("deit_base_patch16_224_ctx_product_50_shared_qkv")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    D = 768
    expected = {
        "cls_token": (1, 1, D), "pos_embed": (1, 197, D), "patch_embed.proj.weight": (D, 3, 16, 16),
        "patch_embed.proj.bias": (D,), "norm.weight": (D,), "norm.bias": (D,), "head.weight": (1000, D),
        "head.bias": (1000,),
    }
    for i in range(12):
        expected.update({
            f"blocks.{i}.norm1.weight": (D,), f"blocks.{i}.norm1.bias": (D,),
            f"blocks.{i}.attn.qkv.weight": (3 * D, D), f"blocks.{i}.attn.qkv.bias": (3 * D,),
            f"blocks.{i}.attn.proj.weight": (D, D), f"blocks.{i}.attn.proj.bias": (D,),
            f"blocks.{i}.attn.rpe_q.lookup_table_weight": (1, 64, 50),
            f"blocks.{i}.attn.rpe_k.lookup_table_weight": (1, 64, 50),
            f"blocks.{i}.attn.rpe_v.lookup_table_weight": (1, 50, 64),
            f"blocks.{i}.norm2.weight": (D,), f"blocks.{i}.norm2.bias": (D,),
            f"blocks.{i}.mlp.fc1.weight": (4 * D, D), f"blocks.{i}.mlp.fc1.bias": (4 * D,),
            f"blocks.{i}.mlp.fc2.weight": (D, 4 * D), f"blocks.{i}.mlp.fc2.bias": (D,),
        })
    assert shapes == expected
    assert model.norm.eps == 1e-6 and model.blocks[0].norm1.eps == 1e-6


def test_tiny_deit_converts_from_original_container(tmp_path):
    """A small DeiT-iRPE saved in the original training container converts and reloads exactly."""
    from zoo.factory import convert_checkpoint

    name = "deit_small_patch16_224_ctx_product_50_shared_qkv"
    small = dict(img_size=64, depth=2, embed_dim=32, num_heads=2, num_classes=10)
    torch.manual_seed(0)
    model = zoo.create_model(name, **small).eval()
    for n, p in model.named_parameters():
        if "lookup_table" in n:  # the original starts at zero; make the tables matter
            torch.nn.init.normal_(p, std=0.5)
    assert model.blocks[0].attn.rpe_k.num_buckets == 50  # 4x4 patches + cls
    src = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "optimizer": {}, "lr_scheduler": {}, "epoch": 299,
                "model_ema": None, "args": argparse.Namespace(model=name)}, src)
    out = convert_checkpoint(src, "irpe-deit", tmp_path / "out", model_name=name, model_kwargs=small)
    loaded = zoo.create_model(name, weights=str(out), **small)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="64, 64"):
        loaded(torch.randn(1, 3, 32, 32))


def test_rpe_attention_equals_rpe_multihead_attention():
    """The DeiT block and the DETR module implement the same spec §4 formula (cls token = skip token)."""
    torch.manual_seed(0)
    cfg = get_rpe_config(1.9, "product", "ctx", False, skip=1, rpe_on="qkv")
    deit_attn = RPEAttention(32, num_heads=4, qkv_bias=True, rpe_config=cfg).eval()
    for n, p in deit_attn.named_parameters():
        torch.nn.init.normal_(p, std=0.3)
    mha = RPEMultiheadAttention(32, 4, rpe_config=cfg).eval()
    sd = {"in_proj_weight": deit_attn.qkv.weight, "in_proj_bias": deit_attn.qkv.bias,
          "out_proj.weight": deit_attn.proj.weight, "out_proj.bias": deit_attn.proj.bias}
    sd.update({k: v for k, v in deit_attn.state_dict().items() if k.startswith("rpe_")})
    mha.load_state_dict(sd)
    x = torch.randn(2, 17, 32)  # 1 cls + 4x4
    ours = deit_attn(x)
    ref, _ = mha(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), hw=(4, 4))
    torch.testing.assert_close(ours, ref.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_zero_tables_equal_plain_vit():
    """With the original's zero init the iRPE terms vanish: same output as without RPE."""
    torch.manual_seed(0)
    kw = dict(img_size=32, depth=1, embed_dim=16, num_heads=2, num_classes=3)
    with_rpe = VisionTransformer(rpe_config=deit_rpe_config(rpe_on="qkv"), **kw).eval()
    plain = VisionTransformer(rpe_config=None, **kw).eval()
    plain.load_state_dict({k: v for k, v in with_rpe.state_dict().items() if "rpe_" not in k})
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(with_rpe(x), plain(x))
