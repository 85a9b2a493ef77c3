"""RSA layer: parity with the original (golden fixtures), both formulations, errors."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import load_case
from zoo.layers.rsa import RSA, RSADims, rsa_core_chunked, rsa_core_reference
from zoo.models.resnet import ResNet

LAYER_CASES = ["rsa_l3_VplusR_VplusR", "rsa_l2ch_V_V", "rsa_R_VplusR_stride2"]


def _check_grads(module, tensors, meta, prefix=""):
    """Parameter gradients within the README rule |mine - ref| <= 1e-4 max|ref| + 1e-4 |ref|."""
    for name, param in module.named_parameters():
        ref = tensors[f"grad_{prefix}{name}"]
        bound = 1e-4 * ref.abs().max() + 1e-4 * ref.abs()
        err = (param.grad - ref).abs()
        assert bool((err <= bound).all()), f"{meta['case']}: grad of {name} off by {err.max():.3g}"


def _run_case(module, meta, tensors):
    x = tensors["input"].float().requires_grad_(True)
    out = module(x)
    (out * tensors["grad_output"].float()).sum().backward()
    tol = meta["tolerance"]
    assert out.shape == tensors["output"].shape
    torch.testing.assert_close(out, tensors["output"], rtol=1e-4, atol=tol["output"]["atol"])
    torch.testing.assert_close(x.grad, tensors["grad_input"], rtol=1e-4, atol=tol["grad_input"]["atol"])


# The reference formulation at layer3 size takes several times longer (it is what the chunked one
# improves on); it is held equal to the chunked one on every type in test_chunked_equals_reference_*.
@pytest.mark.parametrize("case,backend", [(c, i) for c in LAYER_CASES for i in ("auto", "reference")
                                       if (c, i) != ("rsa_l3_VplusR_VplusR", "reference")])
def test_layer_matches_original(case, backend):
    meta, tensors = load_case("rsa", case)
    layer = RSA(**meta["constructor_args"], backend=backend)
    # same keys, same order, same shapes as the original's state_dict
    assert [(k, list(v.shape)) for k, v in layer.state_dict().items()] == \
        [(k, list(v)) for k, v in meta["state_dict_keys"].items()]
    layer.load_state_dict({k[len("state."):]: v.float() for k, v in tensors.items() if k.startswith("state.")})
    _run_case(layer, meta, tensors)
    _check_grads(layer, tensors, meta)


def test_derived_sizes_match_fixture():
    for case in LAYER_CASES:
        meta, _ = load_case("rsa", case)
        layer = RSA(**meta["constructor_args"])
        d = meta["derived_dims"]
        assert (layer.dk, layer.dv, layer.dd, layer.ksize, list(layer.pad)) == \
            (d["dk"], d["dv"], d["dd"], d["ksize"], list(d["pad"]))
        assert layer.projection.weight.shape[0] == d["d_hid"]


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_rsa_bottleneck_block_matches_original(backend):
    """The RSA block as RSANet builds it: the shared ResNet's Bottleneck with RSA as conv2."""
    meta, tensors = load_case("rsa", "rsa_block_l1")
    cfg = meta["constructor_args"]["config"]

    def spatial(stage, block, width, stride):
        if (stage, block) != (1, 2):
            return None
        return RSA(width, width, nh=cfg["nh"], dk=cfg["dk"], dv=cfg["dv"], dd=cfg["dd"],
                   kernel_size=cfg["kernel_size"], kernel_type=cfg["kernel_type"], feat_type=cfg["feat_type"],
                   backend=backend)

    net = ResNet(layers=(3, 1, 1, 1), conv_dims=3, spatial_layer=spatial)
    block = net.layer1[2].eval()
    state = block.state_dict()
    assert [(k, list(v.shape)) for k, v in state.items()] == \
        [(k, list(v)) for k, v in meta["state_dict_keys"].items()]
    loaded = {k[len("state."):]: v.float() for k, v in tensors.items() if k.startswith("state.")}
    for key in state:
        if key.endswith("num_batches_tracked"):
            loaded[key] = state[key]
    block.load_state_dict(loaded)
    _run_case(block, meta, tensors)
    _check_grads(block, tensors, meta)


