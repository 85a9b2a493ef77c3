"""ONNX translations of the native ops, for ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``.

Each translation is an onnxscript function traced from standard ONNX ops (opset 18) that computes the same
math as the op's pure-torch reference (:func:`zoo.ops.rpe_index.rpe_index_reference`,
:func:`zoo.ops.neighborhood_attn.neighborhood_attention_reference`,
:func:`zoo.ops.relative_attn.relative_attention_reference`): gathers of the windows / relative entries,
a masked softmax, matrix products. The geometry of an op call (window, grid, stride) is fixed when the
model is exported, so the index tables become constants of the graph; the batch dimension stays symbolic.
Only the inference outputs are translated (the backward ops never appear in an exported inference graph).

:func:`translation_table` is what :func:`zoo.export.to_onnx` passes to the exporter: one entry per op of
the ``relzoo`` library that is loaded (an op that was never built never appears in a graph).
Needs the ``export`` extra (onnx, onnxscript) to translate; the module imports without it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from zoo.errors import ConfigError, DependencyError

try:  # the ``export`` extra; without it translation_table() says what to install
    from onnxscript import ir
    from onnxscript import opset18 as op
except ImportError:
    ir = op = None

__all__ = ["translation_table", "rpe_index_onnx", "neighborhood_attn_onnx", "relative_attn_onnx",
           "relative_attend_pairs_onnx", "relative_attend_dot_onnx", "adaptive_max_pool2d_onnx"]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _dims(value) -> list[Optional[int]]:
    """Sizes of ``value``'s shape, None for a symbolic dimension."""
    out = []
    for d in value.shape:
        if isinstance(d, int):
            out.append(d)
        elif isinstance(d, ir.SymbolicDim):
            out.append(None)
        else:
            out.append(int(d))
    return out


def _const(array: np.ndarray):
    return op.Constant(value=ir.tensor(np.ascontiguousarray(array)))


def _ints(values: Sequence[int]):
    return _const(np.asarray(list(values), dtype=np.int64))


def _neg_inf_like(x):
    return op.CastLike(_const(np.asarray(-np.inf, dtype=np.float32)), x)


def _zero_like(x):
    return op.CastLike(_const(np.asarray(0.0, dtype=np.float32)), x)


def _masked_softmax(scores, empty_rows: Optional[np.ndarray] = None):
    """Softmax over the last axis; a row whose every entry is -inf gives zeros (not NaN), as the ops do.

    ``empty_rows``: a static mask broadcastable to the scores' rows when the empty rows are known from the
    geometry; None: found from the scores (data-dependent padding masks)."""
    if empty_rows is not None:
        if not empty_rows.any():
            return op.Softmax(scores, axis=-1)
        empty = _const(empty_rows)
    else:
        row_max = op.ReduceMax(scores, _ints([-1]), keepdims=1)
        empty = op.IsInf(row_max, detect_negative=1, detect_positive=0)
    zero = _zero_like(scores)
    probs = op.Softmax(op.Where(empty, zero, scores), axis=-1)
    return op.Where(empty, zero, probs)


# ----------------------------------------------------------------------------------------------
# rpe_index: out[..., i, j] = x[..., i, index[i, j]]
# ----------------------------------------------------------------------------------------------

def rpe_index_onnx(x, index):
    """``relzoo::rpe_index``: a GatherElements along the last axis with the (Lq, Lk) index broadcast over
    the leading axes, like :func:`~zoo.ops.rpe_index.rpe_index_reference`."""
    lead = op.Slice(op.Shape(x), _ints([0]), _ints([-2]))
    shape = op.Concat(lead, op.Shape(index), axis=0)
    return op.GatherElements(x, op.Expand(op.Cast(index, to=ir.DataType.INT64), shape), axis=-1)


# ----------------------------------------------------------------------------------------------
# neighborhood_attn (SASA)
# ----------------------------------------------------------------------------------------------

