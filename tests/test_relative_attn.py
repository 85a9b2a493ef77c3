"""The fused attention op (zoo.ops.relative_attn) and the fused paths of the attention layers.

Every fused path (native kernel, SDPA with a materialised bias, FlexAttention) equals the reference
formulation: outputs and gradients in float64 (1e-10) and within 1e-5 relative in float32 (max error
over max magnitude), on random shapes (odd grids, 1-D/3-D grids, skip tokens, batch 1, padding masks,
two weighted taps) and on the original code's fixtures. FlexAttention runs forward only on the CPU:
its score_mod logic is checked with eager FlexAttention (fast), once with the compiled kernel (slow),
and with gradients on CUDA where a GPU is visible.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from conftest import fixture_dir, load_case, native_op
from zoo import ops
from zoo.errors import ConfigError, OpsError
from zoo.layers import irpe, rpa
from zoo.layers.irpe import RPEAttention, RPEMultiheadAttention, get_rpe_config, rpe_config_from_spec
from zoo.layers.rpa import MultiheadNonlocal1d, MultiheadNonlocal2d, MultiheadNonlocal3d
from zoo.layers.sasa import SASAttention2d
from zoo.ops import neighborhood_attn
from zoo.ops import relative_attn as ra
from zoo.ops.relative_attn import PairTaps, Term, pair_taps, relative_attention

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def native():
    """Build/load the op once; RELZOO_OPS=reference runs skip the native checks."""
    return native_op(ra.OP_NAME)


def assert_rel_close(actual, expected, rel, what=""):
    """max |actual - expected| <= rel * max |expected| (relative to the tensor's scale)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    err = (actual - expected.to(actual.dtype)).abs().max().item()
    assert err <= rel * max(scale, 1e-30), f"{what}: max error {err:.3g} > {rel:g} x max |expected| {scale:.3g}"


TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


# ---------------------------------------------------------------------------------------------- the op

# (batch, heads, grid, skip, D, Dv, query taps, key taps, value taps, weighted, bias shape, padding)
CASES = {
    "irpe_k_odd_grid": (2, 3, (5, 7), 0, 8, 8, 1, 0, 0, False, None, True),
    "irpe_qkv_skip1_batch1": (1, 2, (3, 4), 1, 8, 8, 1, 1, 1, False, None, False),
    "cross_skip2_taps2": (2, 2, (2, 5), 2, 6, 4, 2, 2, 2, False, (1, 1, -1, -1), True),
    "rpa_weighted_3d": (2, 1, (2, 2, 3), 0, 5, 7, 2, 0, 2, True, None, False),
    "rpa_weighted_1d": (1, 2, (9,), 0, 4, 4, 2, 0, 2, True, (1, 1, 1, -1), True),
    "bias_tables_mask": (3, 2, (4, 3), 1, 8, 8, 1, 1, 0, False, (2, -1, -1), True),
    "single_token_grid": (2, 1, (1, 1), 2, 4, 4, 1, 1, 1, True, None, False),
}


def _problem(case: str, dtype=torch.float64, seed=0):
    B, H, grid, skip, D, Dv, tq, tk, tv, weighted, bias_shape, padding = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    L = skip + math.prod(grid)
    O = math.prod(2 * g - 1 for g in grid)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    def taps(T, K):
        ids = torch.randint(0, K, (T, O), generator=gen)
        weight = torch.rand(T, O, generator=gen, dtype=dtype) if weighted else None
        return pair_taps(ids, grid=grid, skip=skip, num_entries=K, weight=weight,
                         skip_ids=list(range(K - T, K)) if skip else None,
                         skip_weight=[0.7] * T if skip and weighted else None)

    q, k, v = rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, Dv)
    terms = {}
    if tq:
        terms["query_term"] = Term(rnd(B, H, L, 7), taps(tq, 7))
    if tk:  # a table broadcast over batch and tokens (iRPE's bias mode) where heads > 1
        terms["key_term"] = Term(rnd(1, H, 1, 5) if H > 1 else rnd(B, 1, L, 5), taps(tk, 5))
    if tv:
        terms["value_term"] = Term(rnd(1 if H > 1 else H, 6, Dv), taps(tv, 6))
    extra = {}
    if bias_shape is not None:
        extra["attn_bias"] = rnd(*[L if s == -1 else s for s in bias_shape])
    if padding:
        mask = torch.zeros(B, L, dtype=torch.bool)
        mask[-1, -2:] = True
        extra["key_padding_mask"] = mask
    return (q, k, v), terms, extra


