"""RPA-SA: multi-head non-local blocks with relative distance / relative position awareness.

A drop-in re-implementation of ``inspiros/rpa_sa`` (spec: ``shared/specs/rpa.md``) in plain tensor
operations. The block is a multi-head non-local (self-attention) block over every position of a 1-D,
2-D or 3-D feature map, optionally extended Shaw-style with a learned table of *relative* terms:

* a key term added to the logits:   ``L[i, j] += q_i . A_k[disp(i, j)]``
* a value term added to the output: ``Y[i]    += sum_j softmax(L)[i, j] * A_v[disp(i, j)]``

where ``disp(i, j)`` is the displacement of key position ``j`` from query position ``i``. The tables
``A_k``, ``A_v`` ("reference affinities") are not learned per displacement; they are expanded from
small learned tensors ``a_k``, ``a_v``:

* ``relative_distance``: ``a`` is ``d x K``, a radial profile over the distance ``|disp|`` (``nearest``
  or ``lerp``; distances beyond ``K - 1`` saturate);
* ``relative_position``: ``a`` is ``d x kh x kw``, a full kernel of displacements; outside the kernel a
  displacement takes its value from the kernel's border ring by polar angle (``nearest``, ``alerp``
  angle-linear or ``slerp`` spherical-linear weights).

The expansion (spec §5). ``a -> A`` is linear with at most two non-zeros per displacement, so it is a
constant matrix ``M`` (``P x K'``, ``P`` displacements, ``K'`` entries of ``a``) built once per input
size and cached. Both relative terms can then go through ``a`` directly; the pure-torch path of the
drop-in attend ops does it in chunks::

    key term:   (q^T a) M^T   -> per query a row over all P displacements -> pick the N that exist
    value term: softmax(L) placed on the displacement grid -> (. M) -> (a .)

The "pick" and "place" steps are strided copies (no gather, no atomics): for a fixed query the map
key -> displacement is injective. They run over blocks of query rows, each touching only the slab of
displacements its rows can reach, so the intermediate grid stays small. The two directions are each
other's adjoint, which is how the backward is written (first-order gradients, like the original).
Everything else is GEMMs; there is no per-element loop.

Backends of the blocks (:data:`zoo.ops.backend.ATTENTION_BACKENDS`): the default ``"auto"`` runs the whole
attention fused (:func:`zoo.ops.relative_attn.relative_attention`): SDPA without relative terms; with them,
``a`` enters as per-query entries ``q . a`` (B, h, N, K') and taps (:func:`_relative_taps`: for every
offset the at most two entries of ``a`` its displacement cell interpolates, and their weights), read inside
the native fused kernel on CPU, which also accumulates the value term's per-entry probabilities while the
probabilities are in cache. ``"sdpa"`` materialises the logits (the value term needs the probabilities),
``"native"`` forces the kernel; ``"flex"`` cannot compute the value term. ``"reference"`` is the
original's algorithm (spec §1.3, §4): per head its own q/k/v, the displacement tables expanded for the
current size, and the attend ops written with an explicit (query, key) -> table index
(:func:`relative_attend_query_reference`, :func:`relative_attend_weight_reference`). Tests hold them equal;
``benchmarks/attention.py`` and ``benchmarks/rpa.py`` time them and the original's scalar-loop kernels.

The drop-in attend ops (``backend``: ``"auto"``, ``"native"``, ``"reference"``) run native loops
(``ops/relative_attn``: the original op's algorithm, vectorised, threaded only above a work threshold, so
small maps pay no thread wake-ups) where the op builds, else the chunked formulation above.

Compatibility layer: the four native ops of the original are available with their argument order,
semantics and interpolation names, as :func:`rotative_pad2d`, :func:`spherical_pad2d`,
:func:`relative_attend_query2d` and :func:`relative_attend_weight2d`.

Known bugs of the original (spec §8) and what we do about them:

1. Embedding ``padding > 0`` crashed (sign error in the hidden size). We use the true conv output size;
   no weights can depend on the bug, so there is no flag for it.
2. ``relative_position`` on non-square maps (or with non-square kernels) passed the pad tuple in the
   wrong order: the table came out transposed and was read scrambled (``H < W``) or out of bounds
   (``H > W``). Fixed by default (fixture ``nl2d_rp_slerp_9x13_fixedpad``); ``bug_compatible=True``
   reproduces the scrambled layout (fixture ``nl2d_rp_slerp_9x13``) and refuses the out-of-bounds
   cases with a ValueError.
3. ``'lerp'`` in ``relative_position`` silently meant nearest (the op's linear method is ``'alerp'``).
   By default ``'lerp'`` means ``'alerp'`` (fixture ``nl2d_rp_alerp_12x12``); with
   ``bug_compatible=True`` it means nearest (fixtures ``nl2d_rp_lerp_12x12``, ``toy_cifar_rpanet``).
   Names that are no method at all raise ValueError; under ``bug_compatible=True`` the relative_distance
   block also accepts ``'alerp'``/``'slerp'`` as nearest, as the original silently did.
4. ``MultiheadNonlocal1d``/``3d`` always raised in the original; here they work (they have no original
   to compare with; on inputs of height 1 / depth 1 they agree with the 2-D block).
5. Even ``relative_position`` kernels built a misaligned table; they are refused.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.errors import ArgumentError, ConfigError, InputError, InputTypeError
from zoo.ops.backend import ATTENTION_BACKENDS, BACKENDS, check_backend, resolve
from zoo.ops.build import use_native
from zoo.ops.relative_attn import OP_NAME, PairTaps, Term, attend_dot, attend_pairs, offset_grid, pair_taps, \
    relative_attention

__all__ = [
    "MultiheadNonlocal1d",
    "MultiheadNonlocal2d",
    "MultiheadNonlocal3d",
    "rotative_pad2d",
    "spherical_pad2d",
    "relative_attend_query2d",
    "relative_attend_weight2d",
    "relative_attend_query_reference",
    "relative_attend_weight_reference",
]

RPA_MODES = ("relative_distance", "relative_position")

# What each interpolation name meant to the original ops (they silently ran nearest for any name they
# did not know). The compatibility ops accept these four names with these meanings and refuse others.
_OP_NAME_MEANS = {
    "rotative": {"nearest": "nearest", "lerp": "lerp", "alerp": "nearest", "slerp": "nearest"},
    "spherical": {"nearest": "nearest", "alerp": "alerp", "slerp": "slerp", "lerp": "nearest"},
}


# ---------------------------------------------------------------------------------------------------
# Expansion tables: the sparse linear maps a -> A (spec §2), as dense (P x K') matrices.
# Built once per (shape, method, dtype, device) and cached; they are constants (no grad).
# ---------------------------------------------------------------------------------------------------

def _table_dtype(dtype: torch.dtype) -> torch.dtype:
    """Angles/distances are computed in the tensor dtype like the original; float16/bfloat16 use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sparse_to_dense(num_rows: int, num_cols: int, idx0, idx1, w0, w1) -> torch.Tensor:
    """(P x K') matrix with M[p, idx0[p]] += w0[p] and M[p, idx1[p]] += w1[p]."""
    m = torch.zeros(num_rows, num_cols, dtype=w0.dtype)
    rows = torch.arange(num_rows)
    m.index_put_((rows, idx0), w0, accumulate=True)
    m.index_put_((rows, idx1), w1, accumulate=True)
    return m


