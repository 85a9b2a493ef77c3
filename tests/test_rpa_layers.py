"""RPA-SA layers (zoo/layers/rpa.py) against the original's golden fixtures, plus what has no original.

Fixtures: shared/fixtures/rpa (module cases float32, op cases float64; tolerances from its README).
1-D/3-D blocks have no original: they are checked against the 2-D block on height-1/depth-1 inputs
and with gradcheck. The chunked fast path is checked against a direct index formulation written here,
and against the library's reference backend (the original's algorithm) for every mode and interpolation.
"""
from __future__ import annotations

import copy
import glob
import os

import pytest
import torch
from torch.func import functional_call

from conftest import FIXTURES_ROOT, load_case
from zoo.layers import rpa
from zoo.layers.rpa import MultiheadNonlocal1d, MultiheadNonlocal2d, MultiheadNonlocal3d


def _cases(prefix: str) -> list[str]:
    names = sorted(os.path.basename(p)[:-5] for p in glob.glob(str(FIXTURES_ROOT / "rpa" / f"{prefix}*.json")))
    return names or [f"{prefix}(fixtures absent)"]


def _close(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, rtol=tol["rtol"], atol=tol["atol"]), f"{what}: max abs error {err:.3g}"


def _modes_for(meta: dict) -> list[bool]:
    """Which bug_compatible settings must reproduce a module case."""
    if meta.get("legacy_rp_pad_order"):
        return [True]                      # transposed pad order: only the bug-compatible mode
    if meta.get("corrected_rp_pad_order"):
        return [False]                     # the fixed default
    ctor = meta["ctor"]
    if ctor.get("rpa_mode") == "relative_position" and ctor.get("rpa_interpolation") == "lerp":
        return [True]                      # 'lerp' silently meant nearest in the original
    return [False, True]


def _run_module_case(case: str, bug_compatible: bool, backend: str = "auto"):
    meta, t = load_case("rpa", case)
    block = MultiheadNonlocal2d(**meta["ctor"], bug_compatible=bug_compatible, backend=backend)
    block.load_state_dict({k[len("state."):]: v for k, v in t.items() if k.startswith("state.")})
    block.eval()
    x = t["input"].clone().requires_grad_()
    out = block(x)
    (out * t["grad_output"]).sum().backward()
    return meta, t, block, x, out


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("case", _cases("nl2d_"))
def test_module_matches_original(case, backend):
    meta, _ = load_case("rpa", case)
    for bug_compatible in _modes_for(meta):
        meta, t, block, x, out = _run_module_case(case, bug_compatible, backend)
        tol_out, tol_grad = meta["tolerance"]["output"], meta["tolerance"]["grads"]
        mode = f"{case} bug_compatible={bug_compatible} backend={backend}"
        _close(out, t["output"], tol_out, f"{mode} output")
        _close(x.grad, t["grad_input"], tol_grad, f"{mode} grad_input")
        for name, param in block.named_parameters():
            _close(param.grad, t[f"grad_{name}"], tol_grad, f"{mode} grad_{name}")
        if block.rpa_mode is not None:
            for head in range(block.num_heads):
                for which in "kv":
                    ref = block.reference_affinity(which, head, meta["hidden_dims"])
                    _close(ref, t[f"a_{which}_ref.{head}"], tol_out, f"{mode} a_{which}_ref.{head}")


def test_fixed_and_legacy_pad_order_differ_on_non_square_maps():
    """The 9x13 relative_position case: the fix does not reproduce the bug and vice versa."""
    _, t_legacy, *_ = _run_module_case("nl2d_rp_slerp_9x13", True)
    _, _, _, _, out_fixed = _run_module_case("nl2d_rp_slerp_9x13", False)
    assert not torch.allclose(out_fixed, t_legacy["output"], rtol=1e-2, atol=1e-3)
    _, t_fixed, _, _, _ = _run_module_case("nl2d_rp_slerp_9x13_fixedpad", False)
    torch.testing.assert_close(out_fixed, t_fixed["output"], rtol=1e-4, atol=1e-5)