def _run(backend, qkv, terms, extra, dropout_p=0.0):
    """Output and the gradients of every input (q, k, v, then each term's values), for one upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in qkv]
    terms = {name: Term(t.values.detach().clone().requires_grad_(True), t.taps) for name, t in terms.items()}
    out = relative_attention(*leaves, **terms, **extra, dropout_p=dropout_p, backend=backend)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out.dtype)
    inputs = leaves + [t.values for t in terms.values()]
    return out.detach(), torch.autograd.grad((out * upstream).sum(), inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["native", "sdpa"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_paths_equal_the_reference(native, case, backend, dtype):
    qkv, terms, extra = _problem(case, dtype)
    out, grads = _run(backend, qkv, terms, extra)
    ref, ref_grads = _run("reference", qkv, terms, extra)
    assert_rel_close(out, ref, TOL[dtype], "output")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_rel_close(g, r, TOL[dtype], f"gradient {i}")


def test_plain_cross_attention_every_backend(native):
    """No relative terms, query and key lengths differ (DETR's decoder cross-attention shape)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=gen, dtype=torch.float64) for n in (5, 9, 9))
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[0, 6:] = True
    ref, ref_grads = _run("reference", (q, k, v), {}, {"key_padding_mask": padding})
    for backend in ("native", "sdpa", "auto"):
        out, grads = _run(backend, (q, k, v), {}, {"key_padding_mask": padding})
        assert_rel_close(out, ref, 1e-10, backend)
        for g, r in zip(grads, ref_grads):
            assert_rel_close(g, r, 1e-10, backend)


def test_fully_masked_queries_give_zeros(native):
    """A query whose keys are all masked: output 0 and no gradient on every path (SDPA's convention)."""
    qkv, terms, _ = _problem("irpe_qkv_skip1_batch1")
    L = qkv[0].shape[2]
    bias = torch.zeros(L, L, dtype=torch.float64)
    bias[3] = float("-inf")
    for backend in ("native", "sdpa", "reference"):
        out, grads = _run(backend, qkv, terms, {"attn_bias": bias})
        assert torch.isfinite(out).all() and out[:, :, 3].abs().max() == 0, backend
        assert all(torch.isfinite(g).all() for g in grads) and grads[0][:, :, 3].abs().max() == 0, backend


def test_dropout_is_repeatable_and_its_gradient_consistent(native):
    """The native kernel's dropout mask is a function of the seed drawn from torch's generator: the same
    seed gives the same output; the backward regenerates the same mask (gradcheck with a fixed seed)."""
    qkv, terms, extra = _problem("rpa_weighted_1d")

    def call(*inputs):
        torch.manual_seed(3)
        term_values = inputs[3:]
        fixed = {name: Term(values, t.taps) for (name, t), values in zip(terms.items(), term_values)}
        return relative_attention(*inputs[:3], **fixed, **extra, dropout_p=0.3, backend="native")

    inputs = [t.detach().clone().requires_grad_(True) for t in (*qkv, *(t.values for t in terms.values()))]
    first, second = call(*inputs), call(*inputs)
    assert torch.equal(first, second)
    without = relative_attention(*qkv, **terms, **extra, backend="native")
    assert not torch.allclose(first, without)
    assert torch.autograd.gradcheck(call, inputs, atol=1e-7)


def test_dropout_keeps_the_expected_fraction(native):
    """With v = 1 every output is (sum of the kept probabilities) / (1 - p): 1 on average."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 64, 8), torch.randn(2, 4, 64, 8)
    v = torch.ones(2, 4, 64, 1)
    out = relative_attention(q, k, v, dropout_p=0.25, backend="native")
    assert abs(out.mean().item() - 1.0) < 0.02
    zeros = relative_attention(q, k, v, dropout_p=1.0, backend="native")
    assert zeros.abs().max() == 0


def test_half_precision_inputs_run_in_float32(native):
    qkv, terms, extra = _problem("irpe_k_odd_grid", torch.float32)
    ref = relative_attention(*qkv, **terms, **extra, backend="reference")
    half = relative_attention(*(t.bfloat16() for t in qkv), **terms, **extra, backend="native")
    assert half.dtype == torch.bfloat16
    assert_rel_close(half.float(), ref, 2e-2, "bfloat16")


def test_bad_inputs_are_clear_errors(native):
    qkv, terms, extra = _problem("irpe_qkv_skip1_batch1")
    q, k, v = qkv
    with pytest.raises(ValueError, match="q, k, v must be"):
        relative_attention(q[0], k, v)
    short = Term(terms["query_term"].values[:, :, :-1], terms["query_term"].taps)
    with pytest.raises(ValueError, match="relative terms need 1 \\+ 1x3x4 = 13 query and key tokens"):
        relative_attention(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], query_term=short)
    other = Term(terms["key_term"].values, pair_taps(torch.zeros(1, 3 * 11, dtype=torch.long), grid=(2, 6),
                                                     skip=1, num_entries=5, skip_ids=[0]))
    with pytest.raises(ValueError, match="disagree on the token layout"):
        relative_attention(q, k, v, query_term=terms["query_term"], key_term=other)
    with pytest.raises(ValueError, match="attn_bias .* does not broadcast"):
        relative_attention(q, k, v, attn_bias=torch.zeros(4, 13, 13, dtype=q.dtype))
    with pytest.raises(ValueError, match="key_padding_mask must be bool"):
        relative_attention(q, k, v, key_padding_mask=torch.zeros(1, 13))
    with pytest.raises(ValueError, match="entry ids must be in"):
        pair_taps(torch.full((1, 117), 9), grid=(5, 7), num_entries=9)
    with pytest.raises(ConfigError, match="'native' has no gradient for attn_bias"):
        relative_attention(q, k, v, attn_bias=torch.zeros(13, 13, dtype=q.dtype, requires_grad=True),
                           backend="native")
    with pytest.raises(ConfigError, match="'flex' cannot compute a value term"):
        relative_attention(q, k, v, **terms, backend="flex")


def test_what_auto_chooses(native, monkeypatch):
    qkv, terms, _ = _problem("irpe_k_odd_grid")
    q = qkv[0]
    assert ra.choose_backend("auto", q) == "sdpa"                               # no relative terms
    assert ra.choose_backend("auto", q, **terms) == "native"                    # CPU: the fused kernel
    assert ra.choose_backend("auto", q.float(), **terms) == "native"
    grad_bias = torch.zeros(35, 35, dtype=q.dtype, requires_grad=True)
    assert ra.choose_backend("auto", q, **terms, attn_bias=grad_bias) == "sdpa"  # no mask gradient in native
    # per shape: bias tables broadcast over a large batch, in inference: SDPA builds one shared bias
    taps = terms["query_term"].taps
    table = Term(torch.zeros(1, 3, 1, taps.num_entries, dtype=q.dtype), taps)
    batch8 = torch.zeros(8, 3, 35, 8, dtype=q.dtype)
    assert ra.choose_backend("auto", batch8, query_term=table, key_term=table) == "sdpa"
    assert ra.choose_backend("auto", batch8[:4], query_term=table, key_term=table) == "native"   # small batch
    assert ra.choose_backend("auto", batch8.requires_grad_(), query_term=table) == "native"      # training
    assert ra.choose_backend("auto", batch8, query_term=table, value_term=table) == "native"     # value term
    assert ra.choose_backend("auto", torch.zeros(8, 3, 400, 8), query_term=table) == "native"   # bias too big
    # per dtype, without terms: float16 always the kernel; bfloat16 the kernel where gradients are needed
    assert ra.choose_backend("auto", q.half()) == "native"
    assert ra.choose_backend("auto", q.bfloat16()) == "sdpa"
    assert ra.choose_backend("auto", q.bfloat16().requires_grad_()) == "native"
    with torch.no_grad():
        assert ra.choose_backend("auto", q.bfloat16().requires_grad_()) == "sdpa"
    assert ra.choose_backend("auto", q.bfloat16(), **terms) == "native"
    assert ra.choose_backend("sdpa", q, **terms) == "sdpa"                     # forced
    monkeypatch.setenv("RELZOO_OPS", "reference")
    assert ra.choose_backend("auto", q, **terms) == "reference"
    with pytest.raises(OpsError, match="RELZOO_OPS=reference"):             # explicit native: says why not
        ra.choose_backend("native", q, **terms)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_auto_follows_the_reference(native, dtype):
    """The half types take the kernel on "auto" (plain attention too): forward and gradients close to the
    float32 reference, output and gradients in the input's dtype."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 70, 16, generator=gen) for _ in range(3))
    padding = torch.zeros(2, 70, dtype=torch.bool)
    padding[1, -9:] = True
    ref, ref_grads = _run("reference", (q, k, v), {}, {"key_padding_mask": padding})
    assert ra.choose_backend("auto", q.to(dtype).requires_grad_()) == "native"
    out, grads = _run("auto", tuple(t.to(dtype) for t in (q, k, v)), {}, {"key_padding_mask": padding})
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_rel_close(out.float(), ref, 2e-2, "output")
    for g, r in zip(grads, ref_grads):
        assert_rel_close(g.float(), r, 3e-2, "gradient")


# ---------------------------------------------------------------------------------------------- taps

def test_irpe_taps_read_the_original_bucket_maps():
    """The per-offset taps of every fixture bucket table give exactly its (L, L) bucket ids."""
    meta, t = load_case("irpe", "tables")
    for key in [k for k in t if k.startswith("buckets.")]:
        parts = key.split(".")
        method, ratio = meta["method_ids"][parts[1]], float(".".join(parts[2:-2])[1:])
        h, w = (int(x) for x in parts[-2][1:].split("w"))
        skip = int(parts[-1][len("skip"):])
        taps = irpe._cached_taps(method, h, w, skip, ratio, 2 * ratio, 8 * ratio, "cpu")
        assert torch.equal(taps.pair_entries()[0][0].long(), t[key].long()), key


@pytest.mark.parametrize("spec,hw", [("rpe-2.0-product-ctx-1-k", (5, 7)), ("rpe-1.9-cross-ctx-0-k", (4, 3)),
                                     ("rpe-1.9-product-bias-0-k", (1, 6))])
def test_structured_gathers_equal_the_index_step(spec, hw):
    """SDPA's bias for product/cross without skip tokens comes from two small gathers per tap, never an
    (L, L) index: the same values and gradients as the index step."""
    module = irpe.build_rpe(rpe_config_from_spec(spec), 8, 2)[1]
    L = hw[0] * hw[1]
    taps = module.pair_taps(L, *hw)
    assert ra._separable(taps) is not None
    x = torch.randn(2, 2, L, taps.num_entries, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 2, L, L, dtype=torch.float64)
    structured, indexed = ra.pair_bias(x, taps), ra.pair_bias(x, taps, "reference")
    assert torch.equal(structured, indexed)
    grads = [torch.autograd.grad((b * upstream).sum(), x)[0] for b in (structured, indexed)]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-12, rtol=0)
    skipped = irpe.build_rpe(rpe_config_from_spec(spec, skip=1), 8, 2)[1].pair_taps(L + 1, *hw)
    assert ra._separable(skipped) is None  # skip tokens: the index step