def _radial_map(out_shape: tuple[int, ...], centre: tuple[int, ...], num_bins: int, method: str,
                dtype: torch.dtype) -> torch.Tensor:
    """Radial profile expansion (``rotative_pad``), any number of dims.

    Returns M of shape (prod(out_shape), num_bins): row p (row-major cell of ``out_shape``) holds the
    weights of ``a[0..K-1]`` at distance rho = |cell - centre|. ``nearest``: bin round(rho) (half away
    from zero) clamped to K-1. ``lerp``: linear between floor(rho) and floor(rho)+1, saturating at K-1.
    """
    tdtype = _table_dtype(dtype)
    grids = torch.meshgrid(*[torch.arange(n, dtype=tdtype) - c for n, c in zip(out_shape, centre)],
                           indexing="ij")
    rho = torch.sqrt(sum(g * g for g in grids)).flatten()
    last = num_bins - 1
    if method == "nearest":
        idx0 = torch.floor(rho + 0.5).long().clamp(max=last)
        ones = torch.ones_like(rho)
        return _sparse_to_dense(rho.numel(), num_bins, idx0, idx0, ones, torch.zeros_like(rho)).to(dtype)
    if method == "lerp":
        low = torch.floor(rho).long().clamp(max=last)
        frac = rho - low.to(tdtype)
        inside = low < last
        w1 = torch.where(inside, frac, torch.zeros_like(frac))
        w0 = torch.where(inside, 1 - frac, torch.ones_like(frac))
        high = torch.where(inside, low + 1, low)
        return _sparse_to_dense(rho.numel(), num_bins, low, high, w0, w1).to(dtype)
    raise ConfigError(f"radial interpolation must be 'nearest' or 'lerp', got {method!r}")


def _angular_map_2d(kernel: tuple[int, int], pad: tuple[int, int, int, int], method: str,
                    dtype: torch.dtype) -> torch.Tensor:
    """Kernel extension along rays (``spherical_pad2d``) with pad (left, right, up, down).

    Returns M of shape (out_h * out_w, kh * kw), out = (kh + up + down, kw + left + right). Cells inside
    the (shifted) kernel copy it; every other cell interpolates between the two border-ring cells whose
    polar angles (around the kernel centre) bracket its own (spec §2.2).
    """
    kh, kw = kernel
    left, right, up, down = pad
    out_h, out_w = kh + up + down, kw + left + right
    tdtype = _table_dtype(dtype)
    ky, kx = (kh - 1) / 2, (kw - 1) / 2

    # Border ring of the kernel, sorted by angle. Ties (only for kh == 1 or kw == 1) put the outermost
    # cell last, so a ray that hits a tied angle exactly takes the border cell along it.
    ring = [(r, s) for r in range(kh) for s in range(kw)
            if kh <= 2 or kw <= 2 or r in (0, kh - 1) or s in (0, kw - 1)]
    ring_angle = torch.atan2(torch.tensor([r - ky for r, _ in ring], dtype=tdtype),
                             torch.tensor([s - kx for _, s in ring], dtype=tdtype))
    order = sorted(range(len(ring)),
                   key=lambda t: (ring_angle[t].item(), math.hypot(ring[t][0] - ky, ring[t][1] - kx)))
    angles = ring_angle[order]
    cells = torch.tensor([ring[t][0] * kw + ring[t][1] for t in order])
    # Circular extension: last cell one turn down in front, first cell one turn up at the back.
    two_pi = 2 * math.pi
    angles = torch.cat([angles[-1:] - two_pi, angles, angles[:1] + two_pi])
    cells = torch.cat([cells[-1:], cells, cells[:1]])

    ii, jj = torch.meshgrid(torch.arange(out_h), torch.arange(out_w), indexing="ij")
    ii, jj = ii.flatten(), jj.flatten()
    kr, ks = ii - up, jj - left                      # the cell in kernel coordinates
    interior = (kr >= 0) & (kr < kh) & (ks >= 0) & (ks < kw)

    theta = torch.atan2(ii.to(tdtype) - (up + ky), jj.to(tdtype) - (left + kx))
    lo = torch.searchsorted(angles, theta, right=True) - 1   # largest ring angle <= theta
    hi = lo + 1
    d_lo, d_hi = theta - angles[lo], angles[hi] - theta
    span = angles[hi] - angles[lo]
    if method == "nearest":
        take_lo = d_lo <= d_hi                          # ties go to the lower angle
        w_lo, w_hi = take_lo.to(tdtype), (~take_lo).to(tdtype)
    elif method == "alerp":
        w_lo, w_hi = d_hi / span, d_lo / span
    elif method == "slerp":
        w_lo, w_hi = torch.sin(d_hi) / torch.sin(span), torch.sin(d_lo) / torch.sin(span)
    else:
        raise ConfigError(f"angular interpolation must be 'nearest', 'alerp' or 'slerp', got {method!r}")

    copy_idx = (kr.clamp(0, kh - 1) * kw + ks.clamp(0, kw - 1))
    idx0 = torch.where(interior, copy_idx, cells[lo])
    idx1 = torch.where(interior, copy_idx, cells[hi])
    w0 = torch.where(interior, torch.ones_like(w_lo), w_lo)
    w1 = torch.where(interior, torch.zeros_like(w_hi), w_hi)
    return _sparse_to_dense(out_h * out_w, kh * kw, idx0, idx1, w0, w1).to(dtype)


