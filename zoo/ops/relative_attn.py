"""Attention with relative terms, fused: the one op behind every attention layer of the zoo.

Definition (:func:`relative_attention_reference`), per batch b and head h::

    s[i, j] = q_i . k_j                                  q already scaled by the caller
            + sum_t w_t(o) xq[i, idx_t(o)]               query term  (iRPE rpe_k, RPA key term)
            + sum_t w_t(o') xk[j, idx_t(o')]             key term    (iRPE rpe_q: keys act as queries)
            + attn_bias[i, j], -inf where key_padding_mask[j]
    p       = softmax_j(s)       a query whose keys are all masked gets p = 0 (output 0), as SDPA does
    out_i   = sum_j dropout(p)[i, j] (v_j + sum_t w_t(o) table[idx_t(o)])     value term (iRPE rpe_v, RPA)

Shapes: q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv); a query/key term is a :class:`Term` of
per-entry values (B or 1, H or 1, L or 1, K) (e.g. iRPE's per-bucket products q . w, (B, H, L, nb),
or a bias table broadcast over batch and queries) and the :class:`PairTaps` that says which
entries each pair reads; the value term's values are a table (H or 1, K, Dv).

Pairs and offsets. Tokens are ``skip`` leading extra tokens (class tokens) and then a (t, h, w) grid
in row-major order; a pair of spatial tokens has the offset query minus key, flattened over the
(2t-1) x (2h-1) x (2w-1) offsets (:func:`offset_grid`), index o; o' is the key-query offset
(O - 1 - o); pairs touching a skip token use one more column, O. A term's taps give for every
offset up to two entry ids and weights: iRPE's bucket of the offset (one tap; ``cross`` sums a row
and a column table, two taps), RPA's two interpolation taps of its displacement table. Relative
terms therefore cost per-entry products of size L x K and a small (T, O + 1) table, never an L x L
index or bias (except on the ``"sdpa"`` and ``"reference"`` paths, which materialise them).

Backends (:data:`zoo.ops.backend.ATTENTION_BACKENDS`; :func:`choose_backend` is what ``"auto"`` picks):

* ``"native"`` -- ``torch.ops.relzoo.relative_attn`` (``ops/relative_attn/``, CPU): the whole
  attention in one kernel over blocks of query rows, the terms gathered inside it and the value
  term scattered from the probabilities while they are in cache; backward recomputes the
  probabilities from the saved log-sum-exp. float32/float64 (half types run in float32).
* ``"sdpa"`` -- ``scaled_dot_product_attention`` with the terms as a float ``attn_mask`` made by the
  index step (:func:`zoo.ops.rpe_index`); with a value term, which needs the probabilities SDPA does
  not return, the explicit formulation (scores materialised, the probabilities scattered per entry).
* ``"flex"`` -- FlexAttention with a ``score_mod`` that reads the per-entry values and the taps table
  inside the kernel. No value term (FlexAttention returns no probabilities) and no dropout; no CPU
  backward (CPU: inference only, compiled on first use).
* ``"reference"`` -- :func:`relative_attention_reference`, the definition (``torch.gather``).

The value term (iRPE ``rpe_v``, RPA's value table) keeps the bucket-scatter formulation: per query the
probabilities summed per entry, G[i, e] (B, H, L, K), then ``G @ table``. How much of it is fused:

* ``"native"``: G is accumulated inside the kernel from each block of probabilities while they are in
  cache (no L x L probabilities are written); in backward the kernel gathers dG = dout @ table^T into
  dP the same way. Unfused: the two small products ``G @ table`` and ``dout @ table^T``
  ((B, H, L, K) x (K, Dv)) and the table's gradient ``G^T @ dout``, separate matmuls after the kernel.
* ``"sdpa"``: nothing; SDPA returns no probabilities, so a call with a value term runs the explicit
  formulation (L x L scores and probabilities materialised, G by ``scatter_add``).
* ``"flex"``: not available (no probabilities either): a :class:`~zoo.errors.ConfigError`, and
  ``"auto"`` never picks it for such a call.

Otherwise the ``"sdpa"`` path materialises the L x L bias (product and cross taps without skip tokens by
structured gathers, with no L x L index; the others through a cached L x L index), and ``"reference"``
materialises everything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from zoo.errors import ConfigError, InputError, OpsError
from zoo.ops.backend import ATTENTION_BACKENDS, check_backend, resolve
from zoo.ops.build import native_available, on_load, use_native
from zoo.ops.rpe_index import rpe_index

__all__ = ["OP_NAME", "PairTaps", "Term", "offset_grid", "pair_taps", "relative_attention",
           "relative_attention_reference", "choose_backend", "pair_bias", "pair_scatter", "flex_available",
           "compiled_flex_attention",
           "attend_pairs", "attend_dot"]

OP_NAME = "relative_attn"
_NATIVE_DTYPES = (torch.float32, torch.float64)

# Cached constants (offsets, taps, pair entries) are made outside inference mode: one first made under
# torch.inference_mode() would be an inference tensor that autograd refuses to save in a later training step.
_cached_constant = torch.inference_mode(False)


# ----------------------------------------------------------------------------------------------
# Pairs: the token grid, its offsets, and which entries a pair reads
# ----------------------------------------------------------------------------------------------

def _grid3(grid: Sequence[int]) -> tuple[int, int, int]:
    grid = tuple(int(g) for g in grid)
    if not 1 <= len(grid) <= 3 or min(grid) < 1:
        raise ConfigError(f"grid must be 1 to 3 positive sizes, got {grid}")
    return (1,) * (3 - len(grid)) + grid  # type: ignore[return-value]


@lru_cache(maxsize=64)
@_cached_constant
def offset_grid(grid: tuple[int, ...]) -> torch.Tensor:
    """(O, 3) int64 offsets (dt, dr, dc), query minus key, in offset-index order (row-major, each axis
    from -(size - 1) to size - 1). Read-only (cached)."""
    gt, gh, gw = _grid3(grid)
    axes = [torch.arange(-(n - 1), n) for n in (gt, gh, gw)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


@lru_cache(maxsize=64)
@_cached_constant
def _token_offsets(grid: tuple[int, int, int], skip: int, device: torch.device) -> torch.Tensor:
    """(L, L) int64: the offset index o(i, j) of every (query, key) pair; O for pairs touching a skip token."""
    gt, gh, gw = grid
    wd, area = 2 * gw - 1, (2 * gh - 1) * (2 * gw - 1)
    n = gt * gh * gw
    s = torch.arange(n, device=device)
    pos = (s // (gh * gw)) * area + (s // gw) % gh * wd + s % gw          # o(i, j) = pos_i - pos_j + center
    center = (gt - 1) * area + (gh - 1) * wd + gw - 1
    offsets = torch.full((skip + n, skip + n), 2 * center + 1, dtype=torch.long, device=device)
    offsets[skip:, skip:] = pos[:, None] - pos[None, :] + center
    return offsets


@dataclass(frozen=True, eq=False)
class PairTaps:
    """Which entries of a term every (query, key) pair reads (module docstring: pairs and offsets).

    Attributes:
        index: (T, O + 1) int32 entry ids, T in {1, 2}; column o for offset o, column O for pairs
            touching a skip token.
        weight: (T, O + 1) float weights of the taps, or None (every weight 1).
        grid: the (t, h, w) token grid; skip: leading extra tokens; L = skip + t h w.
        num_entries: K, the size of the entry axis the ids point into.

    Made once per layer configuration and size (:func:`pair_taps`), then reused: the layers cache them.
    """

    index: torch.Tensor
    weight: Optional[torch.Tensor]
    grid: tuple[int, int, int]
    skip: int
    num_entries: int
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return self.skip + math.prod(self.grid)

    @property
    def num_taps(self) -> int:
        return self.index.shape[0]

    def to(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> "PairTaps":
        """These taps on ``device``, weights in ``dtype`` (cached)."""
        device = torch.device(device)
        weight_dtype = None if self.weight is None else (dtype or self.weight.dtype)
        if self.index.device == device and (self.weight is None or self.weight.dtype == weight_dtype):
            return self
        key = ("to", device, weight_dtype)
        if key not in self._cache:
            with torch.inference_mode(False):  # a cached constant (see _cached_constant)
                weight = None if self.weight is None else self.weight.to(device, weight_dtype)
                self._cache[key] = PairTaps(self.index.to(device), weight, self.grid, self.skip, self.num_entries)
        return self._cache[key]

    def pair_entries(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(T, L, L) int32 entry ids of every pair and (T, L, L) weights (or None), materialised (cached).

        Only the ``"sdpa"`` and ``"reference"`` paths need them; the fused kernels read :attr:`index`."""
        if "pairs" not in self._cache:
            with torch.inference_mode(False):  # a cached constant (see _cached_constant)
                offsets = _token_offsets(self.grid, self.skip, self.index.device)
                entries = self.index.long()[:, offsets].to(torch.int32)
                weights = None if self.weight is None else self.weight[:, offsets]
                self._cache["pairs"] = (entries, weights)
        return self._cache["pairs"]