def _random_inputs(dims: RSADims, n, t, h, w, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ks = dims.kernel_size

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_(True)

    q = rnd(n, dims.nh, dims.dk, t, h, w)
    k = rnd(n, dims.dk, t, h, w) if dims.relational_kernel else None
    v = rnd(n, dims.dv, t, h, w)
    H1 = rnd(dims.dk * dims.dd, 1, *ks, scale=0.2) if dims.relational_kernel else None
    H2 = rnd(dims.dd, 1, *ks, scale=0.2)
    G = rnd(dims.dv, 1, *ks, scale=0.2) if dims.relational_context else None
    P1 = rnd(1, dims.dk, dims.dd) if dims.kernel_type == "VplusR" else None
    I = rnd(1, dims.dv, dims.dv) if dims.feat_type == "VplusR" else None
    return q, k, v, H1, H2, G, P1, I


@pytest.mark.parametrize("kernel_type,feat_type", list(itertools.product(["V", "R", "VplusR"], repeat=2)))
def test_chunked_equals_reference_all_types(kernel_type, feat_type):
    """Every kernel/context type, several sample and channel slices (tiny budget), float64."""
    dd = 3 if kernel_type != "V" else 4  # dd != dk where allowed
    dims = RSADims(nh=2, dk=4, dv=4, dd=dd, kernel_size=(3, 3, 5), kernel_type=kernel_type, feat_type=feat_type)
    args = _random_inputs(dims, 3, 3, 4, 5, torch.float64)
    q, k, v = args[:3]  # the core needs no normalised inputs to be compared
    ref = rsa_core_reference(q, k, v, *args[3:], dims)
    upstream = torch.randn_like(ref)
    leaves = [a for a in args if a is not None]
    ref_grads = torch.autograd.grad((ref * upstream).sum(), leaves)
    # budget 60 elements: one sample does not fit, so channels are sliced too (and samples one by one)
    for budget in (60, 1 << 20):
        out = rsa_core_chunked(q, k, v, *args[3:], dims, budget=budget)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        grads = torch.autograd.grad((out * upstream).sum(), leaves)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_chunked_inference_and_batch_slices_float32():
    """Batch of several samples, no-grad path, default budget: equal to the reference."""
    torch.manual_seed(0)
    layer = RSA(32, 32, nh=4, dk=0, dv=0, dd=0, kernel_size=(3, 5, 5), kernel_type="VplusR", feat_type="VplusR")
    ref = RSA(32, 32, nh=4, dk=0, dv=0, dd=0, kernel_size=(3, 5, 5), kernel_type="VplusR", feat_type="VplusR",
              backend="reference")
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(3, 32, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-6)
    small = RSA(32, 32, nh=4, dk=0, dv=0, dd=0, kernel_size=(3, 5, 5), kernel_type="VplusR", feat_type="VplusR",
                chunk_budget=4000)
    small.load_state_dict(layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref(x), rtol=1e-5, atol=1e-6)


def test_original_defaults_and_init():
    layer = RSA(64, 64)  # class defaults: nh 1, dk 16, kernel (3,7,7), 'V'/'V'
    assert (layer.nh, layer.dk, layer.dv, layer.dd, layer.kernel_size) == (1, 16, 64, 16, (3, 7, 7))
    assert list(layer.state_dict()) == ["projection.weight", "H2.weight"]
    full = RSA(64, 64, nh=8, dk=0, dv=0, dd=0, kernel_size=(5, 7, 7), kernel_type="VplusR", feat_type="VplusR")
    assert list(full.state_dict()) == ["P1", "I", "projection.weight", "H1.weight", "H2.weight", "G.weight"]
    torch.testing.assert_close(full.I.data, torch.eye(8)[None])
    assert full.P1.shape == (1, 8, 8)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="kernel_type"):
        RSA(16, 16, kernel_type="X")
    with pytest.raises(ValueError, match="feat_type"):
        RSA(16, 16, feat_type="Q")
    with pytest.raises(ValueError, match="dd must equal dk"):
        RSA(16, 16, nh=2, dk=4, dd=2, kernel_type="V")
    with pytest.raises(ValueError, match="dv must equal dk"):
        RSA(16, 16, nh=2, dk=4, feat_type="VplusR")
    with pytest.raises(ValueError, match="impl"):
        RSA(16, 16, impl="fast")
    layer = RSA(16, 16, nh=2, dk=0)
    with pytest.raises(ValueError, match=r"\(N, 16, T, H, W\)"):
        layer(torch.randn(1, 8, 2, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, 16, T, H, W\)"):
        layer(torch.randn(1, 16, 4, 4))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(1, 16, 2, 4, 4, dtype=torch.long))
