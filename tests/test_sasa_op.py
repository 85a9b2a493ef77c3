"""The neighbourhood-attention op: native kernel == unfold reference, gradients, dispatch, errors."""
from __future__ import annotations

import pytest
import torch

from conftest import native_op
from zoo.errors import OpsError
from zoo.ops import neighborhood_attn
from zoo.ops.neighborhood_attn import neighborhood_attention, neighborhood_attention_reference


@pytest.fixture(scope="module")
def native():
    """Build/load the op once; RELZOO_OPS=reference runs skip the native checks."""
    return native_op(neighborhood_attn.OP_NAME)


def _inputs(b, g, hq, wq, hk, wk, d, dv, kernel, m=0, rel=True, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kk = kernel[0] * kernel[1]

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(True)

    q, k = rnd(b, g, hq, wq, d), rnd(b, g, hk, wk, d)
    v = rnd(b, g, hk, wk, m, dv) if m else rnd(b, g, hk, wk, dv)
    r = rnd(g, kk, d) if rel else None
    mix = torch.rand(m, kk, generator=gen, dtype=dtype).requires_grad_(True) if m else None
    return q, k, v, r, mix


# (batch, heads, Hq, Wq, Hk, Wk, D, Dv, kernel, stride, offset, mixtures, rel)
CASES = {
    "masked_centred": (2, 3, 7, 9, 7, 9, 4, 5, (3, 3), (1, 1), (-1, -1), 0, True),
    "sasa_k7_small_map": (1, 2, 5, 6, 5, 6, 16, 16, (7, 7), (1, 1), (-3, -3), 0, True),
    "strided_rect_kernel": (2, 2, 5, 4, 9, 11, 4, 4, (3, 5), (2, 3), (-1, -2), 0, True),
    "prepadded_no_rel_mix": (1, 4, 6, 6, 10, 10, 1, 1, (4, 4), (1, 1), (0, 0), 3, False),
    "partly_empty_windows": (1, 1, 4, 4, 4, 4, 2, 3, (2, 2), (2, 2), (-3, 0), 2, True),
}


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_native_equals_reference_float64(native, case, device):
    """The CPU kernel, and the CUDA kernel where a device is visible, against the reference."""
    b, g, hq, wq, hk, wk, d, dv, kernel, stride, offset, m, rel = CASES[case]
    inputs = [t.detach().to(device).requires_grad_(True) if t is not None else None
              for t in _inputs(b, g, hq, wq, hk, wk, d, dv, kernel, m, rel)]
    kwargs = dict(kernel_size=kernel, stride=stride, offset=offset)
    ref = neighborhood_attention_reference(*inputs, **kwargs)
    out = neighborhood_attention(*inputs, backend="native", **kwargs)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    grad = torch.randn_like(ref)
    leaves = [t for t in inputs if t is not None]
    for a, e in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(a, e, atol=1e-11, rtol=1e-10)


def test_windows_entirely_outside_give_zero(native):
    # offset (-3, 0), stride 2, 2x2 windows on a 4x4 grid: query row 0 sees rows -3, -2 only
    q, k, v, rel, mix = _inputs(1, 1, 4, 4, 4, 4, 2, 3, (2, 2), rel=True)
    out = neighborhood_attention(q, k, v, rel, kernel_size=2, stride=2, offset=(-3, 0), backend="native")
    assert torch.count_nonzero(out[:, :, 0]) == 0
    assert torch.count_nonzero(out[:, :, 2]) > 0


# tiny versions of the cases above: gradcheck perturbs every input element
GRADCHECK_CASES = {
    "masked_centred": (1, 2, 3, 4, 3, 4, 2, 3, (3, 3), (1, 1), (-1, -1), 0, True),
    "strided_rect_kernel": (1, 1, 3, 2, 5, 5, 2, 2, (3, 2), (2, 3), (-1, 0), 0, True),
    "prepadded_no_rel_mix": (1, 2, 3, 3, 5, 5, 1, 2, (3, 3), (1, 1), (0, 0), 2, False),
}


@pytest.mark.parametrize("case", sorted(GRADCHECK_CASES))
def test_gradcheck_native(native, case):
    b, g, hq, wq, hk, wk, d, dv, kernel, stride, offset, m, rel = GRADCHECK_CASES[case]
    inputs = _inputs(b, g, hq, wq, hk, wk, d, dv, kernel, m, rel)
    present = [i for i, t in enumerate(inputs) if t is not None]

    def fn(*tensors):
        full = [None] * 5
        for i, t in zip(present, tensors):
            full[i] = t
        return neighborhood_attention(*full, kernel_size=kernel, stride=stride, offset=offset, backend="native")

    assert torch.autograd.gradcheck(fn, tuple(inputs[i] for i in present), fast_mode=True)


def test_float32_and_half_native(native):
    inputs64 = _inputs(2, 2, 6, 7, 6, 7, 8, 8, (5, 5), rel=True)
    ref = neighborhood_attention_reference(*inputs64, kernel_size=5, offset=-2)
    inputs32 = [t.detach().float() if t is not None else None for t in inputs64]
    out32 = neighborhood_attention(*inputs32, kernel_size=5, offset=-2, backend="native")
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, atol=1e-5, rtol=1e-5)
    half = [t.half() if t is not None else None for t in inputs32]
    out16 = neighborhood_attention(*half, kernel_size=5, offset=-2, backend="native")
    assert out16.dtype == torch.float16
    torch.testing.assert_close(out16.double(), ref, atol=2e-2, rtol=2e-2)