@_cached_constant
def pair_taps(ids: torch.Tensor, *, grid: Sequence[int], skip: int = 0, num_entries: int,
              weight: Optional[torch.Tensor] = None, skip_ids: Optional[Sequence[int]] = None,
              skip_weight: Optional[Sequence[float]] = None) -> PairTaps:
    """:class:`PairTaps` from per-offset entry ids.

    Args:
        ids: (T, O) or (O,) integer entry ids in :func:`offset_grid` order.
        grid: the token grid (1 to 3 sizes); skip: leading extra tokens.
        num_entries: K (every id must be in [0, K)).
        weight: (T, O) weights of the taps, or None.
        skip_ids, skip_weight: the T ids (weights) of pairs touching a skip token (needed when skip > 0).
    """
    grid = _grid3(grid)
    ids = torch.as_tensor(ids)
    ids = ids[None] if ids.dim() == 1 else ids
    num_offsets = math.prod(2 * n - 1 for n in grid)
    if ids.dim() != 2 or ids.shape[0] not in (1, 2) or ids.shape[1] != num_offsets:
        raise InputError(f"pair_taps: ids must be (1 or 2, {num_offsets}) for grid {grid}, got {tuple(ids.shape)}")
    taps = ids.shape[0]
    if skip > 0 and (skip_ids is None or len(skip_ids) != taps):
        raise InputError(f"pair_taps: skip={skip} needs {taps} skip_ids")
    extra = torch.tensor(list(skip_ids) if skip_ids is not None else [0] * taps, dtype=ids.dtype,
                         device=ids.device).view(taps, 1)
    index = torch.cat([ids, extra], 1)
    if int(index.min()) < 0 or int(index.max()) >= num_entries:
        raise InputError(f"pair_taps: entry ids must be in [0, {num_entries}), got [{int(index.min())}, "
                         f"{int(index.max())}]")
    if weight is not None:
        weight = torch.as_tensor(weight)
        weight = weight[None] if weight.dim() == 1 else weight
        if tuple(weight.shape) != tuple(ids.shape):
            raise InputError(f"pair_taps: weight {tuple(weight.shape)} must match ids {tuple(ids.shape)}")
        extra_w = torch.tensor(list(skip_weight) if skip_weight is not None else [1.0] * taps, dtype=weight.dtype,
                               device=weight.device).view(taps, 1)
        weight = torch.cat([weight, extra_w], 1).contiguous()
    return PairTaps(index.to(torch.int32).contiguous(), weight, grid, int(skip), int(num_entries))