def _window_table(hq: int, wq: int, hk: int, wk: int, kernel, stride, offset):
    """(Lq, K) flattened key position of every (query, window slot) (0 where outside) and its validity."""
    (kh, kw), (sh, sw), (oh, ow) = kernel, stride, offset
    i = np.arange(hq)[:, None, None, None]
    j = np.arange(wq)[None, :, None, None]
    a = np.arange(kh)[None, None, :, None]
    b = np.arange(kw)[None, None, None, :]
    rows = np.broadcast_to(sh * i + oh + a, (hq, wq, kh, kw))
    cols = np.broadcast_to(sw * j + ow + b, (hq, wq, kh, kw))
    valid = (rows >= 0) & (rows < hk) & (cols >= 0) & (cols < wk)
    ids = np.where(valid, rows * wk + cols, 0).reshape(hq * wq, kh * kw).astype(np.int64)
    return ids, valid.reshape(hq * wq, kh * kw)


def neighborhood_attn_onnx(q, k, v, rel=None, mix=None, kernel_size: Sequence[int] = (1, 1),
                           stride: Sequence[int] = (1, 1), offset: Sequence[int] = (0, 0)):
    """``relzoo::neighborhood_attn`` -> (out, probs): the windows gathered by a constant (Lq, K) table of key
    positions, ``q . (k + rel)`` per slot, softmax over the in-range slots, the weighted sum of the values
    (through ``mix`` for the SASA stem), as :func:`~zoo.ops.neighborhood_attn.neighborhood_attention_reference`.
    Shapes as the op: q (B, G, Hq, Wq, D), k (B, G, Hk, Wk, D), v (B, G, Hk, Wk, Dv) or (..., M, Dv)."""
    _, _, hq, wq, d = _dims(q)
    _, _, hk, wk, _ = _dims(k)
    if None in (hq, wq, hk, wk, d):
        raise ConfigError(f"ONNX translation of neighborhood_attn needs static grids, got q {list(q.shape)}, "
                          f"k {list(k.shape)}")
    kernel, stride, offset = tuple(kernel_size), tuple(stride), tuple(offset)
    slots = kernel[0] * kernel[1]
    ids, valid = _window_table(hq, wq, hk, wk, kernel, stride, offset)
    table = _const(ids)
    keys = op.Gather(op.Reshape(k, _ints([0, 0, hk * wk, d])), table, axis=2)        # (B, G, Lq, K, D)
    if rel is not None:
        keys = op.Add(keys, op.Unsqueeze(rel, _ints([0, 2])))                          # + (1, G, 1, K, D)
    queries = op.Reshape(q, _ints([0, 0, hq * wq, 1, d]))                               # (B, G, Lq, 1, D)
    logits = op.MatMul(queries, op.Transpose(keys, perm=[0, 1, 2, 4, 3]))               # (B, G, Lq, 1, K)
    logits = op.Where(_const(valid.reshape(hq * wq, 1, slots)), logits, _neg_inf_like(logits))
    probs = _masked_softmax(logits, ~valid.any(-1).reshape(hq * wq, 1, 1))
    dv = _dims(v)[-1]
    values = op.Gather(op.Reshape(v, _ints([0, 0, hk * wk, -1])), table, axis=2)       # (B, G, Lq, K, M*Dv)
    weights = probs
    if mix is not None:
        m = _dims(mix)[0]
        # weight of (slot t, mixture m) = p_t mix[m, t]; values as (K*M, Dv)
        weights = op.Reshape(op.Mul(op.Unsqueeze(probs, _ints([-1])), op.Transpose(mix, perm=[1, 0])),
                             _ints([0, 0, hq * wq, 1, slots * m]))
        values = op.Reshape(values, _ints([0, 0, hq * wq, slots * m, dv]))
    out = op.Reshape(op.MatMul(weights, values), _ints([0, 0, hq, wq, dv]))
    return out, op.Reshape(probs, _ints([0, 0, hq, wq, slots]))


# ----------------------------------------------------------------------------------------------
# relative_attn (iRPE, RPA and plain attention)
# ----------------------------------------------------------------------------------------------