def _border_map_1d(length: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """1-D relative position table: (2L-1) x k, displacement t copies a[clamp(t + k//2, 0, k-1)].

    This is what the 2-D angular extension gives along one axis (the rays left/right of the centre hit
    the two border cells exactly), so 1-D and height-1 2-D agree.
    """
    disp = torch.arange(-(length - 1), length)
    idx = (disp + k // 2).clamp(0, k - 1)
    m = torch.zeros(2 * length - 1, k, dtype=dtype)
    m[torch.arange(2 * length - 1), idx] = 1
    return m


@lru_cache(maxsize=64)          # one entry per hidden size seen; detectors see a few dozen
@torch.inference_mode(False)    # cached: never an inference tensor (autograd could not save it later)
def _relative_map(mode: str, method: str, rpa_kernel: tuple[int, ...], sizes: tuple[int, ...],
                  legacy: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The cached (P x K') map from a (flattened) to the displacement table of a hidden map ``sizes``.

    Table layout: row-major over displacements (2S_1-1) x ... x (2S_n-1), centre = zero displacement,
    except ``legacy`` (2-D relative_position, bug_compatible) which is the original's transposed pad.
    """
    if mode == "relative_distance":
        m = _radial_map(tuple(2 * s - 1 for s in sizes), tuple(s - 1 for s in sizes), rpa_kernel[0],
                        method, dtype)
    elif len(sizes) == 1:
        m = _border_map_1d(sizes[0], rpa_kernel[0], dtype)
    elif len(sizes) == 2:
        m = _angular_map_2d(rpa_kernel, _rp_pad2d(rpa_kernel, sizes, legacy), method, dtype)
    else:
        # 3-D: angular extension within each (h, w) slice of the kernel; along depth the slice is the
        # nearest one (border slices extend outward), i.e. the 1-D rule. Depth-1 maps use the centre
        # slice, so they agree with the 2-D block.
        depth = _border_map_1d(sizes[0], rpa_kernel[0], dtype)             # (2T-1) x kt
        plane = _angular_map_2d(rpa_kernel[1:], _rp_pad2d(rpa_kernel[1:], sizes[1:], False), method, dtype)
        m = torch.einsum("tk,pq->tpkq", depth, plane).reshape(depth.shape[0] * plane.shape[0], -1)
    return m.to(device)


def _rp_pad2d(kernel: Sequence[int], sizes: Sequence[int], legacy: bool) -> tuple[int, int, int, int]:
    """(left, right, up, down) that grows a kh x kw kernel into the (2H-1) x (2W-1) table.

    ``legacy``: the original module's order (p_H, p_H, p_W, p_W), wrong whenever p_H != p_W (spec §2.2).
    Negative values crop the kernel (hidden map smaller than the kernel).
    """
    p_h = sizes[0] - kernel[0] // 2 - 1
    p_w = sizes[1] - kernel[1] // 2 - 1
    return (p_h, p_h, p_w, p_w) if legacy else (p_w, p_w, p_h, p_h)


@lru_cache(maxsize=8)           # N x N indices: the reference backend and bug-compatible mode
@torch.inference_mode(False)
def _pair_index(sizes: tuple[int, ...], table_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(N, N) flat index the original attend ops read for (query i, key j) from a table of ``table_shape``.

    Per axis the displacement ``key - query + size - 1`` (spec §4: ah, aw), flattened with the table's
    real row lengths. For the (2S_1-1) x ... x (2S_n-1) table that is the displacement cell; for the
    bug-compatible transposed 2-D table it scrambles the layout as the original did (still within
    bounds only when H <= W for square kernels; only such tables can be out of bounds).
    """
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in sizes], indexing="ij")).flatten(1)  # (n, N)
    offsets = torch.tensor(sizes).view(-1, 1, 1) - 1
    disp = coords[:, None, :] - coords[:, :, None] + offsets                 # (n, N query, N key)
    index = sum(d * math.prod(table_shape[a + 1:]) for a, d in enumerate(disp))
    if int(index.max()) >= math.prod(table_shape):
        height, width = sizes
        raise ConfigError(
            f"bug_compatible relative_position cannot run on a {height}x{width} hidden map with this "
            f"kernel: the original reads past its {table_shape[0]}x{table_shape[1]} reference table here "
            f"(non-deterministic garbage; happens when H > W, and for some non-square kernels). "
            f"Use bug_compatible=False")
    return index.to(device)


@lru_cache(maxsize=64)          # one entry per hidden size seen, like the maps
@torch.inference_mode(False)    # cached: never an inference tensor (autograd could not save it later)
def _relative_taps(mode: str, method: str, rpa_kernel: tuple[int, ...], sizes: tuple[int, ...], legacy: bool,
                   table_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> PairTaps:
    """The relative table of a hidden map ``sizes`` as taps (:mod:`zoo.ops.relative_attn`): for every offset
    (query minus key) the at most two entries of ``a`` its displacement cell interpolates, and their weights.

    The cell of a pair is the one the original's attend ops read (:func:`_pair_index`): the displacement
    key - query in the (2S_1-1) x ... table, or in the bug-compatible transposed 2-D table.
    """
    m = _relative_map(mode, method, rpa_kernel, sizes, legacy, dtype, device)                  # (P, K')
    disp = torch.tensor(sizes) - 1 - offset_grid(sizes)[:, 3 - len(sizes):]                 # key - query + S - 1
    cells = sum(disp[:, a] * math.prod(table_shape[a + 1:]) for a in range(len(sizes)))
    if int(cells.max()) >= math.prod(table_shape):
        _pair_index(sizes, table_shape, device)  # raises the bug-compatible out-of-bounds error
    rows = m[cells.to(device)]                                                                # (O, K')
    ids = rows.abs().topk(min(2, rows.shape[1]), dim=1).indices                               # <= 2 non-zeros a row
    return pair_taps(ids.T, grid=sizes, num_entries=m.shape[1], weight=rows.gather(1, ids).T)


# ---------------------------------------------------------------------------------------------------
# The relative terms: (query, displacement) values <-> (query, key) pairs, chunked over query rows.
#
#   to_pairs:    R[b, i, j] = sum_k X[b, i, k] * T[disp(i, j), k]        X: (B', N, K), T: (P, K)
#   to_relative: O[b, i, k] = sum_j A[b, i, j] * T[disp(i, j), k]        A: (B', N, N)
#
# are adjoint in X and A. Both go through a grid over (query, displacement): for a block of query
# rows (first spatial axis y in [y0, y1)) only table rows with y-displacement in a slab of
# S_0 + (y1 - y0) - 1 are reachable, so each block multiplies by that slab of T and moves between
# grid and pairs with one strided copy (for a fixed query, key -> displacement is injective: no
# accumulation, no atomics). Blocks are sized to stay in cache on CPU; on GPUs they are large.
# ---------------------------------------------------------------------------------------------------

# Grid elements per block of query rows (at least one row): ~1 MB keeps a CPU block in cache (measured
# fastest at 32x32); on GPUs fewer, larger blocks (128 MB at float32) amortise the launches.
_BLOCK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 25}


def _displacement_view(buf: torch.Tensor, query_sizes: tuple[int, ...], key_sizes: tuple[int, ...]) -> torch.Tensor:
    """View a contiguous (B', Nq, Pt) grid as (B', *query_sizes, *key_sizes) over (query, key) cells.

    The grid's table axis spans displacements key - query over q_a + k_a - 1 values per axis a
    (row-major); element [b, q.., k..] is buf[b, flat(q), flat(k - q + query_sizes - 1)]. Moving the
    query by one moves the displacement back by one, so every axis has a constant stride.
    """
    n = len(query_sizes)
    table = [q + k - 1 for q, k in zip(query_sizes, key_sizes)]
    t_stride = [math.prod(table[a + 1:]) for a in range(n)]
    q_stride = [math.prod(query_sizes[a + 1:]) for a in range(n)]
    rows, cells = math.prod(query_sizes), math.prod(table)
    strides = [rows * cells] + [qs * cells - ts for qs, ts in zip(q_stride, t_stride)] + t_stride
    offset = buf.storage_offset() + sum((q - 1) * ts for q, ts in zip(query_sizes, t_stride))
    return buf.as_strided((buf.shape[0], *query_sizes, *key_sizes), strides, offset)


def _blocks(sizes: tuple[int, ...], batch: int, device: torch.device):
    """Yield (query slice, table slice, query_sizes) per block of rows along the first spatial axis."""
    first, rest = sizes[0], sizes[1:]
    per_query = math.prod(rest)
    slab = math.prod(2 * s - 1 for s in rest)                     # table cells per y-displacement
    budget = _BLOCK_ELEMENTS.get(device.type, _BLOCK_ELEMENTS["cuda"])
    rows = max(1, min(first, budget // max(1, batch * per_query * (2 * first - 1) * slab)))
    for y0 in range(0, first, rows):
        y1 = min(y0 + rows, first)
        yield (slice(y0 * per_query, y1 * per_query),
               slice((first - y1) * slab, (2 * first - 1 - y0) * slab),
               (y1 - y0, *rest))


def _to_pairs(x: torch.Tensor, table: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """x: (B', N, K), table: (P, K) -> (B', N, N)."""
    batch, num = x.shape[:2]
    out = x.new_empty(batch, num, num)
    for q, t, q_sizes in _blocks(sizes, batch, x.device):
        grid = (x[:, q] @ table[t].T).contiguous()                 # (B', block, slab cells)
        out[:, q].view(batch, *q_sizes, *sizes).copy_(_displacement_view(grid, q_sizes, sizes))
    return out


def _to_grid(pairs: torch.Tensor, q: slice, t: slice, q_sizes, sizes) -> torch.Tensor:
    """The block q of (B', N, N) pairs placed on its (B', block, slab cells) displacement grid."""
    batch = pairs.shape[0]
    grid = pairs.new_zeros(batch, q.stop - q.start, t.stop - t.start)
    _displacement_view(grid, q_sizes, sizes).copy_(pairs[:, q].view(batch, *q_sizes, *sizes))
    return grid


def _to_relative(pairs: torch.Tensor, table: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """pairs: (B', N, N), table: (P, K) -> (B', N, K)."""
    batch, num = pairs.shape[:2]
    out = pairs.new_empty(batch, num, table.shape[1])
    for q, t, q_sizes in _blocks(sizes, batch, pairs.device):
        out[:, q] = _to_grid(pairs, q, t, q_sizes, sizes) @ table[t]
    return out


def _table_grad(pairs: torch.Tensor, y: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """sum over (b, i) of pairs placed on the displacement grid times y: (B', N, N), (B', N, K) -> (P, K)."""
    batch = pairs.shape[0]
    grad = y.new_zeros(math.prod(2 * s - 1 for s in sizes), y.shape[-1])
    for q, t, q_sizes in _blocks(sizes, batch, pairs.device):
        grid = _to_grid(pairs, q, t, q_sizes, sizes)               # (B', block, slab)
        grad[t] += torch.einsum("bqp,bqk->pk", grid, y[:, q])      # blocks overlap: sum them in turn
    return grad


class _RelativeToPairs(torch.autograd.Function):
    """R = to_pairs(x, table); gradients for both (first order)."""

    @staticmethod
    def forward(ctx, x, table, sizes):
        ctx.sizes = sizes
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, table)
        return _to_pairs(x, table, sizes)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, table = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = _to_relative(grad, table, ctx.sizes) if ctx.needs_input_grad[0] else None
        grad_table = _table_grad(grad, x, ctx.sizes) if ctx.needs_input_grad[1] else None
        return grad_x, grad_table, None


class _RelativeFromPairs(torch.autograd.Function):
    """O = to_relative(pairs, table); gradients for both (first order)."""

    @staticmethod
    def forward(ctx, pairs, table, sizes):
        ctx.sizes = sizes
        pairs = pairs.contiguous()
        ctx.save_for_backward(pairs if ctx.needs_input_grad[1] else None, table)
        return _to_relative(pairs, table, sizes)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        pairs, table = ctx.saved_tensors
        grad_pairs = _to_pairs(grad, table, ctx.sizes) if ctx.needs_input_grad[0] else None
        grad_table = _table_grad(pairs, grad, ctx.sizes) if ctx.needs_input_grad[1] else None
        return grad_pairs, grad_table, None

# ---------------------------------------------------------------------------------------------------
# The original's four ops (compatibility layer; spec §3-§4).
# ---------------------------------------------------------------------------------------------------

@lru_cache(maxsize=64)
def _radial_map_cached(out_shape, centre, num_bins, method, dtype, device) -> torch.Tensor:
    return _radial_map(out_shape, centre, num_bins, method, dtype).to(device)


@lru_cache(maxsize=64)
def _angular_map_cached(kernel, pad, method, dtype, device) -> torch.Tensor:
    return _angular_map_2d(kernel, pad, method, dtype).to(device)


def _op_method(op: str, interpolation: str) -> str:
    names = _OP_NAME_MEANS[op]
    if not isinstance(interpolation, str) or interpolation not in names:
        raise ConfigError(f"{op}_pad2d: unknown interpolation {interpolation!r}; the original op knows "
                          f"{sorted(names)}")
    return names[interpolation]


def _check_pad(pad) -> tuple[int, int, int, int]:
    pad = tuple(int(p) for p in pad)
    if len(pad) != 4:
        raise InputError(f"pad must be 4 ints (left, right, up, down), got {pad}")
    return pad


def rotative_pad2d(input: torch.Tensor, pad: Sequence[int], interpolation: str = "nearest") -> torch.Tensor:
    """Radial profile -> 2-D table, like ``torch.ops.rpa_sa.rotative_pad2d``.

    input: (B, C, K) values at distances 0..K-1; pad: (left, right, up, down).
    Returns (B, C, 1 + up + down, 1 + left + right), centre (up, left). ``interpolation``: ``'nearest'``
    or ``'lerp'``; the original's ``'alerp'``/``'slerp'`` are accepted and mean nearest, as they did.
    """
    method = _op_method("rotative", interpolation)
    left, right, up, down = _check_pad(pad)
    if input.dim() != 3 or not input.is_floating_point():
        raise InputError(f"rotative_pad2d: input must be a floating (B, C, K) tensor, got {tuple(input.shape)} "
                         f"{input.dtype}")
    out_shape = (1 + up + down, 1 + left + right)
    if min(out_shape) < 1:
        raise InputError(f"rotative_pad2d: pad {pad} gives an empty table")
    m = _radial_map_cached(out_shape, (up, left), input.shape[-1], method, input.dtype, input.device)
    return (input @ m.T).reshape(*input.shape[:2], *out_shape)


def spherical_pad2d(input: torch.Tensor, pad: Sequence[int], interpolation: str = "nearest") -> torch.Tensor:
    """Kernel -> larger 2-D table by angular extension, like ``torch.ops.rpa_sa.spherical_pad2d``.

    input: (B, C, kh, kw); pad: (left, right, up, down), negative values crop.
    Returns (B, C, kh + up + down, kw + left + right). ``interpolation``: ``'nearest'``, ``'alerp'`` or
    ``'slerp'``; ``'lerp'`` is accepted and means nearest, as it did in the original op.
    """
    method = _op_method("spherical", interpolation)
    pad = _check_pad(pad)
    if input.dim() != 4 or not input.is_floating_point():
        raise InputError(f"spherical_pad2d: input must be a floating (B, C, kh, kw) tensor, got "
                         f"{tuple(input.shape)} {input.dtype}")
    kh, kw = input.shape[-2:]
    out_h, out_w = kh + pad[2] + pad[3], kw + pad[0] + pad[1]
    if out_h < 1 or out_w < 1:
        raise InputError(f"spherical_pad2d: pad {pad} leaves nothing of a {kh}x{kw} input")
    m = _angular_map_cached((kh, kw), pad, method, input.dtype, input.device)
    return (input.flatten(2) @ m.T).reshape(*input.shape[:2], out_h, out_w)


def _check_affinity(affinity: torch.Tensor, channels: int, height: int, width: int, op: str) -> torch.Tensor:
    expected = (channels, 2 * height - 1, 2 * width - 1)
    if tuple(affinity.shape) != expected:
        raise InputError(f"{op}: affinity must have shape (d, 2H-1, 2W-1) = {expected}, got "
                         f"{tuple(affinity.shape)}")
    return affinity.reshape(channels, -1)


def relative_attend_query_reference(query: torch.Tensor, affinity: torch.Tensor,
                                    sizes: Sequence[int]) -> torch.Tensor:
    """The original's relative logit op (spec §4.1) for any number of spatial dims, by an explicit index.

    query: (B, d, N), N = prod(sizes) (row-major); affinity: (d, *table), the displacement table
    read as the original does (:func:`_pair_index`). Returns (B, N, N):
    R[b, i, j] = sum_c query[b, c, i] * affinity[c, disp(i, j)]. Materialises (d, N, N).
    """
    index = _pair_index(tuple(int(s) for s in sizes), tuple(affinity.shape[1:]), query.device)
    return torch.einsum("bci,cij->bij", query, affinity.flatten(1)[:, index])


def relative_attend_weight_reference(weight: torch.Tensor, affinity: torch.Tensor,
                                     sizes: Sequence[int]) -> torch.Tensor:
    """The original's relative value op (spec §4.2) for any number of spatial dims, by an explicit index.

    weight: (B, N, N) attention weights; affinity: (d, *table). Returns (B, d, N):
    O[b, c, i] = sum_j weight[b, i, j] * affinity[c, disp(i, j)]. Materialises (d, N, N).
    """
    index = _pair_index(tuple(int(s) for s in sizes), tuple(affinity.shape[1:]), weight.device)
    return torch.einsum("bij,cij->bci", weight, affinity.flatten(1)[:, index])


def relative_attend_query2d(query: torch.Tensor, affinity: torch.Tensor, height: int, width: int,
                            backend: str = "auto") -> torch.Tensor:
    """Relative logit term, like ``torch.ops.rpa_sa.relative_attend_query2d``.

    query: (B, d, N), N = height * width (row-major); affinity: (d, 2H-1, 2W-1), centre = no displacement.
    Returns (B, N, N): R[b, i, j] = sum_c query[b, c, i] * affinity[c, y_j - y_i + H - 1, x_j - x_i + W - 1].
    ``backend``: ``"auto"`` the native loop (``ops/relative_attn``, the original op's algorithm, vectorised and
    threaded) where it builds, else the chunked strided copies; ``"native"`` the loop or an OpsError;
    ``"reference"`` :func:`relative_attend_query_reference`.
    """
    if query.dim() != 3 or query.shape[-1] != height * width:
        raise InputError(f"relative_attend_query2d: query must be (B, d, {height}*{width}), got {tuple(query.shape)}")
    table = _check_affinity(affinity, query.shape[1], height, width, "relative_attend_query2d")
    if resolve(backend, BACKENDS, "relative_attend_query2d backend") == "reference":
        return relative_attend_query_reference(query, affinity, (height, width))
    if use_native(OP_NAME, backend, query.device.type):
        return attend_pairs(query, affinity, height, width)
    return _RelativeToPairs.apply(query.transpose(1, 2), table.T, (int(height), int(width)))


def relative_attend_weight2d(weight: torch.Tensor, affinity: torch.Tensor, height: int, width: int,
                             backend: str = "auto") -> torch.Tensor:
    """Relative value term, like ``torch.ops.rpa_sa.relative_attend_weight2d``.

    weight: (B, N, N) attention weights; affinity: (d, 2H-1, 2W-1).
    Returns (B, d, N): O[b, c, i] = sum_j weight[b, i, j] * affinity[c, y_j - y_i + H - 1, x_j - x_i + W - 1].
    ``backend``: as :func:`relative_attend_query2d`; ``"reference"`` :func:`relative_attend_weight_reference`.
    """
    num = height * width
    if weight.dim() != 3 or tuple(weight.shape[1:]) != (num, num):
        raise InputError(f"relative_attend_weight2d: weight must be (B, {num}, {num}), got {tuple(weight.shape)}")
    table = _check_affinity(affinity, affinity.shape[0], height, width, "relative_attend_weight2d")
    if resolve(backend, BACKENDS, "relative_attend_weight2d backend") == "reference":
        return relative_attend_weight_reference(weight, affinity, (height, width))
    if use_native(OP_NAME, backend, weight.device.type):
        return attend_dot(weight, affinity, height, width)
    return _RelativeFromPairs.apply(weight, table.T, (int(height), int(width))).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------
# The blocks.
# ---------------------------------------------------------------------------------------------------

def _ntuple(value, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n or not all(isinstance(v, int) for v in value):
        raise ConfigError(f"{name} must be an int or {n} ints, got {value!r}")
    return value


class _MultiheadNonlocalNd(nn.Module):
    """Shared implementation of the 1-D/2-D/3-D blocks; see :class:`MultiheadNonlocal2d`."""

    ndim = 2
    _conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    _conv_transpose = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}

    def __init__(self, in_channels: int, hidden_channels: int | None = None, num_heads: int = 1,
                 kernel_size=1, stride=1, padding=0, dilation=1, use_scale: bool = True,
                 residual: bool = True, rpa_mode: str | None = None, rpa_kernel_size=None,
                 rpa_interpolation: str = "nearest", rpa_zero_init: bool = True, *,
                 bug_compatible: bool = False, backend: str = "auto", **older_names):
        super().__init__()
        # The original's first release spelled the rpa_* arguments rasa_*.
        for old in older_names:
            if not old.startswith("rasa_") or "rpa_" + old[5:] not in (
                    "rpa_mode", "rpa_kernel_size", "rpa_interpolation", "rpa_zero_init"):
                raise ArgumentError(f"{type(self).__name__}() got an unexpected keyword argument {old!r}")
        rpa_mode = _take_older(older_names, "mode", rpa_mode, None)
        rpa_kernel_size = _take_older(older_names, "kernel_size", rpa_kernel_size, None)
        rpa_interpolation = _take_older(older_names, "interpolation", rpa_interpolation, "nearest")
        rpa_zero_init = _take_older(older_names, "zero_init", rpa_zero_init, True)

        if not isinstance(in_channels, int) or in_channels < 1:
            raise ConfigError(f"in_channels must be a positive int, got {in_channels!r}")
        hidden_channels = in_channels if hidden_channels is None else hidden_channels
        if not isinstance(hidden_channels, int) or hidden_channels < 1:
            raise ConfigError(f"hidden_channels must be a positive int or None, got {hidden_channels!r}")
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ConfigError(f"num_heads must be a positive int, got {num_heads!r}")
        if rpa_mode is False:
            rpa_mode = None
        if rpa_mode is not None and rpa_mode not in RPA_MODES:
            raise ConfigError(f"rpa_mode must be None, 'relative_distance' or 'relative_position', got {rpa_mode!r}")

        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.num_heads = num_heads
        self.kernel_size = _ntuple(kernel_size, self.ndim, "kernel_size")
        self.stride = _ntuple(stride, self.ndim, "stride")
        self.padding = _ntuple(padding, self.ndim, "padding")
        self.dilation = _ntuple(dilation, self.ndim, "dilation")
        self.use_scale = use_scale
        self.residual = residual
        self.rpa_mode = rpa_mode
        self.rpa_interpolation = rpa_interpolation
        self.rpa_zero_init = rpa_zero_init
        self.bug_compatible = bug_compatible
        self.backend = check_backend(backend, ATTENTION_BACKENDS, f"{type(self).__name__} backend")
        self.scale = hidden_channels ** -0.5 if use_scale else 1.0

        conv, conv_t = self._conv[self.ndim], self._conv_transpose[self.ndim]
        self.embed_conv = nn.ModuleList(
            conv(in_channels, 3 * hidden_channels, self.kernel_size, self.stride, self.padding, self.dilation)
            for _ in range(num_heads))
        self.output_conv = conv_t(num_heads * hidden_channels, in_channels, self.kernel_size, self.stride,
                                  self.padding, dilation=self.dilation)

        if rpa_mode is None:
            self.rpa_kernel_size = None
            self._method = None
            self.register_parameter("a_k", None)
            self.register_parameter("a_v", None)
        else:
            self.rpa_kernel_size = self._parse_rpa_kernel(rpa_mode, rpa_kernel_size)
            self._method = self._parse_method(rpa_mode, rpa_interpolation, bug_compatible)
            shape = (hidden_channels, *self.rpa_kernel_size)
            self.a_k = nn.ParameterList(nn.Parameter(torch.empty(shape)) for _ in range(num_heads))
            self.a_v = nn.ParameterList(nn.Parameter(torch.empty(shape)) for _ in range(num_heads))
        self.reset_parameters()

    # -- construction helpers -------------------------------------------------------------------------

    def _parse_rpa_kernel(self, mode: str, size) -> tuple[int, ...]:
        size = 5 if size is None else size
        if mode == "relative_distance":
            if not isinstance(size, int):
                size = tuple(size)
                if len(size) != 1:
                    raise ConfigError(f"relative_distance takes one rpa_kernel_size (number of distance bins), "
                                      f"got {size!r}")
                size = size[0]
            if size < 1:
                raise ConfigError(f"rpa_kernel_size must be >= 1, got {size}")
            return (size,)
        size = _ntuple(size, self.ndim, "rpa_kernel_size")
        if any(k < 1 or k % 2 == 0 for k in size):
            raise ConfigError(f"relative_position needs odd rpa_kernel_size (the kernel centre is the zero "
                              f"displacement; even kernels were broken in the original), got {size}")
        return size

    @staticmethod
    def _parse_method(mode: str, name: str, bug_compatible: bool) -> str:
        if mode == "relative_distance":
            known = {"nearest": "nearest", "lerp": "lerp"}
            if bug_compatible:       # the original op silently used nearest for every other name
                known.update(alerp="nearest", slerp="nearest")
        else:
            known = {"nearest": "nearest", "alerp": "alerp", "slerp": "slerp",
                     "lerp": "nearest" if bug_compatible else "alerp"}
        if name not in known:
            raise ConfigError(f"rpa_interpolation {name!r} is not a {mode} method; choose from {sorted(known)}")
        return known[name]

    def reset_parameters(self) -> None:
        """The original's init: kaiming normal (fan_out, relu) conv weights, zero biases, a_k/a_v 0 or U(0, 1)."""
        for layer in [*self.embed_conv, self.output_conv]:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        if self.rpa_mode is not None:
            for p in [*self.a_k, *self.a_v]:
                nn.init.zeros_(p) if self.rpa_zero_init else nn.init.uniform_(p, 0, 1)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, hidden_channels={self.hidden_channels}, num_heads={self.num_heads}, "
             f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
             f"dilation={self.dilation}, use_scale={self.use_scale}, residual={self.residual}")
        if self.rpa_mode is not None:
            s += (f", rpa_mode={self.rpa_mode!r}, rpa_kernel_size={self.rpa_kernel_size}, "
                  f"rpa_interpolation={self.rpa_interpolation!r}")
            if self.bug_compatible:
                s += ", bug_compatible=True"
        return s

    # -- relative tables --------------------------------------------------------------------------------

    def _legacy(self, sizes: tuple[int, ...]) -> bool:
        """Whether the original's transposed pad order changes anything for this hidden map.

        It does when the vertical and horizontal pads differ: non-square maps, or non-square kernels.
        """
        if not (self.bug_compatible and self.rpa_mode == "relative_position" and self.ndim == 2):
            return False
        left, _, up, _ = _rp_pad2d(self.rpa_kernel_size, sizes, legacy=False)
        return left != up

    def _map(self, sizes: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return _relative_map(self.rpa_mode, self._method, self.rpa_kernel_size, sizes, self._legacy(sizes),
                             dtype, device)

    def _taps(self, sizes: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> PairTaps:
        # The last taps are kept on the module too: torch.compile traces through lru_cache (it ignores the
        # cache) but reads a module attribute as a constant, so a warm module compiles without graph breaks.
        key = (sizes, dtype, torch.device(device))
        cached = getattr(self, "_last_taps", None)
        if cached is None or cached[0] != key:
            cached = (key, _relative_taps(self.rpa_mode, self._method, self.rpa_kernel_size, sizes,
                                          self._legacy(sizes), self._table_shape(sizes), dtype, device))
            self._last_taps = cached
        return cached[1]

    def _table_shape(self, sizes: tuple[int, ...]) -> tuple[int, ...]:
        if self._legacy(sizes):
            left, right, up, down = _rp_pad2d(self.rpa_kernel_size, sizes, legacy=True)
            return (self.rpa_kernel_size[0] + up + down, self.rpa_kernel_size[1] + left + right)
        return tuple(2 * s - 1 for s in sizes)

    def reference_affinity(self, which: str, head: int, hidden_size: Sequence[int]) -> torch.Tensor:
        """The expanded table A_k (``which='k'``) or A_v of one head for a hidden map of ``hidden_size``.

        Shape (d, 2S_1-1, ..., 2S_n-1), centre = zero displacement (the fixtures' ``a_k_ref.<head>``);
        in the bug-compatible non-square 2-D case the original's transposed layout.
        """
        if self.rpa_mode is None:
            raise ConfigError("reference_affinity needs an rpa_mode")
        if which not in ("k", "v"):
            raise ConfigError(f"which must be 'k' or 'v', got {which!r}")
        sizes = tuple(int(s) for s in hidden_size)
        a = (self.a_k if which == "k" else self.a_v)[head]
        m = self._map(sizes, a.dtype, a.device)
        return (a.flatten(1) @ m.T).reshape(a.shape[0], *self._table_shape(sizes))

    # -- forward -----------------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != self.ndim + 2:
            raise InputError(f"{type(self).__name__} expects a (B, C, {self.ndim} spatial dims) tensor, got shape "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != self.in_channels:
            raise InputError(f"{type(self).__name__} has in_channels={self.in_channels}, input has {x.shape[1]} "
                             f"channels (shape {tuple(x.shape)})")
        if not x.is_floating_point():
            raise InputTypeError(f"{type(self).__name__} needs a floating-point input, got {x.dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, *spatial) -> (B, C_in, *spatial)."""
        self._check_input(x)
        what = f"{type(self).__name__} backend"
        if resolve(self.backend, ATTENTION_BACKENDS, what) == "reference":
            return self._forward_reference(x)
        batch, heads, d = x.shape[0], self.num_heads, self.hidden_channels
        # One conv for all heads: head t owns channels [3dt, 3d(t+1)) = its q, k, v blocks.
        weight = torch.cat([conv.weight for conv in self.embed_conv])
        bias = torch.cat([conv.bias for conv in self.embed_conv])
        embed = self._conv_fn(x, weight, bias, self.stride, self.padding, self.dilation)
        sizes = tuple(embed.shape[2:])
        q, k, v = embed.reshape(batch, heads, 3, d, math.prod(sizes)).unbind(2)   # each (B, h, d, N)
        # The scale multiplies the whole logit, relative term included; both are linear in q.
        q = q * self.scale
        terms = {}
        if self.rpa_mode is not None:  # key term q_i . A_k[disp] and value term, through the taps of a
            taps = self._taps(sizes, q.dtype, q.device)
            a_k = torch.stack(list(self.a_k)).flatten(2)                      # (h, d, K')
            a_v = torch.stack(list(self.a_v)).flatten(2)
            terms = dict(query_term=Term(torch.einsum("bhcn,hck->bhnk", q, a_k), taps),
                         value_term=Term(a_v.transpose(1, 2), taps))
        y = relative_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2), **terms,
                               backend=self.backend, what=what)                # (B, h, N, d)
        # contiguous before the transposed conv: on a channels-last-strided view the CPU kernel answers in
        # contiguous layout but torch.export's fake kernel in channels-last, and exported views would not fit
        y = y.transpose(-1, -2).contiguous().view(batch, heads * d, *sizes)
        out = self.output_conv(y, output_size=list(x.shape[2:]))
        return out + x if self.residual else out

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The original's algorithm (spec §1.3): per head its own embedding, the tables expanded for the
        hidden size, the attend ops by index (spec §4), the scale applied to the whole logit."""
        d, ys = self.hidden_channels, []
        for t, conv in enumerate(self.embed_conv):
            e = self._conv_fn(x, conv.weight, conv.bias, self.stride, self.padding, self.dilation)
            sizes = tuple(e.shape[2:])
            q, k, v = e.flatten(2).split(d, dim=1)                           # each (B, d, N)
            logits = q.transpose(1, 2) @ k                                    # (B, N, N)
            if self.rpa_mode is not None:
                logits = logits + relative_attend_query_reference(q, self.reference_affinity("k", t, sizes), sizes)
            attn = torch.softmax(self.scale * logits, dim=-1)
            y = v @ attn.transpose(1, 2)                                      # (B, d, N)
            if self.rpa_mode is not None:
                y = y + relative_attend_weight_reference(attn, self.reference_affinity("v", t, sizes), sizes)
            ys.append(y)
        out = self.output_conv(torch.cat(ys, 1).reshape(x.shape[0], -1, *sizes), output_size=list(x.shape[2:]))
        return out + x if self.residual else out

    @property
    def _conv_fn(self):
        return (F.conv1d, F.conv2d, F.conv3d)[self.ndim - 1]


def _take_older(older: dict, suffix: str, value, default):
    """Merge ``rasa_<suffix>`` into ``rpa_<suffix>``; giving both (with different values) is an error."""
    key = "rasa_" + suffix
    if key not in older:
        return value
    if value != default and value != older[key]:
        raise ArgumentError(f"got both rpa_{suffix}={value!r} and its older spelling {key}={older[key]!r}")
    return older[key]


_DOC_ARGS = """
    Args (the original's names and defaults):
        in_channels: C_in.
        hidden_channels: d, channels of q, k and v per head (default C_in).
        num_heads: h; each head has its own embedding conv ``embed_conv.<t>`` (C_in -> 3d: q, k, v).
        kernel_size, stride, padding, dilation: of the embedding conv and of the transposed output conv
            (h*d -> C_in) that restores the input size. ``kernel_size`` > 1 is the paper's "locality".
        use_scale: scale the logits (incl. the relative term) by d^-1/2.
        residual: add the input to the output.
        rpa_mode: None, ``'relative_distance'`` or ``'relative_position'``.
        rpa_kernel_size: relative_distance: number of distance bins K; relative_position: the (odd)
            kernel of learned displacements. Default 5.
        rpa_interpolation: relative_distance: ``'nearest'`` | ``'lerp'``; relative_position:
            ``'nearest'`` | ``'alerp'`` | ``'slerp'`` (``'lerp'`` = ``'alerp'``, or nearest if bug_compatible).
        rpa_zero_init: a_k, a_v start at 0 (else U(0, 1)).
        bug_compatible: reproduce the original's behaviour where trained weights depend on it (module
            docstring, bugs 2 and 3). Older spellings ``rasa_mode`` etc. are accepted.
        backend: ``"auto"`` (default): the fused attention (module docstring; ``"sdpa"``, ``"flex"``,
            ``"native"`` force one path); ``"reference"``: the original's algorithm, per head with explicit
            index tables. Kept as the ``backend`` attribute, which may be changed later.

    state_dict: ``embed_conv.<t>.{weight,bias}``, ``output_conv.{weight,bias}``, and with an rpa_mode
    ``a_k.<t>``, ``a_v.<t>`` of shape (d, K) / (d, *rpa_kernel_size).
"""


class MultiheadNonlocal1d(_MultiheadNonlocalNd):
    __doc__ = """Multi-head non-local block over (B, C_in, L) with relative terms (no original to compare with).

    relative_position uses a 1-D kernel (d, k) extended by its border cells beyond the kernel, which is
    what the 2-D block computes on a height-1 map with the kernel's centre row.
    """ + _DOC_ARGS
    ndim = 1


class MultiheadNonlocal2d(_MultiheadNonlocalNd):
    __doc__ = """Multi-head non-local block over (B, C_in, H, W) with relative distance/position terms.

    Drop-in for ``rpa_sa.MultiheadNonlocal2d`` (same arguments, same state_dict keys). Example (the
    original README's)::

        nl = MultiheadNonlocal2d(in_channels=8, rpa_mode='relative_position', rpa_kernel_size=5,
                                 rpa_interpolation='slerp')
        y = nl(torch.rand(1, 8, 12, 12))      # (1, 8, 12, 12)

    Fixtures: ``nl2d_rp_slerp_9x13_fixedpad`` is the default on non-square maps, ``nl2d_rp_slerp_9x13``
    needs ``bug_compatible=True`` (transposed table), ``nl2d_rp_lerp_12x12`` and ``toy_cifar_rpanet`` need
    ``'lerp'`` to mean nearest (``bug_compatible=True``, or pass ``'nearest'``); all other module cases
    match in both modes.
    """ + _DOC_ARGS
    ndim = 2


class MultiheadNonlocal3d(_MultiheadNonlocalNd):
    __doc__ = """Multi-head non-local block over (B, C_in, T, H, W) with relative terms (no original to compare with).

    relative_position uses a (kt, kh, kw) kernel: within each depth slice the 2-D angular extension,
    across depth the nearest slice (border slices extend outward). On depth-1 inputs it equals the 2-D
    block with the kernel's centre slice.
    """ + _DOC_ARGS
    ndim = 3
