"""iRPE layers against the original's golden fixtures (shared/fixtures/irpe: tables, irpe_*, mha_*)."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import fixture_dir, load_case
from zoo.layers import irpe
from zoo.layers.irpe import (METHOD, RPEAttention, RPEMultiheadAttention, build_rpe, get_bucket_ids_2d,
                             get_bucket_ids_2d_without_skip, get_rpe_config, iRPE, iRPE_Cross, parse_rpe_spec,
                             piecewise_index, rpe_config_from_spec)
from zoo.ops import rpe_index, rpe_index_reference

FAMILY = "irpe"


def _cases(prefix: str) -> list[str]:
    try:
        folder = fixture_dir(FAMILY)
    except pytest.skip.Exception:
        return []
    return sorted(p.stem for p in folder.glob(f"{prefix}*.json"))


IRPE_CASES = _cases("irpe_")
MHA_CASES = _cases("mha_")


def _close(actual, expected, atol, rtol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.fixture(params=["fast", "reference"])
def path(request, monkeypatch):
    """Run each case through the fast path (gather / scatter, native op if present) and the reference:
    RELZOO_OPS decides what every module's ``backend="auto"`` means."""
    monkeypatch.setenv("RELZOO_OPS", "auto" if request.param == "fast" else "reference")
    return request.param


# ---------------------------------------------------------------------------- tables

def test_piecewise_index_tables():
    _, t = load_case(FAMILY, "tables")
    offsets = t["piecewise.offsets"].long()
    for key in [k for k in t if k.startswith("piecewise.r")]:
        ratio = float(key[len("piecewise.r"):])
        got = piecewise_index(offsets, alpha=ratio, beta=2 * ratio, gamma=8 * ratio, dtype=torch.long)
        assert torch.equal(got, t[key].long()), f"{key}: {(got != t[key].long()).sum()} entries differ"
    # the input is not modified and odd symmetry holds
    assert torch.equal(offsets, t["piecewise.offsets"].long())


def test_bucket_id_tables():
    meta, t = load_case(FAMILY, "tables")
    keys = [k for k in t if k.startswith("buckets.")]
    assert len(keys) == 8
    for key in keys:
        parts = key.split(".")  # buckets, method, r<ratio with a dot>, h<H>w<W>, skip<s>
        method = parts[1]
        ratio = float(".".join(parts[2:-2])[1:])
        h, w = (int(x) for x in parts[-2][1:].split("w"))
        skip = int(parts[-1][len("skip"):])
        got, num_buckets = get_bucket_ids_2d(meta["method_ids"][method], h, w, skip, ratio, 2 * ratio, 8 * ratio)
        assert torch.equal(got, t[key].long()), f"{key}: {(got != t[key].long()).sum()} ids differ"
        info = meta["buckets"][key]
        assert got.unique().numel() == info["distinct_ids_used"]
        assert num_buckets == info["num_buckets_incl_skip"], key
        if skip == 0:  # the original's (bucket_ids, num_buckets, L)
            ids, without_skip, length = get_bucket_ids_2d_without_skip(meta["method_ids"][method], h, w, ratio,
                                                                       2 * ratio, 8 * ratio)
            assert torch.equal(ids, got) and (without_skip, length) == (num_buckets, h * w)
        cfg = get_rpe_config(ratio, {"cross_rows": "cross", "cross_cols": "cross"}.get(method, method),
                             "ctx", True, skip, "k")
        assert cfg.rpe_k.num_buckets == info["num_buckets_incl_skip"], key