def test_lerp_means_alerp_by_default_and_nearest_when_bug_compatible():
    meta, t = load_case("rpa", "nl2d_rp_lerp_12x12")
    state = {k[len("state."):]: v for k, v in t.items() if k.startswith("state.")}
    outputs = {}
    for name, bc in [("lerp", False), ("alerp", False), ("lerp", True), ("nearest", False)]:
        block = MultiheadNonlocal2d(**{**meta["ctor"], "rpa_interpolation": name}, bug_compatible=bc)
        block.load_state_dict(state)
        outputs[name, bc] = block(t["input"]).detach()
    torch.testing.assert_close(outputs["lerp", False], outputs["alerp", False], rtol=0, atol=0)
    torch.testing.assert_close(outputs["lerp", True], outputs["nearest", False], rtol=0, atol=0)
    assert not torch.allclose(outputs["lerp", False], outputs["lerp", True])


@pytest.mark.parametrize("case", _cases("op_"))
def test_ops_match_original(case):
    meta, t = load_case("rpa", case)
    op = getattr(rpa, meta["op"].split(".")[-1])
    args = meta["args"]
    inputs = {name: t[name].clone().requires_grad_() for name in args["tensors"]}
    if "pad" in args:
        out = op(inputs["input"], args["pad"], args["interpolation"])
    else:
        out = op(*inputs.values(), args["height"], args["width"])
    (out * t["grad_output"]).sum().backward()
    _close(out, t["output"], meta["tolerance"]["output"], f"{case} output")
    for name, tensor in inputs.items():
        _close(tensor.grad, t[f"grad_{name}"], meta["tolerance"]["grads"], f"{case} grad_{name}")


def test_readme_example_runs_as_written():
    nl = MultiheadNonlocal2d(in_channels=8, rpa_mode='relative_position', rpa_kernel_size=5, rpa_interpolation='slerp')
    x = torch.rand(1, 8, 12, 12)
    y = nl(x)
    assert y.shape == (1, 8, 12, 12)
    # rpa_zero_init=True and zero conv biases: the relative terms start at zero.
    assert all(p.abs().sum() == 0 for p in [*nl.a_k, *nl.a_v])


def test_state_dict_keys_and_shapes():
    block = MultiheadNonlocal2d(8, hidden_channels=4, num_heads=2, kernel_size=3, rpa_mode="relative_position",
                                rpa_kernel_size=(3, 5))
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert list(shapes) == ["embed_conv.0.weight", "embed_conv.0.bias", "embed_conv.1.weight", "embed_conv.1.bias",
                            "output_conv.weight", "output_conv.bias", "a_k.0", "a_k.1", "a_v.0", "a_v.1"]
    assert shapes["embed_conv.0.weight"] == (12, 8, 3, 3)
    assert shapes["output_conv.weight"] == (8, 8, 3, 3)
    assert shapes["a_k.0"] == (4, 3, 5)
    distance = MultiheadNonlocal2d(8, rpa_mode="relative_distance", rpa_kernel_size=(6,))
    assert tuple(distance.state_dict()["a_v.0"].shape) == (8, 6)
    plain = MultiheadNonlocal2d(8)
    assert plain.a_k is None and plain.a_v is None
    assert not any(k.startswith(("a_k", "a_v")) for k in plain.state_dict())


def test_older_rasa_spellings():
    torch.manual_seed(0)
    new = MultiheadNonlocal2d(4, rpa_mode="relative_distance", rpa_kernel_size=3, rpa_interpolation="lerp",
                              rpa_zero_init=False)
    old = MultiheadNonlocal2d(4, rasa_mode="relative_distance", rasa_kernel_size=3, rasa_interpolation="lerp",
                              rasa_zero_init=False)
    assert old.rpa_mode == "relative_distance" and old.rpa_kernel_size == (3,) and old.rpa_interpolation == "lerp"
    old.load_state_dict(new.state_dict())
    x = torch.randn(1, 4, 5, 6)
    torch.testing.assert_close(old(x), new(x))
    with pytest.raises(TypeError, match="rasa_mode"):
        MultiheadNonlocal2d(4, rpa_mode="relative_position", rasa_mode="relative_distance")
    with pytest.raises(TypeError, match="rasa_foo"):
        MultiheadNonlocal2d(4, rasa_foo=1)