def test_every_attention_of_the_models_runs_fused(native, monkeypatch):
    """DETR (encoder and decoder self/cross attention), DeiT and the RPA block call SDPA without relative
    terms and the native kernel with them (inference, CPU)."""
    from zoo.models.deit import VisionTransformer
    from zoo.models.detr import build_detr

    calls = {"sdpa": 0, "native": 0}
    real_sdpa, real_native = torch.nn.functional.scaled_dot_product_attention, ra._PATHS["native"]

    def sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        return real_sdpa(*args, **kwargs)

    def native_path(*args):
        calls["native"] += 1
        return real_native(*args)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    monkeypatch.setitem(ra._PATHS, "native", native_path)
    tiny = dict(hidden_dim=16, nheads=2, enc_layers=2, dec_layers=2, dim_feedforward=32, num_queries=5,
                backbone_width_div=16)
    cases = [(build_detr(enc_rpe2d="", **tiny), torch.randn(1, 3, 96, 96), {"sdpa": 2 + 2 * 2, "native": 0}),
             (build_detr(enc_rpe2d="rpe-2.0-product-ctx-1-k", **tiny), torch.randn(1, 3, 96, 96),
              {"sdpa": 2 * 2, "native": 2}),
             (VisionTransformer(img_size=32, embed_dim=16, depth=2, num_heads=2), torch.randn(1, 3, 32, 32),
              {"sdpa": 2, "native": 0}),
             (VisionTransformer(img_size=32, embed_dim=16, depth=2, num_heads=2,
                                rpe_config=get_rpe_config(1.9, "product", "ctx", True, 1, "qkv")),
              torch.randn(1, 3, 32, 32), {"sdpa": 0, "native": 2}),
             (MultiheadNonlocal2d(4, num_heads=2), torch.randn(1, 4, 5, 5), {"sdpa": 1, "native": 0}),
             (MultiheadNonlocal2d(4, num_heads=2, rpa_mode="relative_position", rpa_kernel_size=3),
              torch.randn(1, 4, 5, 5), {"sdpa": 0, "native": 1})]
    for model, x, expected in cases:
        calls.update(sdpa=0, native=0)
        with torch.no_grad():
            model.eval()(x)
        assert calls == expected, type(model).__name__