def test_method_names_and_errors():
    assert get_rpe_config(2.0, "PRODUCT", "ctx").rpe_k.method == METHOD.PRODUCT
    assert get_rpe_config(2.0, "euc", "bias").rpe_k.mode == "bias"
    with pytest.raises(ValueError, match="unknown iRPE method"):
        get_rpe_config(2.0, "manhattan")
    with pytest.raises(ValueError, match="mode"):
        get_rpe_config(2.0, "product", "sum")
    with pytest.raises(ValueError, match="rpe_on"):
        get_rpe_config(2.0, "product", "ctx", rpe_on="x")
    with pytest.raises(ValueError, match="CROSS_ROWS"):
        get_bucket_ids_2d(METHOD.CROSS, 3, 3, 0, 1.9, 3.8, 15.2)
    with pytest.raises(NotImplementedError):
        build_rpe(get_rpe_config(1.9, "product", "bias", rpe_on="v"), 8, 4)


def test_spec_string_parser():
    assert parse_rpe_spec("rpe-2.0-product-ctx-1-k") == dict(ratio=2.0, method="product", mode="ctx",
                                                             shared_head=True, rpe_on="k")
    assert parse_rpe_spec("") is None and rpe_config_from_spec("") is None
    cfg = rpe_config_from_spec("rpe-1.9-Euc-bias-0-qkv".replace("qkv", "qk"))
    assert cfg.rpe_q is not None and cfg.rpe_v is None and cfg.rpe_k.shared_head is False
    for bad in ["rpe-2.0-product-ctx-1", "rpx-2.0-product-ctx-1-k", "rpe-two-product-ctx-1-k",
                "rpe-2.0-product-ctx-2-k", "rpe-2.0-product-ctx-1-kz", "rpe-2.0-diag-ctx-1-k"]:
        with pytest.raises(ValueError):
            parse_rpe_spec(bad)


# ---------------------------------------------------------------------------- one module

@pytest.mark.parametrize("case", IRPE_CASES)
def test_irpe_module_fixture(case, path):
    meta, t = load_case(FAMILY, case)
    c = meta["constructor"]
    rpe_on = "k" if c["transposed"] else "v"
    config = get_rpe_config(c["ratio"], c["method"], c["mode"], bool(c["shared_head"]), c["skip"], rpe_on)
    module = build_rpe(config, head_dim=c["head_dim"], num_heads=c["num_heads"])[1 if c["transposed"] else 2]
    assert isinstance(module, iRPE_Cross if c["method"] == "cross" else iRPE)
    module = module.double()
    params = {k[len("param."):]: v for k, v in t.items() if k.startswith("param.")}
    assert sorted(params) == sorted(meta["derived"]["param_names"]) == sorted(dict(module.named_parameters()))
    module.load_state_dict(params, strict=True)

    x = t["input"].clone().requires_grad_(True)
    out = module(x, height=meta["call"]["height"], width=meta["call"]["width"])
    tol = meta["tolerance"]
    _close(out, t["output"], tol["output"]["atol"], tol["output"]["rtol"], "output")
    out.backward(t["grad_output"])
    if "grad_input" in t:
        _close(x.grad, t["grad_input"], tol["grads"]["atol"], tol["grads"]["rtol"], "grad_input")
    for name, p in module.named_parameters():
        _close(p.grad, t[f"grad_param.{name}"], tol["grads"]["atol"], tol["grads"]["rtol"], f"grad {name}")

    # bucket ids exactly as the original's
    h, w = meta["call"]["height"], meta["call"]["width"]
    if "rp_bucket" in t:
        ids, _ = module._get_rp_bucket(x, h, w)
        assert torch.equal(ids, t["rp_bucket"])
    else:
        assert torch.equal(module.rp_rows._get_rp_bucket(x, h, w)[0], t["rp_bucket_rows"])
        assert torch.equal(module.rp_cols._get_rp_bucket(x, h, w)[0], t["rp_bucket_cols"])


def test_default_hw_is_floor_sqrt_and_skip_from_length():
    """Without height/width the map is floor(sqrt(L)) square; the rest are skip tokens (DeiT: 197 = 1 + 14*14)."""
    cfg = get_rpe_config(1.9, "product", "ctx", True, skip=1, rpe_on="k")
    m = build_rpe(cfg, head_dim=4, num_heads=2)[1]
    torch.nn.init.normal_(m.lookup_table_weight)
    x = torch.randn(1, 2, 17, 4)
    torch.testing.assert_close(m(x), m(x, height=4, width=4))
    assert m._get_rp_bucket(x)[0][0].eq(49).all()


