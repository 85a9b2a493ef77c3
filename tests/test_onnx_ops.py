"""ONNX translations of the native ops (zoo.ops.onnx): a module calling the native op, exported by the dynamo
exporter with the translation table and run by onnxruntime, gives the op's pure-torch reference (1e-5).

Small shapes; the shapes cover what the models use and the edges of the
definitions: windows partly or wholly outside the key grid, strides and offsets, the SASA stem's value
mixture; skip tokens, two weighted taps, query / key / value terms, a bias and a padding mask; adaptive
pooling windows that overlap (sizes that do not divide).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zoo import ops
from zoo.ops.neighborhood_attn import neighborhood_attention, neighborhood_attention_reference
from zoo.ops.relative_attn import (Term, attend_dot, attend_pairs, pair_taps, relative_attention,
                                   relative_attention_reference)
from zoo.ops.rpe_index import rpe_index, rpe_index_reference

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from zoo.ops.onnx import translation_table  # noqa: E402

ATOL = 1e-5
pytestmark = pytest.mark.slow  # an export takes 5-20 s here


@pytest.fixture(scope="module", autouse=True)
def native_ops():
    if ops.mode() == "reference":
        pytest.skip("RELZOO_OPS=reference: no native op to translate")
    for name in ("rpe_index", "neighborhood_attn", "relative_attn"):
        ops.load(name)


class _Call(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def onnx_run(fn, *inputs, dynamic_batch: bool = False):
    """Export ``fn(*inputs)`` with the translation table and run it in onnxruntime on ``inputs``."""
    dynamic = None
    if dynamic_batch:
        dynamic = {"args": tuple({0: torch.export.Dim("batch", min=1, max=64)} if i == 0 else None
                                 for i in range(len(inputs)))}
    program = torch.onnx.export(_Call(fn).eval(), inputs, dynamo=True, custom_translation_table=translation_table(),
                                dynamic_shapes=dynamic, verbose=False)
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return [torch.from_numpy(o) for o in session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})]


def assert_close(got, want):
    assert got.shape == want.shape, f"{tuple(got.shape)} != {tuple(want.shape)}"
    assert float((got - want).abs().max()) <= ATOL


def test_rpe_index():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 12, 9, generator=gen)
    index = torch.randint(0, 9, (12, 12), generator=gen, dtype=torch.int32)
    (got,) = onnx_run(lambda x: rpe_index(x, index, backend="native"), x)
    assert_close(got, rpe_index_reference(x, index))


# (q grid, k grid, kernel, stride, offset, with rel, mixture size)
NEIGHBORHOODS = {
    "sasa_same": ((6, 5), (6, 5), (3, 3), (1, 1), (-1, -1), True, 0),
    "strided_partial": ((3, 4), (7, 8), (3, 5), (2, 2), (0, -2), True, 0),
    "empty_windows_mixture": ((4, 4), (4, 4), (2, 2), (1, 1), (3, -5), False, 4),
}


@pytest.mark.parametrize("case", sorted(NEIGHBORHOODS))
def test_neighborhood_attn(case):
    (hq, wq), (hk, wk), kernel, stride, offset, with_rel, mixture = NEIGHBORHOODS[case]
    gen = torch.Generator().manual_seed(1)
    b, g, d, dv, slots = 2, 3, 4, 5, kernel[0] * kernel[1]
    q = torch.randn(b, g, hq, wq, d, generator=gen)
    k = torch.randn(b, g, hk, wk, d, generator=gen)
    v = torch.randn(b, g, hk, wk, *((mixture,) if mixture else ()), dv, generator=gen)
    rel = torch.randn(g, slots, d, generator=gen) if with_rel else None
    mix = torch.rand(mixture, slots, generator=gen) if mixture else None
    geometry = dict(kernel_size=kernel, stride=stride, offset=offset)
    (got,) = onnx_run(lambda q, k, v: neighborhood_attention(q, k, v, rel, mix, backend="native", **geometry),
                      q, k, v, dynamic_batch=True)
    assert_close(got, neighborhood_attention_reference(q, k, v, rel, mix, **geometry))


# (batch, heads, grid, skip, query taps, key taps, value taps, weighted, bias, padding)
ATTENTIONS = {
    "irpe_qkv_skip_padding": (2, 2, (3, 3), 1, 1, 1, 1, False, False, True),
    "rpa_weighted_taps_bias_3d": (2, 1, (2, 2, 3), 0, 2, 0, 2, True, True, False),
}


@pytest.mark.parametrize("case", sorted(ATTENTIONS))
def test_relative_attn(case):
    batch, heads, grid, skip, tq, tk, tv, weighted, bias, padding = ATTENTIONS[case]
    gen = torch.Generator().manual_seed(2)
    L, O = skip + math.prod(grid), math.prod(2 * s - 1 for s in grid)

    def taps(T, K):
        return pair_taps(torch.randint(0, K, (T, O), generator=gen), grid=grid, skip=skip, num_entries=K,
                         weight=torch.rand(T, O, generator=gen) if weighted else None,
                         skip_ids=list(range(K - T, K)) if skip else None)

    q, k, v = (torch.randn(batch, heads, L, 8, generator=gen) for _ in range(3))
    xq = torch.randn(batch, heads, L, 7, generator=gen)
    xk = torch.randn(batch, heads, L, 5, generator=gen)
    table = torch.randn(heads, 6, 8, generator=gen)
    terms = {"query_term": Term(xq, taps(tq, 7)) if tq else None, "key_term": Term(xk, taps(tk, 5)) if tk else None,
             "value_term": Term(table, taps(tv, 6)) if tv else None}
    extra = {"attn_bias": torch.randn(1, 1, L, L, generator=gen) if bias else None}
    mask = torch.zeros(batch, L, dtype=torch.bool)
    mask[-1, -2:] = True

    def call(q, k, v, xq, xk, mask):
        named = {n: (None if t is None else Term({"query_term": xq, "key_term": xk}.get(n, t.values), t.taps))
                 for n, t in terms.items()}
        return relative_attention(q, k, v, **named, **extra, key_padding_mask=mask if padding else None,
                                  backend="native")

    (got,) = onnx_run(call, q, k, v, xq, xk, mask)
    want = relative_attention_reference(q, k, v, **{n: t for n, t in terms.items()}, **extra,
                                        key_padding_mask=mask if padding else None)
    assert_close(got, want)


def test_relative_attend_ops():
    gen = torch.Generator().manual_seed(3)
    x, table = torch.randn(2, 4, 12, generator=gen), torch.randn(4, 5, 7, generator=gen)
    pairs = torch.randn(2, 12, 12, generator=gen)
    got_pairs, got_dot = onnx_run(lambda x, p: (attend_pairs(x, table, 3, 4), attend_dot(p, table, 3, 4)), x, pairs)
    y, xs = torch.arange(12) // 4, torch.arange(12) % 4
    cell = table[:, y[None, :] - y[:, None] + 2, xs[None, :] - xs[:, None] + 3]            # (C, N, N)
    assert_close(got_pairs, torch.einsum("bci,cij->bij", x, cell))
    assert_close(got_dot, torch.einsum("bij,cij->bci", pairs, cell))


def test_adaptive_max_pool2d():
    x = torch.randn(2, 3, 10, 14, generator=torch.Generator().manual_seed(4))  # overlapping windows
    got, indices = onnx_run(lambda x: F.adaptive_max_pool2d(x, (3, 4), return_indices=True), x)
    want, want_indices = F.adaptive_max_pool2d(x, (3, 4), return_indices=True)
    assert_close(got, want)
    assert torch.equal(indices, want_indices)