def test_cross_taps_are_the_two_tables():
    config = get_rpe_config(1.9, "cross", "ctx", False, 1, "k")
    module = irpe.build_rpe(config, 8, 2)[1]
    taps = module.pair_taps(1 + 3 * 4, 3, 4)
    rows = module.rp_rows.pair_taps(13, 3, 4).pair_entries()[0][0]
    cols = module.rp_cols.pair_taps(13, 3, 4).pair_entries()[0][0]
    entries = taps.pair_entries()[0]
    assert torch.equal(entries[0], rows) and torch.equal(entries[1], cols + module.rp_rows.num_buckets)
    assert module.pair_taps(13, 3, 4) is taps  # cached per size


@pytest.mark.parametrize("block,sizes", [
    (lambda: MultiheadNonlocal2d(3, rpa_mode="relative_position", rpa_kernel_size=3, rpa_interpolation="slerp"),
     (4, 6)),
    (lambda: MultiheadNonlocal2d(3, rpa_mode="relative_position", rpa_kernel_size=(3, 5), rpa_interpolation="lerp",
                                 bug_compatible=True), (3, 5)),
    (lambda: MultiheadNonlocal2d(3, rpa_mode="relative_distance", rpa_kernel_size=4, rpa_interpolation="lerp"), (5, 3)),
    (lambda: MultiheadNonlocal1d(3, rpa_mode="relative_position", rpa_kernel_size=3), (7,)),
    (lambda: MultiheadNonlocal3d(3, rpa_mode="relative_position", rpa_kernel_size=3), (2, 3, 3)),
])
def test_rpa_taps_read_the_originals_table(block, sizes):
    """Through the taps, q . a gives per pair exactly what the original reads from the expanded table."""
    block = block().double()
    torch.nn.init.normal_(block.a_k[0])
    q = torch.randn(2, 3, math.prod(sizes), dtype=torch.float64)
    a = block.a_k[0].flatten(1)                                                      # (d, K')
    taps = block._taps(sizes, torch.float64, torch.device("cpu"))
    ours = ra.pair_bias(torch.einsum("bcn,ck->bnk", q, a), taps, "reference")
    table = block.reference_affinity("k", 0, sizes)
    torch.testing.assert_close(ours, rpa.relative_attend_query_reference(q, table, sizes), atol=1e-12, rtol=0)