def test_bucket_cache_keyed_by_length():
    """The original cached by (H, W, device) only; a changed skip count must not reuse stale ids."""
    cfg = get_rpe_config(1.9, "product", "ctx", True, skip=2, rpe_on="k")
    m = build_rpe(cfg, head_dim=4, num_heads=1)[1]
    a = m._get_rp_bucket(torch.zeros(1, 1, 9 + 1, 4), 3, 3)[0]
    b = m._get_rp_bucket(torch.zeros(1, 1, 9 + 2, 4), 3, 3)[0]
    assert a.shape == (10, 10) and b.shape == (11, 11)


def test_quant_ctx_native_index_fixed():
    """quant + ctx on q/k crashed in the original with the native op (int32 ids); ours builds int32 ids fine."""
    ids32 = irpe._cached_bucket_ids(METHOD.QUANT, 5, 7, 2, 2.5, 5.0, 20.0, torch.int32, "cpu")
    ids64, _ = get_bucket_ids_2d(METHOD.QUANT, 5, 7, 2, 2.5, 5.0, 20.0)
    assert ids32.dtype == torch.int32 and torch.equal(ids32.long(), ids64)


def test_index_paths_agree():
    """The original's pure-python flat gather, zoo.ops.rpe_index_reference (torch.gather) and zoo.ops.rpe_index
    (the native op when present) give the same values and grads."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 10, (12, 12))
    ref = x.flatten(2)[:, :, idx + torch.arange(12).view(-1, 1) * 10]  # flat ids index[i, j] + i * nb
    g = torch.randn_like(ref)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    for fast in (rpe_index_reference(x, idx), rpe_index(x, idx.int())):
        (gx_fast,) = torch.autograd.grad(fast, x, g)
        assert torch.equal(ref, fast)
        torch.testing.assert_close(gx_ref, gx_fast, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------- attention

@pytest.mark.parametrize("case", MHA_CASES)
def test_rpe_multihead_attention_fixture(case, path):
    meta, t = load_case(FAMILY, case)
    c = meta["constructor"]
    attn = RPEMultiheadAttention(c["embed_dim"], c["num_heads"], dropout=c["dropout"], bias=c["bias"],
                                 rpe_config=rpe_config_from_spec(meta["spec"]))
    params = {k[len("param."):]: v for k, v in t.items() if k.startswith("param.")}
    assert sorted(params) == sorted(attn.state_dict()) == sorted(meta["param_names"])
    attn.load_state_dict(params, strict=True)
    attn.eval()
    query = t["query"].clone().requires_grad_(True)
    value = t["value"].clone().requires_grad_(True)
    out, weights = attn(query, query, value, key_padding_mask=t["key_padding_mask"].bool(), hw=tuple(meta["hw"]))
    tol = meta["tolerance"]
    _close(out, t["output"], tol["output"]["atol"], tol["output"]["rtol"], "output")
    _close(weights, t["attn_weights"], tol["attn_weights"]["atol"], tol["attn_weights"]["rtol"], "attn_weights")
    (out * t["grad_output"]).sum().backward()
    g = tol["grads"]
    _close(query.grad, t["grad_query"], g["atol"], g["rtol"], "grad_query")
    _close(value.grad, t["grad_value"], g["atol"], g["rtol"], "grad_value")
    for name, p in attn.named_parameters():
        _close(p.grad, t[f"grad_param.{name}"], g["atol"], g["rtol"], f"grad {name}")


def test_rpe_attention_without_rpe_equals_torch_mha():
    torch.manual_seed(0)
    ours = RPEMultiheadAttention(16, 4, rpe_config=None).eval()
    ref = torch.nn.MultiheadAttention(16, 4).eval()
    ref.load_state_dict(ours.state_dict())
    q, kv = torch.randn(5, 2, 16), torch.randn(7, 2, 16)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 5:] = True
    o1, w1 = ours(q, kv, kv, key_padding_mask=mask)
    o2, w2 = ref(q, kv, kv, key_padding_mask=mask)
    torch.testing.assert_close(o1, o2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w1, w2, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["cross", "euc", "quant"])
def test_rpe_multihead_attention_other_methods(method):
    """cross crashed the original's __init__; all methods and q/k/v combinations run, padding-invariant."""
    torch.manual_seed(0)
    attn = RPEMultiheadAttention(16, 2, rpe_config=get_rpe_config(1.9, method, "ctx", False, 0, "qkv")).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3 * 4, 1, 16)
    out, _ = attn(x, x, x, hw=(3, 4))
    # the same 3x4 image padded to 5x6: valid tokens' outputs must not change
    grid = torch.zeros(5, 6, 1, 16)
    grid[:3, :4] = x.view(3, 4, 1, 16)
    mask = torch.ones(1, 5, 6, dtype=torch.bool)
    mask[:, :3, :4] = False
    out_pad, _ = attn(grid.view(30, 1, 16), grid.view(30, 1, 16), grid.view(30, 1, 16),
                      key_padding_mask=mask.view(1, 30), hw=(5, 6))
    torch.testing.assert_close(out_pad.view(5, 6, 1, 16)[:3, :4].reshape(12, 1, 16), out, atol=1e-5, rtol=1e-5)