class Term(NamedTuple):
    """A relative term: its per-entry ``values`` and the ``taps`` saying which entries each pair reads."""

    values: torch.Tensor
    taps: PairTaps


# ----------------------------------------------------------------------------------------------
# The materialised pieces (reference and sdpa paths)
# ----------------------------------------------------------------------------------------------

@_cached_constant
def _separable(taps: PairTaps):
    """For unweighted taps of a 2-D grid without skip tokens whose ids split by axis (iRPE product: id =
    r(dr) S + c(dc) with K = S x S; cross: r(dr), and a constant + c(dc)): per tap its kind and the (L, h)
    row ids and (L, w) column ids of every query; else None (euc, quant, skip tokens, RPA). Cached."""
    if "separable" in taps._cache:
        return taps._cache["separable"]
    found = None
    gt, gh, gw = taps.grid
    if taps.weight is None and taps.skip == 0 and gt == 1:
        ids = taps.index[:, :-1].long().view(-1, 2 * gh - 1, 2 * gw - 1)
        r, c = torch.arange(gh, device=ids.device), torch.arange(gw, device=ids.device)
        dr = (r.repeat_interleave(gw)[:, None] - r[None, :]) + gh - 1      # (L, h): query row - key row
        dc = (c.repeat(gh)[:, None] - c[None, :]) + gw - 1                 # (L, w)
        size = math.isqrt(taps.num_entries)
        found = []
        for it in ids:
            if torch.equal(it, it[:, :1].expand_as(it)):
                found.append(("rows", it[:, 0][dr], None, 0))
            elif torch.equal(it, it[:1, :].expand_as(it)):
                found.append(("cols", None, it[0, :][dc], 0))
            elif size * size == taps.num_entries and torch.equal(it // size, (it // size)[:, :1].expand_as(it)) \
                    and torch.equal(it % size, (it % size)[:1, :].expand_as(it)):
                found.append(("product", (it // size)[:, 0][dr], (it % size)[0, :][dc], size))
            else:
                found = None
                break
    taps._cache["separable"] = found
    return found


def _separable_bias(values: torch.Tensor, taps: PairTaps, parts) -> torch.Tensor:
    """The structured gather of :func:`pair_bias` for separable taps: at most two small gathers a tap,
    with (L, h) and (L, w) indices instead of an (L, L) one; the sum is the only (L, L) write."""
    *lead, L, K = values.shape
    gh, gw = taps.grid[1:]
    bias = None
    for kind, row_ids, col_ids, size in parts:
        if kind == "rows":    # broadcast over the key columns
            part = values.gather(-1, row_ids.expand(*lead, L, gh))[..., None]
        elif kind == "cols":  # broadcast over the key rows
            part = values.gather(-1, col_ids.expand(*lead, L, gw))[..., None, :]
        else:                 # the row block r S of every key row, then the column c inside it
            blocks = values.reshape(*lead, L, K // size, size)
            picked = blocks.gather(-2, row_ids[..., None].expand(*lead, L, gh, size))
            part = picked.gather(-1, col_ids[:, None, :].expand(*lead, L, gh, gw))
        bias = part if bias is None else bias + part
    return bias.expand(*lead, L, gh, gw).reshape(*lead, L, L)


def pair_bias(values: torch.Tensor, taps: PairTaps, index_backend: str = "auto") -> torch.Tensor:
    """(B', H', L, L): sum_t w_t(o) values[..., i, idx_t(o(i, j))] for values (B', H', L or 1, K).

    For a key term, transpose the result (the pair (j, i) of keys acting as queries). The gather is the
    structured one (:func:`_separable_bias`) where the ids split by axis (iRPE product/cross without skip
    tokens), else :func:`zoo.ops.rpe_index` (``index_backend``: its ``backend``) per tap, or plain
    indexing for values broadcast over the queries (bias tables)."""
    if values.shape[-2] > 1 and index_backend != "reference":
        parts = _separable(taps)
        if parts is not None:
            return _separable_bias(values, taps, parts)
    entries, weights = taps.pair_entries()
    bias = None
    for t in range(taps.num_taps):
        if values.shape[-2] == 1:
            part = values[..., 0, :][..., entries[t].long()]
        else:
            part = rpe_index(values, entries[t], backend=index_backend)
        if weights is not None:
            part = part * weights[t].to(part.dtype)
        bias = part if bias is None else bias + part
    return bias


def pair_scatter(probs: torch.Tensor, taps: PairTaps) -> torch.Tensor:
    """(B, H, Lq, K): sum over keys of the probabilities, per entry: G[i, e] = sum_{j, t: idx_t(o) = e} w_t p[i, j]."""
    entries, weights = taps.pair_entries()
    out = probs.new_zeros(*probs.shape[:-1], taps.num_entries)
    for t in range(taps.num_taps):
        src = probs if weights is None else probs * weights[t].to(probs.dtype)
        out = out.scatter_add(-1, entries[t].long().expand(probs.shape), src)
    return out


def _masked_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis; rows with every entry -inf give zeros and zero gradients (not NaN), as
    SDPA does."""
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    # the shortcut is data-dependent control flow: torch.export / torch.compile trace the masked form
    if not torch.compiler.is_compiling() and not bool(empty.any()):
        return torch.softmax(scores, dim=-1)
    return torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)


def _explicit(q, k, v, query_term, key_term, value_term, attn_bias, key_padding_mask, dropout_p, index_backend):
    scores = torch.matmul(q, k.transpose(-1, -2))
    if query_term is not None:
        scores = scores + pair_bias(query_term.values, query_term.taps, index_backend)
    if key_term is not None:
        scores = scores + pair_bias(key_term.values, key_term.taps, index_backend).transpose(-1, -2)
    if attn_bias is not None:
        scores = scores + attn_bias
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    probs = _masked_softmax(scores)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p, training=True)
    out = torch.matmul(probs, v)
    if value_term is not None:
        out = out + torch.matmul(pair_scatter(probs, value_term.taps), value_term.values)
    return out


def relative_attention_reference(q, k, v, *, query_term: Optional[Term] = None, key_term: Optional[Term] = None,
                                 value_term: Optional[Term] = None, attn_bias: Optional[torch.Tensor] = None,
                                 key_padding_mask: Optional[torch.Tensor] = None,
                                 dropout_p: float = 0.0) -> torch.Tensor:
    """The definition (module docstring): scores materialised, terms by ``torch.gather``. Same arguments
    as :func:`relative_attention`."""
    _check(q, k, v, query_term, key_term, value_term, attn_bias, key_padding_mask, dropout_p)
    return _explicit(q, k, v, query_term, key_term, value_term, attn_bias, key_padding_mask, dropout_p, "reference")


# ----------------------------------------------------------------------------------------------
# Checks and the choice of a backend
# ----------------------------------------------------------------------------------------------

def _check(q, k, v, query_term, key_term, value_term, attn_bias, key_padding_mask, dropout_p) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise InputError(f"relative_attention: q, k, v must be (B, H, L, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, Lq, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D or v.shape[:3] != k.shape[:3]:
        raise InputError(f"relative_attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not "
                         f"fit together")
    if not 0.0 <= dropout_p <= 1.0:
        raise InputError(f"relative_attention: dropout_p must be in [0, 1], got {dropout_p}")
    layouts = set()
    for name, term, length in (("query_term", query_term, Lq), ("key_term", key_term, k.shape[2])):
        if term is None:
            continue
        x = term.values
        if x.dim() != 4 or x.shape[0] not in (1, B) or x.shape[1] not in (1, H) or x.shape[2] not in (1, length) or \
                x.shape[3] != term.taps.num_entries:
            raise InputError(f"relative_attention: {name} values must be (B or 1, H or 1, L or 1, "
                             f"{term.taps.num_entries}), got {tuple(x.shape)}")
        layouts.add((term.taps.grid, term.taps.skip))
    if value_term is not None:
        table = value_term.values
        if table.dim() != 3 or table.shape[0] not in (1, H) or table.shape[1] != value_term.taps.num_entries or \
                table.shape[2] != v.shape[3]:
            raise InputError(f"relative_attention: value_term values must be a table (H or 1, "
                             f"{value_term.taps.num_entries}, {v.shape[3]}), got {tuple(table.shape)}")
        layouts.add((value_term.taps.grid, value_term.taps.skip))
    if layouts:
        if len(layouts) > 1:
            raise InputError(f"relative_attention: the terms disagree on the token layout (grid, skip): {layouts}")
        (grid, skip), = layouts
        tokens = skip + math.prod(grid)
        if Lq != tokens or k.shape[2] != tokens:
            raise InputError(f"relative_attention: relative terms need {skip} + {'x'.join(map(str, grid))} = "
                             f"{tokens} query and key tokens, got {Lq} and {k.shape[2]}")
    if attn_bias is not None:
        if not attn_bias.is_floating_point() or attn_bias.dim() > 4:
            raise InputError(f"relative_attention: attn_bias must be an additive float mask, got {attn_bias.dtype} "
                             f"{tuple(attn_bias.shape)}")
        target = (B, H, Lq, k.shape[2])
        try:
            fits = torch.broadcast_shapes(attn_bias.shape, target) == target
        except RuntimeError:
            fits = False
        if not fits:
            raise InputError(f"relative_attention: attn_bias {tuple(attn_bias.shape)} does not broadcast to {target}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool or
                                         tuple(key_padding_mask.shape) != (B, k.shape[2])):
        raise InputError(f"relative_attention: key_padding_mask must be bool (B, Lk) = {(B, k.shape[2])}, got "
                         f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")


@lru_cache(maxsize=2)
def compiled_flex_attention(device_type: str = "cuda"):
    """FlexAttention (``torch.nn.attention.flex_attention``) under ``torch.compile``, or None when this
    torch has none; eager FlexAttention is a slow reference implementation. Compiled per new shape: on
    CUDA with dynamic shapes after the first recompile; on the CPU always static (the C++ template of
    torch 2.14 fails to compile with symbolic sizes)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    return torch.compile(flex_attention, dynamic=None if device_type == "cuda" else False)


def flex_available(device: torch.device) -> bool:
    """Whether FlexAttention can run on ``device``: CUDA needs triton; CPU compiles with the C++ compiler."""
    if compiled_flex_attention(torch.device(device).type) is None:
        return False
    if torch.device(device).type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
    return True


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# Where the native kernel beats SDPA on the CPU: the per-shape sweep of benchmarks/attention.py
# (``--tables sweep``, recorded in benchmarks/RESULTS.md, 2026-12-02), relative_attention alone, 1 thread:
# * float32/float64 with relative terms: at every size from 4x4 to 25x34 (a tie at 4x4; 1.2-2x at 12x12
#   to 14x14, 2-4.4x at DETR's 25x34), with a value term always (SDPA then has to materialise the scores:
#   it returns no probabilities). One exception: terms that are tables broadcast over batch and queries
#   (iRPE's bias mode), in inference, from this batch on, while the (1, H, L, L) bias SDPA builds once for
#   the whole batch stays in cache: SDPA is 13-36 % faster (batch 8-32, 7x7 to 14x14); at 25x34 the
#   kernel is 1.5x faster even so. (In fwd+bwd the two are within 15 % there.)
_SDPA_BIAS_MIN_BATCH = 8
_SDPA_BIAS_MAX_ENTRIES = 1 << 18   # H x L x L of the shared bias (1 MiB in float32)
# * float16: CPU SDPA is 1.5-3x slower in the forward, up to 6.7x in fwd+bwd, than the kernel (which
#   computes in float32);
# * bfloat16: without terms SDPA's forward is as fast (1.4x faster at 7x7, 1.2x slower at 25x34), its
#   fwd+bwd as fast at 7x7 and 3-5.7x slower from 12x12 on;
# * float32 without terms: SDPA (the kernel's advantage is the terms: without them it is up to 2x slower
#   at small sizes, as fast in the forward at 25x34 and 12 % faster in fwd+bwd there).


def _shared_bias_is_cheaper(q: torch.Tensor, terms, wants_grad: bool) -> bool:
    """The exception above: every query/key term a table broadcast over batch and queries, inference,
    a large batch, a bias small enough to stay in cache."""
    if wants_grad or not terms or any(t.values.shape[0] != 1 or t.values.shape[2] != 1 for t in terms):
        return False
    B, H, L, _ = q.shape
    return B >= _SDPA_BIAS_MIN_BATCH and H * L * L <= _SDPA_BIAS_MAX_ENTRIES


def _native_beats_sdpa(q: torch.Tensor, query_term, key_term, value_term, wants_grad: bool) -> bool:
    """The CPU rule of :func:`choose_backend` (measurements above)."""
    has_terms = any(t is not None for t in (query_term, key_term, value_term))
    if q.dtype == torch.float16:
        return True
    if q.dtype == torch.bfloat16:
        return has_terms or wants_grad
    if not has_terms:
        return False
    return value_term is not None or not _shared_bias_is_cheaper(
        q, [t for t in (query_term, key_term) if t is not None], wants_grad)


def choose_backend(backend: str, q: torch.Tensor, *, query_term=None, key_term=None, value_term=None,
                   attn_bias=None, dropout_p: float = 0.0, what: str = "relative_attention backend") -> str:
    """The backend that runs (never ``"auto"``): ``backend`` itself, or what ``"auto"`` means here.

    ``"auto"`` (and ``RELZOO_OPS``, :func:`zoo.ops.backend.resolve`): ``RELZOO_OPS=reference`` -> the
    reference. Otherwise per device, dtype and shape, whichever path was measured fastest
    (``benchmarks/attention.py``):

    * CPU: the native kernel where it beats SDPA and builds (under ``RELZOO_OPS=native`` a failed build
      is an error): float32/float64 with relative terms (except bias tables broadcast over a batch of 8
      or more in inference, while the shared (1, H, L, L) bias has at most 2^18 entries), float16
      always, bfloat16 with relative terms or when gradients are needed. Else ``"sdpa"`` (plain float32
      attention; the shared bias; an ``attn_bias`` that needs a gradient, which the kernel does not
      give). Compiled FlexAttention (forward only on the CPU) was slower than both.
    * CUDA: ``"flex"`` for relative terms where FlexAttention runs and the call has no value term, no
      dropout and no ``attn_bias`` gradient; else ``"sdpa"``.
    """
    choice = resolve(backend, ATTENTION_BACKENDS, what)
    device = q.device.type
    if backend != "auto":  # forced: "native" is the kernel or an OpsError saying why not
        if choice == "native":
            use_native(OP_NAME, "native", device)
        return choice
    if choice == "reference":  # RELZOO_OPS=reference
        return choice
    has_terms = any(t is not None for t in (query_term, key_term, value_term))
    bias_grad = _wants_grad(attn_bias)
    wants_grad = _wants_grad(q, *(t.values for t in (query_term, key_term, value_term) if t is not None))
    if device == "cpu" and not bias_grad and _native_beats_sdpa(q, query_term, key_term, value_term, wants_grad):
        if choice == "native":  # RELZOO_OPS=native: a kernel that does not build is an error
            use_native(OP_NAME, "native", device)
            return "native"
        if native_available(OP_NAME, device):
            return "native"
    if device == "cuda" and has_terms and value_term is None and dropout_p == 0 and not bias_grad and \
            flex_available(q.device):
        return "flex"
    return "sdpa"


# ----------------------------------------------------------------------------------------------
# The paths
# ----------------------------------------------------------------------------------------------

def _sdpa(q, k, v, query_term, key_term, value_term, attn_bias, key_padding_mask, dropout_p):
    if value_term is not None:  # the value term needs the probabilities: explicit, with the fast index step
        return _explicit(q, k, v, query_term, key_term, value_term, attn_bias, key_padding_mask, dropout_p, "auto")
    mask = None
    if query_term is not None:
        mask = pair_bias(query_term.values, query_term.taps)
    if key_term is not None:
        term = pair_bias(key_term.values, key_term.taps).transpose(-1, -2)
        mask = term if mask is None else mask + term
    if attn_bias is not None:
        mask = attn_bias.to(q.dtype) if mask is None else mask + attn_bias
    if key_padding_mask is not None:
        padded = key_padding_mask[:, None, None, :]
        mask = q.new_zeros(padded.shape).masked_fill(padded, float("-inf")) if mask is None else \
            mask.masked_fill(padded, float("-inf"))
    if mask is not None:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=1.0)


def _seed() -> int:
    """A dropout seed from torch's default generator (so ``torch.manual_seed`` makes runs repeatable)."""
    return int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))


def _native(q, k, v, query_term, key_term, value_term, attn_bias, key_padding_mask, dropout_p):
    dtype = q.dtype
    compute = dtype if dtype in _NATIVE_DTYPES else torch.float32
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]

    def dense(t, length=None):
        if length is not None:
            t = t.expand(B, H, length, t.shape[-1])
        return t.to(compute).contiguous()

    taps_list: list[Optional[torch.Tensor]] = [None] * 6
    grid, skip = (1, 1, 1), 0
    for slot, term in enumerate((query_term, key_term, value_term)):
        if term is not None:
            taps = term.taps.to(q.device, compute)
            taps_list[2 * slot], taps_list[2 * slot + 1] = taps.index, taps.weight
            grid, skip = taps.grid, taps.skip
    xq = dense(query_term.values, Lq) if query_term is not None else None
    xk = dense(key_term.values, Lk) if key_term is not None else None
    bias = None
    if attn_bias is not None:
        bias = attn_bias.to(compute)
        bias = bias.view((1,) * (4 - bias.dim()) + tuple(bias.shape))
    padding = key_padding_mask.contiguous() if key_padding_mask is not None else None
    out, _, entries = torch.ops.relzoo.relative_attn(
        dense(q), dense(k), dense(v), xq, xk, *taps_list, value_term.taps.num_entries if value_term is not None else 0,
        bias, padding, list(grid), skip, float(dropout_p), _seed() if dropout_p > 0 else 0)
    if value_term is not None:
        out = out + torch.matmul(entries, value_term.values.to(compute))
    return out.to(dtype)


def _flex(q, k, v, query_term, key_term, value_term, attn_bias, key_padding_mask, dropout_p):
    flex = compiled_flex_attention(q.device.type)
    if flex is None or not flex_available(q.device):
        raise OpsError(f"backend 'flex': FlexAttention is not available here (torch {torch.__version__}"
                       f"{', no triton' if q.device.type == 'cuda' else ''})")
    if value_term is not None:
        raise ConfigError("backend 'flex' cannot compute a value term (iRPE rpe_v, RPA's value table): FlexAttention "
                          "does not return the probabilities it needs; use 'auto', 'native', 'sdpa' or 'reference'")
    if dropout_p > 0:
        raise ConfigError("backend 'flex' has no attention dropout; use 'auto', 'native', 'sdpa' or 'reference' "
                          "(or eval mode)")
    if q.device.type == "cpu" and _wants_grad(q, k, v, attn_bias, *(t.values for t in (query_term, key_term) if t)):
        raise ConfigError("backend 'flex' on the CPU is inference only (FlexAttention has no CPU backward); use "
                          "'auto' or 'native' for training, or run under torch.no_grad()")
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    layout = next((t.taps for t in (query_term, key_term) if t is not None), None)
    if layout is not None:
        gt, gh, gw = layout.grid
        wd, area = 2 * gw - 1, (2 * gh - 1) * (2 * gw - 1)
        center, O = (gt - 1) * area + (gh - 1) * wd + gw - 1, layout.index.shape[1] - 1
        s = torch.arange(math.prod(layout.grid), device=q.device)
        pos = torch.cat([s.new_zeros(layout.skip), (s // (gh * gw)) * area + (s // gw) % gh * wd + s % gw])
        is_skip = torch.arange(layout.num_tokens, device=q.device) < layout.skip

    def reader(term, length):
        taps = term.taps.to(q.device, q.dtype)
        values = term.values.to(q.dtype).expand(B, H, length, term.taps.num_entries).contiguous()
        index = [taps.index[t] for t in range(taps.num_taps)]
        weight = None if taps.weight is None else [taps.weight[t] for t in range(taps.num_taps)]

        def read(b, h, token, o):
            total = 0.0
            for t, ids in enumerate(index):
                part = values[b, h, token, ids[o]]
                total = total + (part if weight is None else part * weight[t][o])
            return total
        return read

    read_q = reader(query_term, Lq) if query_term is not None else None
    read_k = reader(key_term, Lk) if key_term is not None else None
    bias = None
    if attn_bias is not None:
        bias = attn_bias.to(q.dtype)
        bias = bias.view((1,) * (4 - bias.dim()) + tuple(bias.shape))
    bias_b, bias_h = (bias is not None and bias.shape[0] > 1), (bias is not None and bias.shape[1] > 1)
    bias_i, bias_j = (bias is not None and bias.shape[2] > 1), (bias is not None and bias.shape[3] > 1)
    padding = key_padding_mask

    def score_mod(score, b, h, qi, ki):
        if layout is not None:
            o = pos[qi] - pos[ki] + center
            o_key = pos[ki] - pos[qi] + center
            if layout.skip:
                touches_skip = is_skip[qi] | is_skip[ki]
                o = torch.where(touches_skip, O, o)
                o_key = torch.where(touches_skip, O, o_key)
            if read_q is not None:
                score = score + read_q(b, h, qi, o)
            if read_k is not None:
                score = score + read_k(b, h, ki, o_key)
        if bias is not None:
            score = score + bias[b if bias_b else 0, h if bias_h else 0, qi if bias_i else 0, ki if bias_j else 0]
        if padding is not None:
            score = torch.where(padding[b, ki], float("-inf"), score)
        return score

    return flex(q, k, v, score_mod=score_mod, scale=1.0)


_PATHS = {"sdpa": _sdpa, "native": _native, "flex": _flex}


def relative_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, query_term: Optional[Term] = None,
                       key_term: Optional[Term] = None, value_term: Optional[Term] = None,
                       attn_bias: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                       dropout_p: float = 0.0, backend: str = "auto",
                       what: str = "relative_attention backend") -> torch.Tensor:
    """Attention with relative terms (module docstring); returns (B, H, Lq, Dv).

    Args:
        q: (B, H, Lq, D), already scaled (every term linear in q is scaled with it); k: (B, H, Lk, D);
            v: (B, H, Lk, Dv).
        query_term, key_term: :class:`Term` of values (B or 1, H or 1, L or 1, K) and taps.
        value_term: :class:`Term` of a table (H or 1, K, Dv) and taps.
        attn_bias: additive float mask broadcastable to (B, H, Lq, Lk) (-inf: masked).
        key_padding_mask: (B, Lk) bool, True = key ignored.
        dropout_p: dropout of the probabilities (pass 0 in eval mode).
        backend: one of :data:`~zoo.ops.backend.ATTENTION_BACKENDS` (:func:`choose_backend`).
        what: names the caller in a bad-backend error (e.g. ``"RPEMultiheadAttention backend"``).

    Every backend gives the reference's outputs and gradients (tests hold them equal in float64 and
    within 1e-5 in float32); with dropout each draws its own mask. The native op has no double backward.
    """
    check_backend(backend, ATTENTION_BACKENDS, what)
    _check(q, k, v, query_term, key_term, value_term, attn_bias, key_padding_mask, dropout_p)
    choice = choose_backend(backend, q, query_term=query_term, key_term=key_term, value_term=value_term,
                            attn_bias=attn_bias, dropout_p=dropout_p, what=what)
    if choice == "reference":
        return _explicit(q, k, v, query_term, key_term, value_term, attn_bias, key_padding_mask, dropout_p,
                         "reference")
    if choice == "native" and _wants_grad(attn_bias):
        raise ConfigError(f"{what} 'native' has no gradient for attn_bias (a float mask that requires grad); "
                          f"use 'sdpa' or 'reference'")
    return _PATHS[choice](q, k, v, query_term, key_term, value_term, attn_bias, key_padding_mask, dropout_p)


# ----------------------------------------------------------------------------------------------
# The RPA original's 2-D attend ops (zoo.layers.rpa.relative_attend_query2d / _weight2d)
# ----------------------------------------------------------------------------------------------

class _Attend(torch.autograd.Function):
    """The native attend ops with first-order gradients; ``kind`` names the forward:

    * ``"pairs"``: first = x (B, C, N) -> R[b, i, j] = sum_c x[b, c, i] table[c, cell(i, j)]
    * ``"dot"``:   first = pairs (B, N, N) -> O[b, c, i] = sum_j pairs[b, i, j] table[c, cell(i, j)]

    Each is the other's adjoint in ``first``; the table's gradient pairs the (B, C, N) side with the
    (B, N, N) side."""

    @staticmethod
    def forward(ctx, first, table, height, width, kind):
        ctx.save_for_backward(first, table)
        ctx.size, ctx.kind = (height, width), kind
        op = torch.ops.relzoo.relative_attend_pairs if kind == "pairs" else torch.ops.relzoo.relative_attend_dot
        return op(first, table, height, width)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        first, table = ctx.saved_tensors
        grad = grad.contiguous()
        pairs_side = ctx.kind == "pairs"
        adjoint = torch.ops.relzoo.relative_attend_dot if pairs_side else torch.ops.relzoo.relative_attend_pairs
        d_first = adjoint(grad, table, *ctx.size) if ctx.needs_input_grad[0] else None
        d_table = None
        if ctx.needs_input_grad[1]:
            channels, pairs = (first, grad) if pairs_side else (grad, first)
            d_table = torch.ops.relzoo.relative_attend_table_grad(channels, pairs, *ctx.size)
        return d_first, d_table, None, None, None


def _attend(first, table, height, width, kind):
    dtype = first.dtype
    compute = dtype if dtype in _NATIVE_DTYPES else torch.float32
    out = _Attend.apply(first.to(compute).contiguous(), table.to(compute).contiguous(), int(height), int(width), kind)
    return out.to(dtype)


def attend_pairs(x: torch.Tensor, table: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Native: x (B, C, H*W), table (C, 2H-1, 2W-1) -> (B, N, N), R[b, i, j] = sum_c x[b, c, i] table[c, cell(i, j)]
    with cell(i, j) = (y_j - y_i + H - 1, x_j - x_i + W - 1). Callers check :func:`use_native` first."""
    return _attend(x, table, height, width, "pairs")


def attend_dot(pairs: torch.Tensor, table: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Native: pairs (B, N, N), table (C, 2H-1, 2W-1) -> (B, C, N), O[b, c, i] = sum_j pairs[b, i, j] table[c, cell(i, j)]."""
    return _attend(pairs, table, height, width, "dot")


@on_load(OP_NAME)
def _register_native() -> None:
    """Fake kernels (torch.compile) and autograd of the native attention op."""
    @torch.library.register_fake("relzoo::relative_attn")
    def _(q, k, v, xq, xk, q_index, q_weight, k_index, k_weight, v_index, v_weight, num_value_entries, attn_bias,
          key_padding_mask, grid, skip, dropout_p, seed):
        B, H, Lq, _ = q.shape
        entries = (B, H, Lq, num_value_entries) if v_index is not None else (0,)
        return q.new_empty((B, H, Lq, v.shape[-1])), q.new_empty((B, H, Lq)), q.new_empty(entries)

    @torch.library.register_fake("relzoo::relative_attn_backward")
    def _(grad_out, grad_entries, q, k, v, xq, xk, q_index, q_weight, k_index, k_weight, v_index, v_weight, attn_bias,
          key_padding_mask, lse, grid, skip, dropout_p, seed):
        empty = q.new_empty((0,))
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
                xq.new_empty(xq.shape) if xq is not None else empty, xk.new_empty(xk.shape) if xk is not None else empty)

    @torch.library.register_fake("relzoo::relative_attend_pairs")
    def _(x, table, height, width):
        return x.new_empty((x.shape[0], height * width, height * width))

    @torch.library.register_fake("relzoo::relative_attend_dot")
    def _(pairs, table, height, width):
        return pairs.new_empty((pairs.shape[0], table.shape[0], height * width))

    @torch.library.register_fake("relzoo::relative_attend_table_grad")
    def _(x, pairs, height, width):
        return x.new_empty((x.shape[1], 2 * height - 1, 2 * width - 1))

    def setup_context(ctx, inputs, output):
        q, k, v, xq, xk = inputs[:5]
        taps = inputs[5:11]
        attn_bias, key_padding_mask, grid, skip, dropout_p, seed = inputs[12:]
        ctx.save_for_backward(q, k, v, xq, xk, attn_bias, key_padding_mask, output[1])
        ctx.taps = taps
        ctx.has_value_term = taps[4] is not None
        ctx.num_value_entries = output[2].shape[-1] if ctx.has_value_term else 0
        ctx.geometry = (grid, skip, dropout_p, seed)

    def backward(ctx, grad_out, _grad_lse, grad_entries):
        # the log-sum-exp is an auxiliary output kept for backward; nothing differentiates it
        q, k, v, xq, xk, attn_bias, key_padding_mask, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = q.new_zeros((*q.shape[:3], v.shape[-1]))
        if ctx.has_value_term and grad_entries is None:
            grad_entries = q.new_zeros((*q.shape[:3], ctx.num_value_entries))
        dq, dk, dv, dxq, dxk = torch.ops.relzoo.relative_attn_backward(
            grad_out.contiguous(), grad_entries.contiguous() if ctx.has_value_term else None, q, k, v, xq, xk,
            *ctx.taps, attn_bias, key_padding_mask, lse, *ctx.geometry)
        return (dq, dk, dv, dxq if xq is not None else None, dxk if xk is not None else None) + (None,) * 13

    torch.library.register_autograd("relzoo::relative_attn", backward, setup_context=setup_context)