def _token_offsets(grid: Sequence[int], skip: int) -> np.ndarray:
    """(L, L) offset index of every (query, key) pair; O for pairs touching a skip token
    (:func:`zoo.ops.relative_attn._token_offsets`, in numpy)."""
    gt, gh, gw = grid
    wd, area = 2 * gw - 1, (2 * gh - 1) * (2 * gw - 1)
    s = np.arange(gt * gh * gw)
    pos = (s // (gh * gw)) * area + (s // gw) % gh * wd + s % gw
    center = (gt - 1) * area + (gh - 1) * wd + gw - 1
    n = skip + s.size
    offsets = np.full((n, n), 2 * center + 1, dtype=np.int64)
    offsets[skip:, skip:] = pos[:, None] - pos[None, :] + center
    return offsets


def _pair_term(values, index, weight, offsets: np.ndarray, num_taps: int, batch_shape):
    """(B, H, L, L) sum_t w_t(o) values[..., i, idx_t(o(i, j))] (:func:`zoo.ops.relative_attn.pair_bias`)."""
    entries = op.Gather(op.Cast(index, to=ir.DataType.INT64), _const(offsets), axis=1)   # (T, L, L)
    weights = None if weight is None else op.Gather(weight, _const(offsets), axis=1)
    total = None
    for t in range(num_taps):
        ids = op.Expand(op.Gather(entries, _ints([t]), axis=0), batch_shape)  # (1, L, L) -> (B, H, L, L)
        part = op.GatherElements(values, ids, axis=-1)
        if weights is not None:
            part = op.Mul(part, op.CastLike(op.Gather(weights, _ints([t]), axis=0), part))
        total = part if total is None else op.Add(total, part)
    return total


def _pair_scatter(probs, index, weight, offsets: np.ndarray, num_taps: int, num_entries: int, batch_shape):
    """(B, H, Lq, K) G[i, e] = sum_{j, t: idx_t(o(i, j)) = e} w_t p[i, j] (:func:`zoo.ops.relative_attn.pair_scatter`)."""
    entries = op.Gather(op.Cast(index, to=ir.DataType.INT64), _const(offsets), axis=1)
    weights = None if weight is None else op.Gather(weight, _const(offsets), axis=1)
    lead = op.Slice(op.Shape(probs), _ints([0]), _ints([-1]))
    out = op.Expand(_zero_like(probs), op.Concat(lead, _ints([num_entries]), axis=0))
    for t in range(num_taps):
        ids = op.Expand(op.Gather(entries, _ints([t]), axis=0), batch_shape)
        src = probs if weights is None else op.Mul(probs, op.CastLike(op.Gather(weights, _ints([t]), axis=0), probs))
        out = op.ScatterElements(out, ids, src, axis=-1, reduction="add")
    return out


def relative_attn_onnx(q, k, v, xq=None, xk=None, q_index=None, q_weight=None, k_index=None, k_weight=None,
                       v_index=None, v_weight=None, num_value_entries: int = 0, attn_bias=None,
                       key_padding_mask=None, grid: Sequence[int] = (1, 1, 1), skip: int = 0,
                       dropout_p: float = 0.0, seed: int = 0):
    """``relzoo::relative_attn`` -> (out, lse, entries), inference: the scores materialised with the query /
    key terms gathered from their per-entry values, the bias and the padding mask, a masked softmax, the
    value product and, for a value term, the probabilities scattered per entry, as
    :func:`~zoo.ops.relative_attn.relative_attention_reference` (the module docstring there defines it)."""
    if dropout_p > 0:
        raise ConfigError("ONNX translation of relative_attn: attention dropout is for training; export in eval mode")
    offsets = _token_offsets(tuple(grid), int(skip))
    scores = op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2]))                          # (B, H, Lq, Lk)
    pairs = op.Shape(scores)
    if xq is not None:
        scores = op.Add(scores, _pair_term(xq, q_index, q_weight, offsets, _dims(q_index)[0], pairs))
    if xk is not None:  # keys act as queries: the pair (j, i), transposed
        key_pairs = op.Shape(op.Transpose(scores, perm=[0, 1, 3, 2]))
        term = _pair_term(xk, k_index, k_weight, offsets, _dims(k_index)[0], key_pairs)
        scores = op.Add(scores, op.Transpose(term, perm=[0, 1, 3, 2]))
    if attn_bias is not None:
        scores = op.Add(scores, op.CastLike(attn_bias, scores))
    if key_padding_mask is not None:
        padded = op.Unsqueeze(key_padding_mask, _ints([1, 2]))                          # (B, 1, 1, Lk)
        scores = op.Where(padded, _neg_inf_like(scores), scores)
    probs = _masked_softmax(scores)
    out = op.MatMul(probs, v)
    lse = op.ReduceLogSumExp(scores, _ints([-1]), keepdims=0)
    if v_index is not None:
        entries = _pair_scatter(probs, v_index, v_weight, offsets, _dims(v_index)[0], int(num_value_entries), pairs)
    else:
        entries = op.Expand(_zero_like(q), _ints([0]))
    return out, lse, entries