def test_rpe_multihead_attention_errors():
    attn = RPEMultiheadAttention(16, 2, rpe_config=rpe_config_from_spec("rpe-2.0-product-ctx-1-k"))
    x = torch.randn(12, 1, 16)
    with pytest.raises(ValueError, match="self-attention"):
        attn(x, x[:6], x[:6], hw=(3, 4))
    with pytest.raises(ValueError, match="hw"):
        attn(x, x, x, hw=(4, 4))
    with pytest.raises(ValueError, match="divisible"):
        RPEMultiheadAttention(15, 2)
    with pytest.raises(ValueError, match="iRPE"):
        RPEMultiheadAttention(16, 2, add_bias_kv=True, rpe_config=rpe_config_from_spec("rpe-2.0-product-ctx-1-k"))


def test_deepcopy_keeps_tables_independent():
    attn = RPEMultiheadAttention(16, 2, rpe_config=rpe_config_from_spec("rpe-2.0-product-ctx-1-k"))
    other = copy.deepcopy(attn)
    with torch.no_grad():
        other.rpe_k.lookup_table_weight.add_(1)
    assert not torch.equal(other.rpe_k.lookup_table_weight, attn.rpe_k.lookup_table_weight)


def test_deit_rpe_attention_keys_and_cls_token():
    cfg = get_rpe_config(1.9, "product", "ctx", True, skip=1, rpe_on="qkv")
    attn = RPEAttention(32, num_heads=2, qkv_bias=True, rpe_config=cfg)
    assert {k: tuple(v.shape) for k, v in attn.state_dict().items() if "rpe" in k} == {
        "rpe_q.lookup_table_weight": (1, 16, 50), "rpe_k.lookup_table_weight": (1, 16, 50),
        "rpe_v.lookup_table_weight": (1, 50, 16)}
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 1 + 16, 32)
    assert attn(x).shape == (2, 17, 32)


def test_bucket_maps_cached_in_inference_mode_work_in_training():
    """Evaluation (inference_mode) first, then training with the same cached maps."""
    irpe._BUCKET_CACHE.clear()
    attn = RPEMultiheadAttention(16, 2, rpe_config=get_rpe_config(2.0, "product", "ctx", True, 0, "qkv"))
    x = torch.randn(6, 1, 16)
    with torch.inference_mode():
        attn(x, x, x, hw=(2, 3))
    xg = x.clone().requires_grad_(True)
    attn(xg, xg, xg, hw=(2, 3))[0].sum().backward()
    assert xg.grad is not None and attn.rpe_k.lookup_table_weight.grad is not None