def test_opcheck_schema_fake_and_autograd(native):
    q, k, v, rel, _ = _inputs(1, 2, 4, 5, 4, 5, 4, 4, (3, 3))
    torch.library.opcheck(torch.ops.relzoo.neighborhood_attn.default,
                          (q, k, v, rel, None, [3, 3], [1, 1], [-1, -1]))
    q, k, v, _, mix = _inputs(1, 1, 4, 4, 6, 6, 2, 3, (3, 3), m=2, rel=False)
    torch.library.opcheck(torch.ops.relzoo.neighborhood_attn.default,
                          (q, k, v, None, mix, [3, 3], [1, 1], [0, 0]))


def test_reference_mode_never_builds(monkeypatch):
    monkeypatch.setenv("RELZOO_OPS", "reference")
    calls = []
    real = neighborhood_attn.neighborhood_attention_reference
    monkeypatch.setattr(neighborhood_attn, "neighborhood_attention_reference",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, rel, _ = _inputs(1, 1, 3, 3, 3, 3, 2, 2, (3, 3))
    neighborhood_attention(q, k, v, rel, kernel_size=3, offset=-1)
    assert calls == [1]
    with pytest.raises(OpsError, match="RELZOO_OPS=reference"):
        neighborhood_attention(q, k, v, rel, kernel_size=3, offset=-1, backend="native")


def test_bad_inputs_are_named():
    q, k, v, rel, _ = _inputs(1, 2, 3, 3, 3, 3, 4, 4, (3, 3))
    with pytest.raises(ValueError, match="rel must be"):
        neighborhood_attention(q, k, v, rel[:, :4], kernel_size=3)
    with pytest.raises(ValueError, match="q and k must be"):
        neighborhood_attention(q[0], k, v, kernel_size=3)
    with pytest.raises(ValueError, match="differ in batch, heads or head width"):
        neighborhood_attention(q[..., :2], k, v, kernel_size=3)
    with pytest.raises(TypeError, match="one floating dtype"):
        neighborhood_attention(q.float(), k, v, kernel_size=3)
    with pytest.raises(ValueError, match="with mix, v must be"):
        neighborhood_attention(q, k, v, None, torch.ones(2, 9, dtype=q.dtype), kernel_size=3)
    with pytest.raises(ValueError, match="backend must be"):
        neighborhood_attention(q, k, v, kernel_size=3, backend="fast")