def test_bad_arguments_and_inputs_are_named():
    with pytest.raises(ValueError, match="rpa_mode"):
        MultiheadNonlocal2d(8, rpa_mode="relative_angle")
    with pytest.raises(ValueError, match="rpa_interpolation"):
        MultiheadNonlocal2d(8, rpa_mode="relative_position", rpa_interpolation="cubic")
    with pytest.raises(ValueError, match="rpa_interpolation"):
        MultiheadNonlocal2d(8, rpa_mode="relative_distance", rpa_interpolation="slerp")
    # ... which the original silently ran as nearest: accepted in bug-compatible mode.
    MultiheadNonlocal2d(8, rpa_mode="relative_distance", rpa_interpolation="slerp", bug_compatible=True)
    with pytest.raises(ValueError, match="odd"):
        MultiheadNonlocal2d(8, rpa_mode="relative_position", rpa_kernel_size=4)
    with pytest.raises(ValueError, match="one rpa_kernel_size"):
        MultiheadNonlocal2d(8, rpa_mode="relative_distance", rpa_kernel_size=(3, 3))
    block = MultiheadNonlocal2d(8)
    with pytest.raises(ValueError, match="in_channels=8"):
        block(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="2 spatial dims"):
        block(torch.randn(1, 8, 5))
    with pytest.raises(TypeError, match="floating"):
        block(torch.ones(1, 8, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown interpolation"):
        rpa.spherical_pad2d(torch.rand(1, 1, 3, 3), (1, 1, 1, 1), "bicubic")
    with pytest.raises(ValueError, match=r"\(d, 2H-1, 2W-1\)"):
        rpa.relative_attend_query2d(torch.rand(1, 2, 12), torch.rand(2, 5, 5), 3, 4)


def test_bug_compatible_refuses_out_of_bounds_maps():
    block = MultiheadNonlocal2d(4, rpa_mode="relative_position", rpa_kernel_size=3, bug_compatible=True)
    block(torch.randn(1, 4, 4, 6))                   # H <= W: the original's scrambled but valid layout
    with pytest.raises(ValueError, match="reads past"):
        block(torch.randn(1, 4, 6, 4))               # H > W: the original read garbage
    MultiheadNonlocal2d(4, rpa_mode="relative_position", rpa_kernel_size=3)(torch.randn(1, 4, 6, 4))
    # Non-square kernels were affected on square maps too: (3, 5) on 12x12 read out of bounds, (5, 3)
    # stayed in bounds but scrambled.
    with pytest.raises(ValueError, match="reads past"):
        MultiheadNonlocal2d(4, rpa_mode="relative_position", rpa_kernel_size=(3, 5), bug_compatible=True)(
            torch.randn(1, 4, 12, 12))
    torch.manual_seed(0)
    legacy = MultiheadNonlocal2d(4, rpa_mode="relative_position", rpa_kernel_size=(5, 3), rpa_zero_init=False,
                                 bug_compatible=True)
    fixed = MultiheadNonlocal2d(4, rpa_mode="relative_position", rpa_kernel_size=(5, 3))
    fixed.load_state_dict(legacy.state_dict())
    x = torch.randn(1, 4, 12, 12)
    assert legacy.reference_affinity("k", 0, (12, 12)).shape == (4, 25, 21)
    assert not torch.allclose(legacy(x), fixed(x))


# ---- the fast path against a direct formulation (spec §1.3 written with explicit index tables) ----

def _direct_block(block: MultiheadNonlocal2d, x: torch.Tensor) -> torch.Tensor:
    """Per head: logits q^T k + q^T A_k[idx], softmax, alpha v + alpha A_v[idx]; idx from coordinates."""
    heads, d = block.num_heads, block.hidden_channels
    ys = []
    for t in range(heads):
        conv = block.embed_conv[t]
        e = torch.nn.functional.conv2d(x, conv.weight, conv.bias, block.stride, block.padding, block.dilation)
        height, width = e.shape[-2:]
        q, k, v = e.flatten(2).split(d, dim=1)
        logits = q.transpose(1, 2) @ k
        if block.rpa_mode is not None:
            yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
            yy, xx = yy.flatten(), xx.flatten()
            idx = (yy[None] - yy[:, None] + height - 1) * (2 * width - 1) + (xx[None] - xx[:, None] + width - 1)
            a_k = block.reference_affinity("k", t, (height, width)).flatten(1)[:, idx]   # (d, N, N)
            a_v = block.reference_affinity("v", t, (height, width)).flatten(1)[:, idx]
            logits = logits + torch.einsum("bci,cij->bij", q, a_k)
        attn = torch.softmax(logits * block.scale, dim=-1)
        y = v @ attn.transpose(1, 2)
        if block.rpa_mode is not None:
            y = y + torch.einsum("bij,cij->bci", attn, a_v)
        ys.append(y.reshape(x.shape[0], d, height, width))
    out = block.output_conv(torch.cat(ys, 1), output_size=list(x.shape[2:]))
    return out + x if block.residual else out


@pytest.mark.parametrize("ctor,shape", [
    (dict(rpa_mode="relative_position", rpa_kernel_size=(3, 5), rpa_interpolation="alerp"), (2, 6, 7, 5)),
    (dict(rpa_mode="relative_distance", rpa_kernel_size=4, rpa_interpolation="lerp", kernel_size=3, padding=1), (1, 6, 6, 9)),
    (dict(rpa_mode="relative_position", rpa_kernel_size=3, kernel_size=2, stride=2, rpa_interpolation="slerp"), (2, 6, 9, 8)),
    (dict(rpa_mode="relative_position", rpa_kernel_size=7, dilation=2, kernel_size=3, use_scale=False), (1, 6, 9, 9)),
    (dict(rpa_mode="relative_position", rpa_kernel_size=9), (1, 6, 3, 4)),     # hidden map smaller than the kernel
])
@pytest.mark.parametrize("block_elements", [1, 1 << 20])   # one query row per block / everything at once
def test_fast_path_equals_direct_formulation(ctor, shape, block_elements, monkeypatch):
    """Padding > 0 (crashed in the original), strides, dilation, odd sizes, several query blocks, float64."""
    monkeypatch.setitem(rpa._BLOCK_ELEMENTS, "cpu", block_elements)
    torch.manual_seed(1)
    block = MultiheadNonlocal2d(6, hidden_channels=3, num_heads=2, rpa_zero_init=False, **ctor).double()
    x = torch.randn(*shape, dtype=torch.float64)
    out = block(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _direct_block(block, x), rtol=1e-10, atol=1e-10)
    # gradients through the chunked path equal those of the direct one
    grads = torch.autograd.grad(out.square().sum(), [*block.a_k, *block.a_v, block.embed_conv[0].weight])
    direct = torch.autograd.grad(_direct_block(block, x).square().sum(), [*block.a_k, *block.a_v, block.embed_conv[0].weight])
    for g, ref in zip(grads, direct):
        torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-9)


# ---- the reference backend (the original's algorithm, spec §1.3/§4) against the fast path ----

RPA_CONFIGS = [
    ("relative_distance", 4, "nearest", False),
    ("relative_distance", 4, "lerp", False),
    ("relative_position", 5, "nearest", False),
    ("relative_position", 5, "alerp", False),
    ("relative_position", 5, "slerp", False),
    ("relative_position", 5, "lerp", False),           # = alerp
    ("relative_position", (3, 5), "slerp", False),     # non-square kernel
    ("relative_position", 5, "lerp", True),            # = nearest
    ("relative_position", 3, "slerp", True),           # the original's transposed table on non-square maps
    (None, None, "nearest", False),
]


@pytest.mark.parametrize("shape", [(2, 6, 6, 6), (2, 6, 5, 8)], ids=["square", "non_square"])
@pytest.mark.parametrize("mode,rpa_kernel,interpolation,bug_compatible", RPA_CONFIGS)
def test_reference_backend_equals_fast_path(mode, rpa_kernel, interpolation, bug_compatible, shape):
    """Outputs and gradients (input and every parameter), float64, embedding conv with padding."""
    torch.manual_seed(7)
    fast = MultiheadNonlocal2d(6, hidden_channels=3, num_heads=2, kernel_size=3, padding=1, rpa_mode=mode,
                               rpa_kernel_size=rpa_kernel, rpa_interpolation=interpolation, rpa_zero_init=False,
                               bug_compatible=bug_compatible).double()
    reference = copy.deepcopy(fast)
    reference.backend = "reference"
    x = torch.randn(*shape, dtype=torch.float64)
    results = []
    for block in (fast, reference):
        xi = x.clone().requires_grad_(True)
        out = block(xi)
        results.append((out, torch.autograd.grad(out.square().sum(), [xi, *block.parameters()])))
    (out, grads), (ref_out, ref_grads) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-9)