def test_rpa_bug_compatible_out_of_bounds_is_refused():
    block = MultiheadNonlocal2d(3, rpa_mode="relative_position", rpa_kernel_size=3, bug_compatible=True)
    with pytest.raises(ValueError, match="reads past"):
        block(torch.randn(1, 3, 6, 4))


# ---------------------------------------------------------------------------------------------- layers

def _fixture_cases(prefix):
    try:
        return sorted(p.stem for p in fixture_dir("irpe" if prefix == "mha_" else "rpa").glob(f"{prefix}*.json"))
    except pytest.skip.Exception:
        return []


@pytest.mark.parametrize("backend", ["auto", "native", "sdpa"])
@pytest.mark.parametrize("case", _fixture_cases("mha_"))
def test_rpe_multihead_attention_fixtures_on_fused_paths(native, case, backend):
    """DETR's call (need_weights=False) on every fused path: the fixture's output and gradients (its
    tolerance), and our reference path's within 1e-5 relative (float32)."""
    meta, t = load_case("irpe", case)
    c = meta["constructor"]
    attn = RPEMultiheadAttention(c["embed_dim"], c["num_heads"], dropout=c["dropout"], bias=c["bias"],
                                 rpe_config=rpe_config_from_spec(meta["spec"]), backend=backend)
    attn.load_state_dict({k[len("param."):]: v for k, v in t.items() if k.startswith("param.")})
    attn.eval()
    results = {}
    for path in (backend, "reference"):
        attn.backend = path
        query = t["query"].clone().requires_grad_(True)
        value = t["value"].clone().requires_grad_(True)
        out, weights = attn(query, query, value, key_padding_mask=t["key_padding_mask"].bool(), need_weights=False,
                            hw=tuple(meta["hw"]))
        assert weights is None
        (out * t["grad_output"]).sum().backward()
        results[path] = [out, query.grad, value.grad] + [p.grad for p in attn.parameters()]
        attn.zero_grad(set_to_none=True)
    tol, g = meta["tolerance"]["output"], meta["tolerance"]["grads"]
    torch.testing.assert_close(results[backend][0], t["output"], atol=tol["atol"], rtol=tol["rtol"])
    torch.testing.assert_close(results[backend][1], t["grad_query"], atol=g["atol"], rtol=g["rtol"])
    for i, (ours, ref) in enumerate(zip(results[backend], results["reference"])):
        assert_rel_close(ours, ref, 1e-5, f"{case} tensor {i}")


@pytest.mark.parametrize("backend", ["auto", "native", "sdpa"])
@pytest.mark.parametrize("case", _fixture_cases("nl2d_"))
def test_rpa_block_fixtures_on_fused_paths(native, case, backend):
    """The RPA block fixtures (float32): fused paths within 1e-5 relative of the reference formulation
    (the transposed 9x13 case in the bug-compatible layout, whose table is read scrambled)."""
    meta, t = load_case("rpa", case)
    block = MultiheadNonlocal2d(**meta["ctor"], backend=backend, bug_compatible=case == "nl2d_rp_slerp_9x13")
    block.load_state_dict({k[len("state."):]: v for k, v in t.items() if k.startswith("state.")})
    results = {}
    for path in (backend, "reference"):
        block.backend = path
        x = t["input"].clone().requires_grad_(True)
        out = block(x)
        (out * t["grad_output"]).sum().backward()
        results[path] = [out, x.grad] + [p.grad for p in block.parameters()]
        block.zero_grad(set_to_none=True)
    for i, (ours, ref) in enumerate(zip(results[backend], results["reference"])):
        assert_rel_close(ours, ref, 1e-5, f"{case} tensor {i}")