# ----------------------------------------------------------------------------------------------
# The RPA original's 2-D attend ops
# ----------------------------------------------------------------------------------------------

def _cells(height: int, width: int) -> np.ndarray:
    """(N, N) flat cell (y_j - y_i + H - 1) (2W - 1) + x_j - x_i + W - 1 of every pair of an H x W map."""
    y, x = np.divmod(np.arange(height * width), width)
    return ((y[None, :] - y[:, None] + height - 1) * (2 * width - 1) + x[None, :] - x[:, None] + width - 1)


def _pair_table(table, height: int, width: int):
    """(C, N, N) table[c, cell(i, j)]."""
    flat = op.Reshape(table, _ints([0, -1]))
    return op.Gather(flat, _const(_cells(height, width).astype(np.int64)), axis=1)


def relative_attend_pairs_onnx(x, table, height: int, width: int):
    """``relzoo::relative_attend_pairs``: R[b, i, j] = sum_c x[b, c, i] table[c, cell(i, j)]."""
    return op.Einsum(x, _pair_table(table, height, width), equation="bci,cij->bij")


def relative_attend_dot_onnx(pairs, table, height: int, width: int):
    """``relzoo::relative_attend_dot``: O[b, c, i] = sum_j pairs[b, i, j] table[c, cell(i, j)]."""
    return op.Einsum(pairs, _pair_table(table, height, width), equation="bij,cij->bci")


# ----------------------------------------------------------------------------------------------
# aten ops the dynamo exporter has no translation for
# ----------------------------------------------------------------------------------------------

def _adaptive_windows(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive pooling windows along one axis: [floor(i n / m), ceil((i + 1) n / m))."""
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


def _max_along(x, axis: int, windows):
    """Max and first argmax (as an index into ``axis``) over each window along ``axis``, concatenated."""
    values, indices = [], []
    for start, end in windows:
        part = op.Slice(x, _ints([start]), _ints([end]), _ints([axis]))
        values.append(op.ReduceMax(part, _ints([axis]), keepdims=1))
        indices.append(op.Add(op.ArgMax(part, axis=axis, keepdims=1), _ints([start])))
    return op.Concat(*values, axis=axis), op.Concat(*indices, axis=axis)


def adaptive_max_pool2d_onnx(x, output_size: Sequence[int]):
    """``aten::adaptive_max_pool2d`` -> (values, indices) for static sizes: the max over each adaptive window,
    taken separably (rows, then columns); indices are flat ``row * W + col`` as PyTorch's (for exact ties the
    first column's row wins, where PyTorch scans row-major)."""
    *_, h, w = _dims(x)
    if h is None or w is None:
        raise ConfigError(f"ONNX translation of adaptive_max_pool2d needs a static input size, got {list(x.shape)}")
    oh, ow = output_size
    rows_max, rows_at = _max_along(x, -2, _adaptive_windows(h, oh))                    # (..., oh, W)
    values, cols_at = _max_along(rows_max, -1, _adaptive_windows(w, ow))               # (..., oh, ow)
    row_of_max = op.GatherElements(rows_at, cols_at, axis=-1)
    return values, op.Add(op.Mul(row_of_max, _ints([w])), cols_at)


_TRANSLATIONS = {
    "rpe_index": rpe_index_onnx,
    "neighborhood_attn": neighborhood_attn_onnx,
    "relative_attn": relative_attn_onnx,
    "relative_attend_pairs": relative_attend_pairs_onnx,
    "relative_attend_dot": relative_attend_dot_onnx,
}


def translation_table() -> dict:
    """``{torch.ops.relzoo.<op>.default: translation}`` for every relzoo op that is loaded in this process, and
    the aten ops the exporter cannot translate itself (``adaptive_max_pool2d``, in the detector's pyramid)."""
    if op is None:
        raise DependencyError("ONNX export needs onnx and onnxscript: pip install 'relzoo[export]'")
    table = {torch.ops.aten.adaptive_max_pool2d.default: adaptive_max_pool2d_onnx}
    for name, fn in _TRANSLATIONS.items():
        if _schema_exists(name):
            table[getattr(torch.ops.relzoo, name).default] = fn
    return table


def _schema_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"relzoo::{name}", "")
    except RuntimeError:
        return False
    return True