def test_reference_attend_ops_equal_the_fast_ones():
    torch.manual_seed(8)
    q = torch.rand(2, 3, 12, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, 12, 12, dtype=torch.float64, requires_grad=True)
    a = torch.rand(3, 5, 7, dtype=torch.float64, requires_grad=True)
    for op, first in ((rpa.relative_attend_query2d, q), (rpa.relative_attend_weight2d, w)):
        fast, ref = op(first, a, 3, 4), op(first, a, 3, 4, backend="reference")
        torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
        upstream = torch.randn_like(ref)
        grads, ref_grads = (torch.autograd.grad(out, [first, a], upstream) for out in (fast, ref))
        for g, g_ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_gradcheck_2d_block_and_ops():
    torch.manual_seed(2)
    block = MultiheadNonlocal2d(3, hidden_channels=2, num_heads=2, rpa_mode="relative_position", rpa_kernel_size=3,
                                rpa_interpolation="slerp", rpa_zero_init=False).double()
    _gradcheck_block(block, torch.randn(1, 3, 3, 4, dtype=torch.float64, requires_grad=True))
    q = torch.rand(1, 2, 6, dtype=torch.float64, requires_grad=True)
    a = torch.rand(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(1, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, a: rpa.relative_attend_query2d(q, a, 2, 3), (q, a), fast_mode=True)
    assert torch.autograd.gradcheck(lambda w, a: rpa.relative_attend_weight2d(w, a, 2, 3), (w, a), fast_mode=True)
    k = torch.rand(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k: rpa.spherical_pad2d(k, (2, 1, 1, 2), "slerp"), (k,), fast_mode=True)
    r = torch.rand(1, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: rpa.rotative_pad2d(r, (3, 3, 2, 2), "lerp"), (r,), fast_mode=True)


# ---- 1-D and 3-D: agreement with 2-D on height-1 / depth-1 inputs, gradcheck ----

def _copy_convs(src, dst, unsqueeze_dim):
    """Load src's convs into dst with a singleton spatial dim inserted at ``unsqueeze_dim`` (or removed)."""
    for name, p in dst.named_parameters():
        if name.startswith(("a_k", "a_v")):
            continue
        value = src.get_parameter(name).detach()
        if value.dim() < p.dim():
            value = value.unsqueeze(unsqueeze_dim)
        p.data.copy_(value.reshape(p.shape))


@pytest.mark.parametrize("mode,k1,k2,method", [
    ("relative_distance", 4, 4, "lerp"),
    ("relative_distance", 3, 3, "nearest"),
    ("relative_position", 5, (3, 5), "slerp"),
    ("relative_position", 3, (5, 3), "alerp"),
])
@pytest.mark.parametrize("embed_kernel", [1, 3])
def test_1d_agrees_with_2d_on_height_one(mode, k1, k2, method, embed_kernel):
    torch.manual_seed(3)
    one = MultiheadNonlocal1d(5, hidden_channels=3, num_heads=2, kernel_size=embed_kernel, rpa_mode=mode,
                              rpa_kernel_size=k1, rpa_interpolation=method, rpa_zero_init=False)
    two = MultiheadNonlocal2d(5, hidden_channels=3, num_heads=2, kernel_size=(1, embed_kernel), rpa_mode=mode,
                              rpa_kernel_size=k2, rpa_interpolation=method, rpa_zero_init=False)
    _copy_convs(one, two, 2)
    for a1, a2 in zip([*one.a_k, *one.a_v], [*two.a_k, *two.a_v]):
        if mode == "relative_position":      # a height-1 map sees only the kernel's centre row
            a2.data[:, k2[0] // 2] = a1.data
        else:
            a2.data.copy_(a1.data)
    x = torch.randn(2, 5, 11)
    torch.testing.assert_close(one(x), two(x.unsqueeze(2)).squeeze(2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,k3,k2,method", [
    ("relative_distance", 5, 5, "lerp"),
    ("relative_position", (3, 5, 5), (5, 5), "slerp"),
    ("relative_position", (1, 3, 5), (3, 5), "nearest"),
])
def test_3d_agrees_with_2d_on_depth_one(mode, k3, k2, method):
    torch.manual_seed(4)
    three = MultiheadNonlocal3d(5, hidden_channels=3, num_heads=2, kernel_size=(1, 3, 3), rpa_mode=mode,
                                rpa_kernel_size=k3, rpa_interpolation=method, rpa_zero_init=False)
    two = MultiheadNonlocal2d(5, hidden_channels=3, num_heads=2, kernel_size=3, rpa_mode=mode,
                              rpa_kernel_size=k2, rpa_interpolation=method, rpa_zero_init=False)
    _copy_convs(two, three, 2)
    for a3, a2 in zip([*three.a_k, *three.a_v], [*two.a_k, *two.a_v]):
        a2.data.copy_(a3.data[:, k3[0] // 2] if mode == "relative_position" else a3.data)
    x = torch.randn(2, 5, 7, 9)
    torch.testing.assert_close(three(x.unsqueeze(2)).squeeze(2), two(x), rtol=1e-5, atol=1e-5)


def _gradcheck_block(block, x):
    params = {n: p.detach().clone().requires_grad_() for n, p in block.named_parameters()
              if n.startswith(("a_k", "a_v", "embed_conv.0"))}
    names = list(params)

    def f(x, *values):
        return functional_call(block, dict(zip(names, values)), (x,))

    # fast mode: checks random projections of the Jacobian (a full one costs a forward per element)
    assert torch.autograd.gradcheck(f, (x, *params.values()), fast_mode=True)


@pytest.mark.parametrize("mode,kernel", [("relative_distance", 3), ("relative_position", 3)])
def test_gradcheck_1d(mode, kernel):
    torch.manual_seed(5)
    block = MultiheadNonlocal1d(3, hidden_channels=2, num_heads=2, kernel_size=2, rpa_mode=mode, rpa_kernel_size=kernel,
                                rpa_interpolation="lerp" if mode == "relative_distance" else "nearest",
                                rpa_zero_init=False).double()
    _gradcheck_block(block, torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("mode,kernel", [("relative_distance", 3), ("relative_position", (3, 3, 3))])
def test_gradcheck_3d(mode, kernel):
    torch.manual_seed(6)
    block = MultiheadNonlocal3d(3, hidden_channels=2, num_heads=1, rpa_mode=mode, rpa_kernel_size=kernel,
                                rpa_interpolation="lerp" if mode == "relative_distance" else "slerp",
                                rpa_zero_init=False).double()
    _gradcheck_block(block, torch.randn(1, 3, 2, 3, 3, dtype=torch.float64, requires_grad=True))


def test_3d_relative_position_depth_uses_nearest_slice():
    """Across depth the kernel's border slices extend outward (our design; no original)."""
    block = MultiheadNonlocal3d(2, rpa_mode="relative_position", rpa_kernel_size=(3, 3, 3), rpa_zero_init=False)
    table = block.reference_affinity("k", 0, (4, 2, 2))            # (d, 7, 3, 3), depth centre at 3
    a = block.a_k[0].detach()
    torch.testing.assert_close(table[:, 3, :, :], a[:, 1])         # zero depth displacement: centre slice
    torch.testing.assert_close(table[:, 0, 1, 1], a[:, 0, 1, 1])   # depth -3: first slice
    torch.testing.assert_close(table[:, 6, 1, 1], a[:, 2, 1, 1])   # depth +3: last slice


def test_tables_are_cached_per_size():
    """The expansion map and its taps (what the fused attention reads) are built once per hidden size."""
    rpa._relative_map.cache_clear()
    rpa._relative_taps.cache_clear()
    block = MultiheadNonlocal2d(4, rpa_mode="relative_position", rpa_kernel_size=3)
    for _ in range(3):
        block(torch.randn(1, 4, 5, 6))
    block(torch.randn(1, 4, 6, 5))
    assert rpa._relative_map.cache_info().misses == 2
    # built once per size; the block keeps its last taps, so repeated calls at one size skip even the lookup
    assert rpa._relative_taps.cache_info().misses == 2