@pytest.mark.parametrize("spec,skip", [("rpe-2.0-product-ctx-1-k", 0), ("rpe-1.9-cross-ctx-0-qkv", 1),
                                       ("rpe-2.5-quant-bias-1-qk", 2)])
def test_float32_random_shapes_with_masks(native, spec, skip):
    """Odd maps, skip tokens, a padded second image, a bool attn_mask, batch 1 and 3: every fused path
    within 1e-5 relative of the reference (outputs and all gradients)."""
    for batch, (h, w) in ((1, (3, 7)), (3, (5, 4))):
        torch.manual_seed(batch)
        attn = RPEMultiheadAttention(24, 3, rpe_config=rpe_config_from_spec(spec, skip=skip)).eval()
        for p in attn.parameters():
            torch.nn.init.normal_(p, 0, 0.3)
        L = skip + h * w
        x = torch.randn(L, batch, 24)
        padding = torch.zeros(batch, L, dtype=torch.bool)
        padding[-1, -(w + 1):] = True
        mask = torch.rand(L, L) > 0.8
        mask.fill_diagonal_(False)
        results = {}
        for backend in ("reference", "native", "sdpa"):
            model = copy.deepcopy(attn)
            model.backend = backend
            xg = x.clone().requires_grad_(True)
            out = model(xg, xg, xg, key_padding_mask=padding, attn_mask=mask, need_weights=False, hw=(h, w))[0]
            out.square().sum().backward()
            results[backend] = [out, xg.grad] + [p.grad for p in model.parameters()]
        for backend in ("native", "sdpa"):
            for i, (ours, ref) in enumerate(zip(results[backend], results["reference"])):
                assert_rel_close(ours, ref, 1e-5, f"{spec} batch {batch} {backend} tensor {i}")


# (layer, input shape, forward kwargs): odd maps, skip tokens, batch 1, 1-D and 3-D grids
LAYERS_FLOAT32 = {
    "deit_cross_qkv_cls_batch1": (lambda: RPEAttention(24, 3, qkv_bias=True, rpe_config=get_rpe_config(
        1.9, "cross", "ctx", False, 1, "qkv")), (1, 1 + 9 * 7, 24), {"hw": (9, 7)}),
    "deit_product_k_skip2": (lambda: RPEAttention(24, 3, rpe_config=get_rpe_config(2.0, "product", "ctx", True, 2, "k")),
                             (3, 2 + 5 * 13, 24), {"hw": (5, 13)}),
    "deit_euc_bias_qk_small": (lambda: RPEAttention(16, 2, rpe_config=get_rpe_config(1.9, "euc", "bias", False, 1,
                                                                                      "qk")), (2, 1 + 3 * 5, 16),
                               {"hw": (3, 5)}),
    "rpa_2d_odd_batch1": (lambda: MultiheadNonlocal2d(6, 3, num_heads=2, rpa_mode="relative_position", rpa_kernel_size=3,
                                                      rpa_interpolation="slerp", rpa_zero_init=False), (1, 6, 9, 11), {}),
    "rpa_2d_distance_strided": (lambda: MultiheadNonlocal2d(6, 4, num_heads=2, kernel_size=3, stride=2, padding=1,
                                                            rpa_mode="relative_distance", rpa_kernel_size=4,
                                                            rpa_interpolation="lerp", rpa_zero_init=False),
                                (3, 6, 15, 13), {}),
    "rpa_3d": (lambda: MultiheadNonlocal3d(6, 3, num_heads=2, rpa_mode="relative_position", rpa_kernel_size=3,
                                           rpa_zero_init=False), (1, 6, 3, 5, 7), {}),
    "rpa_1d_batch1": (lambda: MultiheadNonlocal1d(6, 3, rpa_mode="relative_position", rpa_kernel_size=5,
                                                  rpa_zero_init=False), (1, 6, 97), {}),
}


@pytest.mark.parametrize("case", sorted(LAYERS_FLOAT32))
def test_float32_layers_on_every_fused_path(native, case):
    """DeiT's attention and the RPA blocks in float32: every fused path (and what "auto" picks) within 1e-5
    relative of the reference formulation, output and every gradient (input and parameters)."""
    make, shape, kwargs = LAYERS_FLOAT32[case]
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        for p in layer.parameters():  # iRPE tables start at zero, which would hide their terms
            p.normal_(0.0, 0.3)
    x = torch.randn(shape)
    results = {}
    for backend in ("reference", "auto", "native", "sdpa"):
        layer.backend = backend
        xg = x.clone().requires_grad_(True)
        out = layer(xg, **kwargs)
        out.square().sum().backward()
        results[backend] = [out, xg.grad] + [p.grad for p in layer.parameters()]
        layer.zero_grad(set_to_none=True)
    for backend in ("auto", "native", "sdpa"):
        for i, (ours, ref) in enumerate(zip(results[backend], results["reference"])):
            assert_rel_close(ours, ref, 1e-5, f"{case} {backend} tensor {i}")


def test_fused_path_overhead_is_paid_once_per_shape(native, monkeypatch):
    """Repeated calls at one size build an iRPE module's taps once (a new size once more) and never the
    (L, L) bucket map or pair entries the reference and SDPA paths read."""
    built = []
    real = irpe._bucket_ids_of_offsets
    monkeypatch.setattr(irpe, "_bucket_ids_of_offsets", lambda *args: built.append(args[1].shape) or real(*args))
    irpe._TAPS_CACHE.clear()
    irpe._BUCKET_CACHE.clear()
    attn = RPEMultiheadAttention(32, 2, rpe_config=rpe_config_from_spec("rpe-2.0-product-ctx-1-k")).eval()
    with torch.inference_mode():
        for h, w in ((9, 11), (9, 11), (9, 11), (10, 7), (9, 11), (10, 7)):
            x = torch.randn(h * w, 2, 32)
            attn(x, x, x, need_weights=False, hw=(h, w))
    assert built == [(17 * 21, 2), (19 * 13, 2)]  # one per size: the bucket of every offset, (O, 2)
    taps = attn.rpe_k.pair_taps(99, 9, 11)
    assert "pairs" not in taps._cache and len(irpe._BUCKET_CACHE._data) == 0


def test_need_weights_returns_the_probabilities():
    """need_weights=True keeps returning the head-averaged probabilities (the explicit path)."""
    torch.manual_seed(0)
    attn = RPEMultiheadAttention(16, 2, rpe_config=rpe_config_from_spec("rpe-2.0-product-ctx-1-k")).eval()
    x = torch.randn(12, 2, 16)
    out, weights = attn(x, x, x, hw=(3, 4))
    fused, none = attn(x, x, x, need_weights=False, hw=(3, 4))
    assert none is None and weights.shape == (2, 12, 12)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 12))
    torch.testing.assert_close(fused, out, atol=1e-6, rtol=1e-5)


def test_training_step_after_inference_mode(native):
    """Caches first filled under inference_mode must not break a later training step."""
    attn = RPEAttention(16, 2, rpe_config=get_rpe_config(1.9, "cross", "ctx", True, 1, "qkv"))
    block = MultiheadNonlocal2d(4, rpa_mode="relative_position", rpa_kernel_size=3, rpa_zero_init=False)
    x, y = torch.randn(2, 1 + 9, 16), torch.randn(1, 4, 5, 5)
    with torch.inference_mode():
        attn(x, hw=(3, 3))
        block(y)
    for backend in ("auto", "sdpa"):
        attn.backend = block.backend = backend
        attn(x, hw=(3, 3)).sum().backward()
        block(y).sum().backward()


# ---------------------------------------------------------------------------------------------- FlexAttention

@pytest.fixture
def eager_flex(monkeypatch):
    """FlexAttention without torch.compile (its reference implementation): checks our score_mod and block
    mask in seconds; the compiled kernel is tested below (slow) and on CUDA."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setattr(ra, "compiled_flex_attention", lambda device_type="cuda": flex.flex_attention)
    monkeypatch.setattr(neighborhood_attn, "compiled_flex_attention", lambda device_type="cuda": flex.flex_attention)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


@pytest.mark.parametrize("case", ["irpe_k_odd_grid", "cross_skip2_taps2", "bias_tables_mask", "rpa_weighted_1d"])
def test_flex_score_mod_equals_the_reference(eager_flex, case):
    qkv, terms, extra = _problem(case, torch.float32)
    terms.pop("value_term", None)  # FlexAttention returns no probabilities
    with torch.no_grad():
        out = relative_attention(*qkv, **terms, **extra, backend="flex")
        ref = relative_attention(*qkv, **terms, **extra, backend="reference")
    assert_rel_close(out, ref, 1e-5)


def test_flex_refuses_what_it_cannot_do(eager_flex):
    qkv, terms, _ = _problem("irpe_k_odd_grid", torch.float32)
    with pytest.raises(ConfigError, match="no attention dropout"):
        relative_attention(*qkv, **terms, dropout_p=0.1, backend="flex")
    with pytest.raises(ConfigError, match="inference only"):
        relative_attention(qkv[0].requires_grad_(True), *qkv[1:], **terms, backend="flex")


@pytest.mark.parametrize("kernel,stride,offset,rel", [(3, 1, -1, True), (5, 2, -2, True), (2, 2, (-3, 0), False)])
def test_flex_neighborhood_attention_equals_the_reference(eager_flex, kernel, stride, offset, rel):
    gen = torch.Generator().manual_seed(0)
    hq, wq = (6, 7) if stride == 1 else (3, 4)
    q = torch.randn(2, 2, hq, wq, 16, generator=gen)
    k, v = torch.randn(2, 2, 6, 7, 16, generator=gen), torch.randn(2, 2, 6, 7, 8, generator=gen)
    r = torch.randn(2, kernel * kernel, 16, generator=gen) if rel else None
    kwargs = dict(kernel_size=kernel, stride=stride, offset=offset)
    with torch.no_grad():
        out = ops.neighborhood_attention(q, k, v, r, backend="flex", **kwargs)
        ref = ops.neighborhood_attention_reference(q, k, v, r, **kwargs)
    assert_rel_close(out, ref, 1e-5)


def test_flex_neighborhood_refuses_mixtures_and_narrow_heads(eager_flex):
    q = torch.randn(1, 1, 4, 4, 8)
    with pytest.raises(ConfigError, match="head width >= 16"):
        ops.neighborhood_attention(q, q, q, kernel_size=3, offset=-1, backend="flex")
    with pytest.raises(ConfigError, match="no value mixture"):
        ops.neighborhood_attention(q, q, q.unsqueeze(4), None, torch.ones(1, 9), kernel_size=3, offset=-1,
                                   backend="flex")


@pytest.mark.slow
def test_compiled_flex_attention_on_the_cpu():
    """The compiled FlexAttention kernel (CPU, forward) in an iRPE layer with skip tokens and padding."""
    if not ra.flex_available(torch.device("cpu")):
        pytest.skip("no FlexAttention in this torch")
    torch.manual_seed(0)
    attn = RPEMultiheadAttention(32, 2, rpe_config=rpe_config_from_spec("rpe-1.9-product-ctx-1-qk", skip=1)).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x = torch.randn(1 + 4 * 5, 2, 32)
    padding = torch.zeros(2, 21, dtype=torch.bool)
    padding[1, -5:] = True
    with torch.no_grad():
        outs = {}
        for backend in ("flex", "reference"):
            attn.backend = backend
            outs[backend] = attn(x, x, x, key_padding_mask=padding, need_weights=False, hw=(4, 5))[0]
    assert_rel_close(outs["flex"], outs["reference"], 1e-5)


# ---------------------------------------------------------------------------------------------- CUDA

@CUDA
@pytest.mark.parametrize("backend", ["flex", "sdpa", "auto"])
@pytest.mark.parametrize("case", ["irpe_k_odd_grid", "cross_skip2_taps2", "bias_tables_mask", "rpa_weighted_1d"])
def test_cuda_fused_paths_equal_the_reference(case, backend):
    """On the GPU: outputs and gradients (FlexAttention's backward through the per-entry values included)."""
    qkv, terms, extra = _problem(case, torch.float32)
    if backend == "flex":
        terms.pop("value_term", None)
    qkv = tuple(t.cuda() for t in qkv)
    terms = {n: Term(t.values.cuda(), t.taps.to("cuda")) for n, t in terms.items()}
    extra = {n: t.cuda() for n, t in extra.items()}
    out, grads = _run(backend, qkv, terms, extra)
    ref, ref_grads = _run("reference", qkv, terms, extra)
    assert_rel_close(out, ref, 1e-5, "output")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_rel_close(g, r, 1e-5, f"gradient {i}")


@CUDA
def test_cuda_layers_on_auto_equal_the_reference():
    torch.manual_seed(0)
    attn = RPEMultiheadAttention(64, 2, rpe_config=rpe_config_from_spec("rpe-2.0-product-ctx-1-k")).cuda().eval()
    block = MultiheadNonlocal2d(16, num_heads=2, rpa_mode="relative_position", rpa_kernel_size=5,
                                rpa_zero_init=False).cuda()
    x, y = torch.randn(6 * 9, 2, 64, device="cuda"), torch.randn(2, 16, 8, 8, device="cuda")
    for module, call in ((attn, lambda m: m(x, x, x, need_weights=False, hw=(6, 9))[0]), (block, lambda m: m(y))):
        outs = {}
        for backend in ("auto", "reference"):
            module.backend = backend
            outs[backend] = call(module)
        assert_rel_close(outs["auto"], outs["reference"], 1e-5)


@CUDA
@pytest.mark.parametrize("backend", ["flex", "native"])
def test_cuda_sasa_layer_backends_equal_the_reference(backend):
    torch.manual_seed(0)
    layer = SASAttention2d(32, 32, kernel_size=7, heads=2).cuda()
    x = torch.randn(2, 32, 14, 14, device="cuda", requires_grad=True)
    out = layer(x, backend=backend)
    grad = torch.autograd.grad(out.square().sum(), x)[0]
    ref = layer(x, backend="reference")
    ref_grad = torch.autograd.grad(ref.square().sum(), x)[0]
    assert_rel_close(out, ref, 1e-5)
    assert_rel_close(grad, ref_grad, 1e-5)
