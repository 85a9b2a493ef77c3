"""iRPE: image relative position encoding (Wu et al., ICCV 2021), drop-in for the original.

Same names, arguments and state_dict keys as the original ``irpe.py`` (microsoft/Cream,
``iRPE/DETR-with-iRPE/models/rpe_attention/irpe.py``) and DETR's ``RPEMultiheadAttention``,
so modules and checkpoints of the original load unchanged. Spec: ``shared/specs/irpe.md``.

Vocabulary (spec §1-§3). A feature map of H x W tokens, preceded by ``skip`` extra tokens
(class/distillation tokens), gives L = skip + H*W tokens; spatial token t sits at row t // W,
column t % W. For every (query i, key j) pair a *bucket id* P[i, j] is computed from the
offset (row_i - row_j, col_i - col_j) by one of four *methods*:

* ``euc``     : piecewise(round(sqrt(dr^2 + dc^2)))        one table of 2*beta_int+1 buckets
* ``quant``   : piecewise(dr^2 + dc^2)                      one table of 2*beta_int+1 buckets
* ``cross``   : piecewise(dr) and piecewise(dc) separately  two tables, outputs summed
* ``product`` : (piecewise(dr), piecewise(dc)) as one id     one table of (2*beta_int+1)^2

A lookup table then turns buckets into either a scalar *bias* per head, or (``contextual``
mode) a vector per head that is dotted with the query / key (or summed into the output
with the attention probabilities, for values).

Fixes over the original (documented at the places they occur):

* method ``cross`` works in :class:`RPEMultiheadAttention` (the original crashed in
  ``__init__`` reading ``num_buckets`` of ``iRPE_Cross``);
* ``quant`` + contextual q/k works with the native ``rpe_index`` op (the original crashed
  with a dtype mismatch when building int32 bucket ids);
* the per-module bucket cache is keyed by (H, W, L, device), not (H, W, device), so
  changing the number of skip tokens never reuses stale ids.

Backends of :class:`iRPE` (:mod:`zoo.ops.backend`; outputs equal, tests hold them equal):

* ``"auto"`` (default) and ``"native"``, the fast index path: transposed contextual modules gather
  with :func:`zoo.ops.rpe_index`, i.e. the native ``rpe_index`` kernel where it builds (``"native"``:
  an error where it does not), else ``torch.gather`` (whose backward is a scatter-add, cheaper than
  the advanced-indexing backward of the original's pure-python path); the value module scatters the
  attention probabilities into buckets, (B, heads, L, nb) @ (nb, d), instead of materialising the
  (heads, L, L, d) gathered table.
* ``"reference"``, the literal original formulation: the gather of :func:`zoo.ops.rpe_index_reference`
  and the gathered (heads, L, L, d) value table.

The backend is an :class:`iRPE` constructor argument and attribute; ``RELZOO_OPS=reference`` selects
the reference for every module left at ``"auto"``.

The attention layers (:class:`RPEMultiheadAttention`, :class:`RPEAttention`) have their own ``backend``
(:data:`zoo.ops.backend.ATTENTION_BACKENDS`): by default the whole attention runs fused
(:func:`zoo.ops.relative_attn.relative_attention`): SDPA without iRPE; with iRPE the per-bucket
products (the small (B, heads, L, nb) tensors the index step gathers from) and each module's taps (the
bucket of every offset, :meth:`iRPE.pair_taps`) go into the native fused kernel on CPU or a
FlexAttention ``score_mod`` on CUDA, so no L x L logit, bias or index is materialised. ``"reference"``
(and ``need_weights=True``) is the original formulation above, with the iRPE modules on their own
``backend``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from zoo.errors import ArgumentError, ConfigError, InputError
from zoo.ops.backend import ATTENTION_BACKENDS, check_backend, resolve
from zoo.ops.relative_attn import PairTaps, Term, offset_grid, pair_taps, relative_attention
from zoo.ops.rpe_index import rpe_index

__all__ = [
    "METHOD", "piecewise_index", "get_num_buckets", "get_bucket_ids_2d", "get_bucket_ids_2d_without_skip",
    "iRPE", "iRPE_Cross", "get_single_rpe_config", "get_rpe_config", "build_rpe", "parse_rpe_spec",
    "rpe_config_from_spec", "RPEMultiheadAttention", "RPEAttention",
]


class METHOD:
    """Method ids of the original (``method`` arguments accept these or the names in :data:`METHOD_NAMES`)."""

    EUCLIDEAN = 0
    QUANT = 1
    PRODUCT = 3
    CROSS = 4
    CROSS_ROWS = 41  # the two halves of CROSS, one module each
    CROSS_COLS = 42


METHOD_NAMES = {
    "euc": METHOD.EUCLIDEAN,
    "euclidean": METHOD.EUCLIDEAN,
    "quant": METHOD.QUANT,
    "product": METHOD.PRODUCT,
    "cross": METHOD.CROSS,
    "cross_rows": METHOD.CROSS_ROWS,
    "cross_cols": METHOD.CROSS_COLS,
}
_METHOD_IDS = {METHOD.EUCLIDEAN, METHOD.QUANT, METHOD.PRODUCT, METHOD.CROSS, METHOD.CROSS_ROWS, METHOD.CROSS_COLS}


def _method_id(method: Union[int, str]) -> int:
    """A method id from an id or a (case-insensitive) name; a clear error for anything else."""
    if isinstance(method, str):
        key = method.strip().lower()
        if key not in METHOD_NAMES:
            raise ConfigError(f"unknown iRPE method '{method}'; expected one of {sorted(METHOD_NAMES)}")
        return METHOD_NAMES[key]
    if isinstance(method, bool) or not isinstance(method, int) or method not in _METHOD_IDS:
        raise ConfigError(f"unknown iRPE method {method!r}; expected one of {sorted(_METHOD_IDS)} or a name "
                          f"in {sorted(METHOD_NAMES)}")
    return method


def _mode_name(mode: Optional[str]) -> str:
    """'bias' or 'contextual' ('ctx' is an alias)."""
    if mode == "ctx":
        return "contextual"
    if mode not in ("bias", "contextual"):
        raise ConfigError(f"iRPE mode must be 'bias', 'contextual' or 'ctx', got {mode!r}")
    return mode


# --------------------------------------------------------------------------------------
# Bucket ids (spec §1, §2)
# --------------------------------------------------------------------------------------

def piecewise_index(relative_position: torch.Tensor, alpha: float, beta: float, gamma: float,
                    dtype: torch.dtype = torch.long) -> torch.Tensor:
    """The piecewise index function g of the paper (Eq. 18), elementwise.

    Exact (after rounding) for |x| <= alpha; beyond, logarithmic
    ``sign(x) * min(beta, round(alpha + (beta - alpha) * ln(|x| / alpha) / ln(gamma / alpha)))``
    and then cast to ``dtype``, which truncates toward zero (so the range is +-int(beta)).

    Args:
        relative_position: integer offsets, or a float tensor of already-rounded values (euc).
        alpha, beta, gamma: the breakpoints (the original uses ratio, 2 ratio, 8 ratio).
        dtype: integer dtype of the result.
    Returns a tensor of ``relative_position``'s shape and ``dtype``.
    """
    rp_abs = relative_position.abs()
    far = rp_abs > alpha
    # Same operation order as the original so float rounding at .5 boundaries is identical;
    # an integer input divided by a Python float computes in the default float dtype.
    log_part = torch.log(rp_abs[far] / alpha) / math.log(gamma / alpha) * (beta - alpha)
    far_values = (torch.sign(relative_position[far]) * (alpha + log_part).round().clip(max=beta)).to(dtype)
    out = (relative_position.round() if relative_position.is_floating_point() else relative_position).to(dtype, copy=True)
    out[far] = far_values
    return out


def _beta_int(beta: float) -> int:
    if beta <= 0:
        raise ConfigError(f"beta must be positive, got {beta}")
    return int(beta)


def get_num_buckets(method: Union[int, str], alpha: float, beta: float, gamma: float) -> int:
    """Lookup-table size of one module, without the skip bucket: S^2 for product, S otherwise
    (S = 2*int(beta) + 1; cross has two tables of S each)."""
    method = _method_id(method)
    size = 2 * _beta_int(beta) + 1
    return size * size if method == METHOD.PRODUCT else size


def _pair_offsets(height: int, width: int, device) -> torch.Tensor:
    """(L, L, 2) int64 offsets query minus key, (row, col), for the row-major H x W grid."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    pos = torch.stack([rows, cols], dim=1)  # (L, 2)
    return pos[:, None, :] - pos[None, :, :]


def _compute_bucket_ids(method: int, height: int, width: int, alpha: float, beta: float, gamma: float,
                        device) -> torch.Tensor:
    """(H*W, H*W) int64 bucket ids of the spatial tokens (no skip tokens)."""
    return _bucket_ids_of_offsets(method, _pair_offsets(height, width, device), alpha, beta, gamma)


def _bucket_ids_of_offsets(method: int, diff: torch.Tensor, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """int64 bucket ids of (..., 2) int64 offsets (row, col), query minus key: the one place of the formulas."""
    beta_int = _beta_int(beta)
    kw = dict(alpha=alpha, beta=beta, gamma=gamma, dtype=torch.long)
    if method == METHOD.EUCLIDEAN:
        # round(sqrt) of the squared distance, in float32 like the original (issue Cream#48).
        distance = diff.square().sum(-1).float().sqrt().round()
        return piecewise_index(distance, **kw) + beta_int
    if method == METHOD.QUANT:
        # No square root on purpose: (1, 0) and (1, 1) are different buckets. Always int64:
        # the original produced int32 here when the native op was present and crashed.
        return piecewise_index(diff.square().sum(-1), **kw) + beta_int
    if method == METHOD.PRODUCT:
        size = 2 * beta_int + 1
        r = piecewise_index(diff[..., 0], **kw) + beta_int
        c = piecewise_index(diff[..., 1], **kw) + beta_int
        return r * size + c
    if method == METHOD.CROSS_ROWS:
        return piecewise_index(diff[..., 0], **kw) + beta_int
    if method == METHOD.CROSS_COLS:
        return piecewise_index(diff[..., 1], **kw) + beta_int
    raise ConfigError("method CROSS has two bucket maps: ask for METHOD.CROSS_ROWS and METHOD.CROSS_COLS")


class _LRU:
    """A small least-recently-used cache (bucket maps for a few recent feature-map sizes)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._data: OrderedDict = OrderedDict()

    def get(self, key, make):
        if key in self._data:
            self._data.move_to_end(key)
            return self._data[key]
        value = make()
        self._data[key] = value
        if len(self._data) > self.capacity:
            self._data.popitem(last=False)
        return value

    def clear(self) -> None:
        self._data.clear()


# Process-wide cache of bucket maps, keyed by everything they depend on. Variable image sizes
# (COCO evaluation) produce many (H, W); 64 entries of at most a few MB each bound the memory.
_BUCKET_CACHE = _LRU(64)


def _cached_bucket_ids(method: int, height: int, width: int, skip: int, alpha: float, beta: float,
                       gamma: float, dtype: torch.dtype, device) -> torch.Tensor:
    """Read-only cached (L, L) bucket map; see :func:`get_bucket_ids_2d`."""
    device = torch.device(device)
    key = (method, height, width, skip, float(alpha), float(beta), float(gamma), dtype, device)

    # Built outside inference mode: a cached map first made under torch.inference_mode() would
    # otherwise be an inference tensor that autograd refuses to save in a later training step.
    @torch.inference_mode(False)
    def make():
        ids = _compute_bucket_ids(method, height, width, alpha, beta, gamma, device)
        if skip > 0:
            # All pairs touching a skip token share one extra bucket: the last row of the table.
            extra = get_num_buckets(method, alpha, beta, gamma)
            full = torch.full((skip + height * width,) * 2, extra, dtype=torch.long, device=device)
            full[skip:, skip:] = ids
            ids = full
        return ids.to(dtype).contiguous()

    return _BUCKET_CACHE.get(key, make)


# Taps (zoo.ops.relative_attn.PairTaps) of a module: the bucket of every offset, for the fused paths.
_TAPS_CACHE = _LRU(64)


def _cached_taps(method: int, height: int, width: int, skip: int, alpha: float, beta: float, gamma: float,
                 device) -> PairTaps:
    """The bucket of every (row, col) offset of an H x W map as :class:`~zoo.ops.relative_attn.PairTaps`
    (one tap, weight 1; pairs touching a skip token read the extra bucket). Cached."""
    device = torch.device(device)
    key = (method, height, width, skip, float(alpha), float(beta), float(gamma), device)

    @torch.inference_mode(False)
    def make():
        offsets = offset_grid((height, width))[:, 1:].to(device)  # (O, 2) row/col offsets, the op's order
        ids = _bucket_ids_of_offsets(method, offsets, alpha, beta, gamma)
        extra = get_num_buckets(method, alpha, beta, gamma)
        return pair_taps(ids, grid=(height, width), skip=skip, num_entries=extra + (1 if skip > 0 else 0),
                         skip_ids=[extra] if skip > 0 else None)

    return _TAPS_CACHE.get(key, make)


def get_bucket_ids_2d_without_skip(method: Union[int, str], height: int, width: int, alpha: float, beta: float,
                                   gamma: float, dtype: torch.dtype = torch.long,
                                   device=torch.device("cpu")) -> tuple[torch.Tensor, int, int]:
    """Bucket ids of an H x W grid without skip tokens, as the original: ``(bucket_ids, num_buckets, L)``.

    ``bucket_ids`` (L, L) of ``dtype`` with L = height * width (row-major tokens), ``num_buckets`` the
    table size :func:`get_num_buckets` (no skip bucket). See :func:`get_bucket_ids_2d`.
    """
    bucket_ids, num_buckets = get_bucket_ids_2d(method, height, width, 0, alpha, beta, gamma, dtype, device)
    return bucket_ids, num_buckets, int(height) * int(width)


def get_bucket_ids_2d(method: Union[int, str], height: int, width: int, skip: int, alpha: float, beta: float,
                      gamma: float, dtype: torch.dtype = torch.long,
                      device=torch.device("cpu")) -> tuple[torch.Tensor, int]:
    """Bucket ids of every (query, key) pair, spec §2, as the original: ``(bucket_ids, num_buckets)``.

    Args:
        method: EUCLIDEAN, QUANT, PRODUCT, CROSS_ROWS or CROSS_COLS (id or name).
        height, width: the feature map.
        skip: number of leading non-spatial tokens; pairs touching them get the extra id
            ``get_num_buckets(...)`` (one extra bucket whatever ``skip`` is).
        alpha, beta, gamma: piecewise breakpoints.
    Returns ``bucket_ids``, an (L, L) tensor of ``dtype`` with L = skip + height * width (a fresh
    tensor), and ``num_buckets``, the table size including the skip bucket when ``skip > 0``.
    """
    method = _method_id(method)
    if height <= 0 or width <= 0 or skip < 0:
        raise InputError(f"need height, width > 0 and skip >= 0, got height={height}, width={width}, skip={skip}")
    ids = _cached_bucket_ids(method, int(height), int(width), int(skip), alpha, beta, gamma, dtype, device).clone()
    return ids, get_num_buckets(method, alpha, beta, gamma) + (1 if skip > 0 else 0)


# --------------------------------------------------------------------------------------
# Modules (spec §3)
# --------------------------------------------------------------------------------------

class iRPE(nn.Module):
    """One relative position encoding table and its lookup.

    Args:
        head_dim: d, channels per head.
        num_heads: heads of the table (1 = shared over all attention heads, broadcast).
        mode: 'bias' or 'contextual' ('ctx').
        method: EUCLIDEAN, QUANT, PRODUCT, CROSS_ROWS or CROSS_COLS (CROSS: use :class:`iRPE_Cross`).
        transposed: True for the q/k modules (input (B, heads, L, d) -> (B or 1, heads, L, L)),
            False for the v module (input probabilities (B, heads, L, L) -> (B, heads, L, d)).
        num_buckets: table size (including the skip bucket if any).
        initializer: callable applied to the table after creation (default: leave zeros).
        rpe_config: the single config (``alpha``, ``beta``, ``gamma`` needed for the buckets).
        backend: ``"auto"`` (default), ``"native"`` or ``"reference"`` (module docstring); kept as
            the ``backend`` attribute, which may be changed later.

    Parameters: ``lookup_table_bias`` (heads, nb) for transposed bias; ``lookup_table_weight``
    (heads, d, nb) for transposed contextual, (heads, nb, d) for non-transposed contextual.
    Non-transposed bias raises NotImplementedError, like the original.
    """

    def __init__(self, head_dim: int, num_heads: int = 8, mode: Optional[str] = None, method=None,
                 transposed: bool = True, num_buckets: Optional[int] = None, initializer=None, rpe_config=None,
                 *, backend: str = "auto"):
        super().__init__()
        if rpe_config is None or not all(k in rpe_config for k in ("alpha", "beta", "gamma")):
            raise ConfigError("iRPE needs rpe_config with alpha, beta and gamma (make it with get_single_rpe_config)")
        if num_buckets is None or int(num_buckets) < 1:
            raise ConfigError(f"iRPE needs a positive num_buckets, got {num_buckets!r}")
        self.num_heads = int(num_heads)
        self.head_dim = int(head_dim)
        self.mode = _mode_name(mode)
        self.method = _method_id(method)
        if self.method == METHOD.CROSS:
            raise ConfigError("method CROSS is two tables: build it with iRPE_Cross (build_rpe does)")
        self.transposed = bool(transposed)
        self.num_buckets = int(num_buckets)
        self.initializer = initializer if initializer is not None else (lambda x: None)
        self.rpe_config = rpe_config
        self.backend = check_backend(backend, what="iRPE backend")
        self._rp_bucket = None  # ((H, W, L, device), (ids int64, ids int32 or None))
        self._taps = None  # ((H, W, L, device), PairTaps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.transposed:
            if self.mode == "bias":
                self.lookup_table_bias = nn.Parameter(torch.zeros(self.num_heads, self.num_buckets))
                self.initializer(self.lookup_table_bias)
            else:
                self.lookup_table_weight = nn.Parameter(torch.zeros(self.num_heads, self.head_dim, self.num_buckets))
                self.initializer(self.lookup_table_weight)
        else:
            if self.mode == "bias":
                raise NotImplementedError("iRPE on values (non-transposed) has no 'bias' mode; use 'contextual'")
            self.lookup_table_weight = nn.Parameter(torch.zeros(self.num_heads, self.num_buckets, self.head_dim))
            self.initializer(self.lookup_table_weight)

    @staticmethod
    def _layout(L: int, height: Optional[int], width: Optional[int]) -> tuple[int, int, int]:
        """(height, width, skip) of L tokens; height = width = floor(sqrt(L)) when not given."""
        if height is None or width is None:
            height = width = int(math.sqrt(L))
        skip = L - height * width
        if skip < 0:
            raise InputError(f"iRPE: {L} tokens cannot hold a {height}x{width} feature map")
        return int(height), int(width), skip

    def pair_taps(self, num_tokens: int, height: Optional[int] = None, width: Optional[int] = None,
                  device=torch.device("cpu")) -> PairTaps:
        """The bucket of every pair of ``num_tokens`` tokens as taps (:mod:`zoo.ops.relative_attn`), cached."""
        height, width, skip = self._layout(num_tokens, height, width)
        key = (height, width, num_tokens, torch.device(device))
        if self._taps is None or self._taps[0] != key:
            cfg = self.rpe_config
            self._taps = (key, _cached_taps(self.method, height, width, skip, cfg["alpha"], cfg["beta"], cfg["gamma"],
                                            device))
        return self._taps[1]

    def per_bucket(self, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The per-bucket values the index step reads: for q/k modules (B, heads, L, nb) products
        x . w[:, :, b] of x (B, heads, L, d) (bias mode: the table (1, table heads, 1, nb), no x); for the
        v module the table (table heads, nb, d)."""
        if not self.transposed:
            return self.lookup_table_weight
        if self.mode == "bias":
            return self.lookup_table_bias.view(1, self.num_heads, 1, self.num_buckets)
        _, heads, _, d = x.shape
        if d != self.head_dim:
            raise InputError(f"iRPE: input {tuple(x.shape)} does not fit head_dim {self.head_dim}")
        if self.num_heads not in (1, heads):
            raise InputError(f"iRPE table has {self.num_heads} heads, input has {heads}")
        # (B, heads, L, d) @ (table heads, d, nb): contiguous (B, heads, L, nb), the layout the fused kernel
        # reads; a shared table is one (B heads L, d) @ (d, nb) product
        weight = self.lookup_table_weight
        return torch.matmul(x, weight[0] if self.num_heads == 1 else weight)

    def _get_rp_bucket(self, x: torch.Tensor, height: Optional[int] = None, width: Optional[int] = None):
        """(L, L) int64 bucket ids for ``x``'s token count (plus an int32 copy for the native op)."""
        L = x.shape[2]
        height, width, skip = self._layout(L, height, width)
        key = (height, width, L, x.device)
        if self._rp_bucket is not None and self._rp_bucket[0] == key:
            return self._rp_bucket[1]
        cfg = self.rpe_config
        ids = _cached_bucket_ids(self.method, key[0], key[1], skip, cfg["alpha"], cfg["beta"], cfg["gamma"],
                                 torch.long, x.device)
        ids32 = None
        if self.transposed and self.mode == "contextual":
            ids32 = _cached_bucket_ids(self.method, key[0], key[1], skip, cfg["alpha"], cfg["beta"], cfg["gamma"],
                                       torch.int32, x.device)
        self._rp_bucket = (key, (ids, ids32))
        return ids, ids32

    def forward(self, x: torch.Tensor, height: Optional[int] = None, width: Optional[int] = None) -> torch.Tensor:
        """x: (B, heads, L, d) if transposed, else attention probabilities (B, heads, L, L).

        ``height``/``width`` give the feature map (default: both floor(sqrt(L))); the
        remaining L - H*W leading tokens are skip tokens.
        Returns (B, heads, L, L) (bias mode: (1, table heads, L, L), broadcasts), or
        (B, heads, L, d) for the value module.
        """
        if x.dim() != 4:
            raise InputError(f"iRPE expects a 4-D input (B, heads, L, .), got shape {tuple(x.shape)}")
        ids, ids32 = self._get_rp_bucket(x, height, width)
        if self.transposed:
            return self.forward_rpe_transpose(x, ids, ids32)
        return self.forward_rpe_no_transpose(x, ids)

    def forward_rpe_transpose(self, x: torch.Tensor, rp_bucket: torch.Tensor,
                              rp_bucket_int32: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q/k terms: out[b, h, i, j] = x[b, h, i] . w[h, :, P_ij]  (bias: b[h, P_ij])."""
        L = rp_bucket.shape[0]
        if self.mode == "bias":
            return self.lookup_table_bias[:, rp_bucket.flatten()].view(1, self.num_heads, L, L)
        if x.shape[2] != L:
            raise InputError(f"iRPE: input {tuple(x.shape)} does not fit a {L}-token map")
        # Per-bucket products first, then the index step.
        index = rp_bucket if rp_bucket_int32 is None else rp_bucket_int32
        return rpe_index(self.per_bucket(x), index, backend=self.backend)

    def forward_rpe_no_transpose(self, x: torch.Tensor, rp_bucket: torch.Tensor) -> torch.Tensor:
        """v term: out[b, h, i, :] = sum_j x[b, h, i, j] * w[h, P_ij, :]."""
        B, heads, Lq, Lk = x.shape
        if (Lq, Lk) != tuple(rp_bucket.shape):
            raise InputError(f"iRPE (values): attention of shape {tuple(x.shape)} does not fit a "
                             f"{rp_bucket.shape[0]}-token map")
        if self.num_heads not in (1, heads):
            raise InputError(f"iRPE table has {self.num_heads} heads, input has {heads}")
        if resolve(self.backend, what="iRPE backend") == "reference":
            # Reference: gather the table per pair, (table heads, Lq, Lk, d), and contract over keys.
            weight = self.lookup_table_weight[:, rp_bucket, :]
            return torch.matmul(x.permute(1, 2, 0, 3), weight).permute(2, 0, 1, 3)
        # Same sum grouped by bucket: add up each row's probabilities per bucket, then one small matmul.
        per_bucket = x.new_zeros(B, heads, Lq, self.num_buckets)
        per_bucket = per_bucket.scatter_add(3, rp_bucket.view(1, 1, Lq, Lk).expand(B, heads, Lq, Lk), x)
        return torch.matmul(per_bucket, self.lookup_table_weight)

    def extra_repr(self) -> str:
        method = {v: k for k, v in METHOD_NAMES.items() if k != "euclidean"}[self.method]
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, mode={self.mode}, method={method}, "
                f"transposed={self.transposed}, num_buckets={self.num_buckets}")


class iRPE_Cross(nn.Module):
    """Method CROSS: two :class:`iRPE` tables, ``rp_rows`` (row offsets) and ``rp_cols`` (columns); outputs summed.

    Takes the same keyword arguments as :class:`iRPE` (``method`` must be CROSS); ``backend``
    reads and sets both tables' backend.
    """

    def __init__(self, method, **kwargs):
        super().__init__()
        if _method_id(method) != METHOD.CROSS:
            raise ConfigError(f"iRPE_Cross is for method CROSS, got {method!r}")
        self.rp_rows = iRPE(**kwargs, method=METHOD.CROSS_ROWS)
        self.rp_cols = iRPE(**kwargs, method=METHOD.CROSS_COLS)
        self._taps = None  # (rows' taps, cols' taps, the two together)

    @property
    def backend(self) -> str:
        return self.rp_rows.backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.rp_rows.backend = self.rp_cols.backend = value

    @property
    def num_buckets(self) -> int:
        """Buckets of each of the two tables (the original lacked this; DETR's attention read it and crashed)."""
        return self.rp_rows.num_buckets

    def pair_taps(self, num_tokens: int, height: Optional[int] = None, width: Optional[int] = None,
                  device=torch.device("cpu")) -> PairTaps:
        """Two taps per pair: the row bucket, and the column bucket after the row table's entries."""
        rows = self.rp_rows.pair_taps(num_tokens, height, width, device)
        cols = self.rp_cols.pair_taps(num_tokens, height, width, device)
        if self._taps is None or self._taps[0] is not rows or self._taps[1] is not cols:
            with torch.inference_mode(False):  # kept: never an inference tensor
                index = torch.cat([rows.index, cols.index + rows.num_entries])
            self._taps = (rows, cols, PairTaps(index, None, rows.grid, rows.skip, rows.num_entries + cols.num_entries))
        return self._taps[2]

    def per_bucket(self, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The two tables' per-bucket values side by side (:meth:`iRPE.per_bucket`), rows first."""
        axis = -1 if self.rp_rows.transposed else 1
        return torch.cat([self.rp_rows.per_bucket(x), self.rp_cols.per_bucket(x)], axis)

    def forward(self, x: torch.Tensor, height: Optional[int] = None, width: Optional[int] = None) -> torch.Tensor:
        """Same shapes as :meth:`iRPE.forward`."""
        return self.rp_rows(x, height=height, width=width) + self.rp_cols(x, height=height, width=width)


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------

class _AttrDict(dict):
    """dict with attribute access, standing in for the original's EasyDict (no extra dependency)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


def get_single_rpe_config(ratio: float = 1.9, method=METHOD.PRODUCT, mode: str = "contextual",
                          shared_head: bool = True, skip: int = 0) -> _AttrDict:
    """Config of one iRPE table: alpha = ratio, beta = 2 ratio, gamma = 8 ratio; +1 bucket when skip > 0."""
    if skip < 0:
        raise ConfigError(f"skip must be >= 0, got {skip}")
    if ratio <= 0:
        raise ConfigError(f"ratio must be positive, got {ratio}")
    config = _AttrDict()
    config.shared_head = shared_head
    config.mode = _mode_name(mode)
    config.method = _method_id(method)
    config.alpha = 1 * ratio
    config.beta = 2 * ratio
    config.gamma = 8 * ratio
    config.num_buckets = get_num_buckets(config.method, config.alpha, config.beta, config.gamma) + (1 if skip > 0 else 0)
    return config


def get_rpe_config(ratio: float = 1.9, method=METHOD.PRODUCT, mode: str = "contextual", shared_head: bool = True,
                   skip: int = 0, rpe_on: str = "k") -> _AttrDict:
    """``{'rpe_q', 'rpe_k', 'rpe_v'}``: each the same single config if its letter is in ``rpe_on``, else None."""
    if not isinstance(rpe_on, str) or not rpe_on or set(rpe_on) - set("qkv"):
        raise ConfigError(f"rpe_on must be a non-empty combination of 'q', 'k', 'v', got {rpe_on!r}")
    config = _AttrDict()
    single = dict(ratio=ratio, method=method, mode=mode, shared_head=shared_head, skip=skip)
    config.rpe_q = get_single_rpe_config(**single) if "q" in rpe_on else None
    config.rpe_k = get_single_rpe_config(**single) if "k" in rpe_on else None
    config.rpe_v = get_single_rpe_config(**single) if "v" in rpe_on else None
    return config


def build_rpe(config, head_dim: int, num_heads: int):
    """``[rpe_q, rpe_k, rpe_v]`` modules (None where absent) from :func:`get_rpe_config`'s output.

    q and k modules are transposed, v is not; a shared-head config builds a 1-head table.
    """
    if config is None:
        return None, None, None

    def build_one(single, transposed):
        if single is None:
            return None
        single = single if isinstance(single, _AttrDict) else _AttrDict(single)
        cls = iRPE_Cross if _method_id(single["method"]) == METHOD.CROSS else iRPE
        return cls(head_dim=head_dim, num_heads=1 if single["shared_head"] else num_heads, mode=single["mode"],
                   method=single["method"], transposed=transposed, num_buckets=single["num_buckets"],
                   rpe_config=single)

    get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    return [build_one(get("rpe_q"), True), build_one(get("rpe_k"), True), build_one(get("rpe_v"), False)]


def parse_rpe_spec(spec: str) -> Optional[dict]:
    """``'rpe-{ratio}-{method}-{mode}-{shared_head}-{rpe_on}'`` -> get_rpe_config kwargs; '' or None -> None.

    Example: ``'rpe-2.0-product-ctx-1-k'`` -> ratio 2.0, product, contextual, shared, on keys.
    """
    if spec is None or spec == "":
        return None
    if not isinstance(spec, str):
        raise ArgumentError(f"rpe spec must be a string, got {type(spec).__name__}")
    fields = spec.split("-")
    grammar = "'rpe-{ratio}-{method}-{mode}-{shared_head}-{rpe_on}', e.g. 'rpe-2.0-product-ctx-1-k'"
    if len(fields) != 6 or fields[0] != "rpe":
        raise ConfigError(f"malformed iRPE spec '{spec}': expected {grammar}")
    _, ratio, method, mode, shared_head, rpe_on = fields
    try:
        ratio = float(ratio)
    except ValueError:
        raise ConfigError(f"malformed iRPE spec '{spec}': ratio '{ratio}' is not a number") from None
    if shared_head not in ("0", "1"):
        raise ConfigError(f"malformed iRPE spec '{spec}': shared_head must be 0 or 1, got '{shared_head}'")
    _method_id(method.lower())
    _mode_name(mode)
    if not rpe_on or set(rpe_on) - set("qkv"):
        raise ConfigError(f"malformed iRPE spec '{spec}': rpe_on must be letters of 'qkv', got '{rpe_on}'")
    return dict(ratio=ratio, method=method.lower(), mode=mode, shared_head=bool(int(shared_head)), rpe_on=rpe_on)


def rpe_config_from_spec(spec: str, skip: int = 0):
    """The config for a spec string (:func:`parse_rpe_spec`), or None for '' / None (no RPE)."""
    kwargs = parse_rpe_spec(spec)
    return None if kwargs is None else get_rpe_config(skip=skip, **kwargs)


# --------------------------------------------------------------------------------------
# Attention with iRPE (spec §4)
# --------------------------------------------------------------------------------------

def _add_rpe_logits(attn: torch.Tensor, q_scaled: torch.Tensor, k_scaled: torch.Tensor, rpe_q, rpe_k,
                    hw: Optional[Sequence[int]]) -> torch.Tensor:
    """attn (B, heads, L, L) + the rpe_k term RPE_k(q)[i, j] + the rpe_q term RPE_q(k)[j, i].

    Both inputs are already multiplied by head_dim^-0.5 (so contextual terms are scaled,
    bias terms are not).
    """
    h, w = (hw if hw is not None else (None, None))
    if rpe_k is not None:
        attn = attn + rpe_k(q_scaled, height=h, width=w)
    if rpe_q is not None:
        # keys act as queries: the bucket of the reversed pair, then transpose back.
        attn = attn + rpe_q(k_scaled, height=h, width=w).transpose(2, 3)
    return attn


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, rpe_q, rpe_k, rpe_v,
                     hw: Optional[Sequence[int]], **kwargs) -> torch.Tensor:
    """:func:`~zoo.ops.relative_attn.relative_attention` of q (already scaled), k, v (B, heads, L, d) with
    the iRPE terms: rpe_k on the queries (``query_term``), rpe_q on the keys acting as queries
    (``key_term``), rpe_v (``value_term``); per-bucket values (B, heads, L, nb) (bias mode: the table) and
    the modules' cached taps. ``kwargs``: the masks, dropout and backend."""
    if any(m is not None for m in (rpe_q, rpe_k, rpe_v)):
        # the native kernel reads contiguous rows, and the per-bucket products of contiguous q, k come out
        # in its (B, heads, L, nb) layout: one copy each here instead of copies of q and of the products later
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    h, w = (hw if hw is not None else (None, None))
    L, device = q.shape[2], q.device

    def term(module, x):
        return None if module is None else Term(module.per_bucket(x), module.pair_taps(L, h, w, device))

    k_scaled = k * scaling if rpe_q is not None else None
    return relative_attention(q, k, v, query_term=term(rpe_k, q), key_term=term(rpe_q, k_scaled),
                              value_term=term(rpe_v, None), **kwargs)


def _check_hw(hw, L: int) -> Optional[tuple]:
    if hw is None:
        return None
    if len(hw) != 2:
        raise InputError(f"hw must be (height, width), got {hw!r}")
    h, w = int(hw[0]), int(hw[1])
    if h * w > L:
        raise InputError(f"hw={tuple(hw)} has {h * w} positions but the sequence has only {L} tokens")
    return h, w


def _attention_masks(attn_mask, key_padding_mask, N: int, heads: int, L: int, S: int):
    """attn_mask as (1, 1, L, S) or (N, heads, L, S), and key_padding_mask (N, S), validated (None stays None)."""
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            attn_mask = attn_mask.view(1, 1, L, S)
        elif attn_mask.dim() == 3 and attn_mask.shape[0] == N * heads:
            attn_mask = attn_mask.view(N, heads, L, S)
        else:
            raise InputError(f"attn_mask must be (L, S) or (N*heads, L, S), got {tuple(attn_mask.shape)}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (N, S):
        raise InputError(f"key_padding_mask must be (N, S) = {(N, S)}, got {tuple(key_padding_mask.shape)}")
    return attn_mask, key_padding_mask


def _additive(attn_mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A bool/uint8 mask (True = masked) as an additive float mask (-inf); a float mask as it is."""
    if attn_mask is None or attn_mask.is_floating_point():
        return attn_mask
    return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(attn_mask.bool(),
                                                                                          float("-inf"))


_BACKENDS_DOC = """
    Backends (``backend=``, kept as the ``backend`` attribute; :data:`zoo.ops.backend.ATTENTION_BACKENDS`):
    ``"auto"`` (default) the fastest path for the device, dtype and shape
    (:func:`zoo.ops.relative_attn.choose_backend`: in float32 SDPA without relative terms; with them the
    native fused kernel on CPU (SDPA with one shared bias for bias-mode tables over a large batch in
    inference), FlexAttention on CUDA),
    ``"sdpa"``, ``"flex"``, ``"native"``, or ``"reference"``, the original formulation (materialised
    logits, iRPE modules on their own ``backend``). Every path gives the reference's outputs and gradients;
    where the attention probabilities are asked for (``need_weights=True``) the reference runs, since the
    fused kernels never hold them. Fused paths give a query whose keys are all masked a zero output (as
    SDPA does); the original (and ``"reference"``) gives NaN.
"""


class RPEMultiheadAttention(nn.Module):
    __doc__ = """``nn.MultiheadAttention`` with iRPE terms, drop-in for DETR-with-iRPE's module.

    Same constructor arguments and state_dict keys as the original (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj.*``, optional ``bias_k``/``bias_v`` and separate
    ``{q,k,v}_proj_weight`` when kdim/vdim differ, plus ``rpe_{q,k,v}.*``).

    Call: ``attn(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, hw=(H, W))``
    with query (L, N, E), key (S, N, kdim), value (S, N, vdim), key_padding_mask (N, S) bool
    (True = padded), attn_mask (L, S) or (N*heads, L, S), bool (True = masked) or additive float.
    Returns (output (L, N, E), head-averaged probabilities (N, L, S) or None).

    iRPE needs self-attention geometry (L == S, tokens = skip + H*W); a query/key length
    mismatch with RPE is a ValueError (the original failed inside a reshape).
    Fix over the original: method ``cross`` works (the original crashed in ``__init__``).
    ``add_bias_kv``/``add_zero_attn`` append key tokens without a position and are rejected
    together with iRPE.
""" + _BACKENDS_DOC

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, rpe_config=None, *, backend: str = "auto"):
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise ConfigError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.backend = check_backend(backend, ATTENTION_BACKENDS, "RPEMultiheadAttention backend")

        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

        self.rpe_config = rpe_config
        self.rpe_q, self.rpe_k, self.rpe_v = build_rpe(rpe_config, head_dim=self.head_dim, num_heads=num_heads)
        if (add_bias_kv or add_zero_attn) and any(m is not None for m in (self.rpe_q, self.rpe_k, self.rpe_v)):
            raise ConfigError("add_bias_kv / add_zero_attn append key tokens that have no image position; "
                              "they cannot be combined with iRPE")

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def _project(self, query, key, value):
        """q, k, v = separate slices (rows 0:E, E:2E, 2E:3E) of the input projection."""
        E = self.embed_dim
        bias = self.in_proj_bias
        bq, bk, bv = (None, None, None) if bias is None else (bias[:E], bias[E:2 * E], bias[2 * E:])
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight[:E], self.in_proj_weight[E:2 * E], self.in_proj_weight[2 * E:]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, hw: Optional[Sequence[int]] = None):
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise InputError(f"expected query/key/value of shape (L, N, E), got {tuple(query.shape)}, "
                             f"{tuple(key.shape)}, {tuple(value.shape)}")
        L, N, E = query.shape
        if E != self.embed_dim:
            raise InputError(f"query has {E} channels, the module was built for embed_dim={self.embed_dim}")
        if key.shape[:2] != value.shape[:2] or key.shape[1] != N:
            raise InputError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must share (S, N) with N={N}")
        heads, d = self.num_heads, self.head_dim
        scaling = float(d) ** -0.5
        has_rpe = any(m is not None for m in (self.rpe_q, self.rpe_k, self.rpe_v))
        if has_rpe and key.shape[0] != L:
            raise InputError(f"iRPE needs self-attention (query and key of the same length), got {L} and {key.shape[0]}")
        hw = _check_hw(hw, L) if has_rpe else hw

        q, k, v = self._project(query, key, value)
        q = q * scaling  # scaled before everything else, so the contextual rpe_k term is scaled too
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, N, E)])
            v = torch.cat([v, self.bias_v.expand(1, N, E)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))

        # (S, N, E) -> (N, heads, S, d)
        q = q.contiguous().view(L, N, heads, d).permute(1, 2, 0, 3)
        k = k.contiguous().view(k.shape[0], N, heads, d).permute(1, 2, 0, 3)
        v = v.contiguous().view(v.shape[0], N, heads, d).permute(1, 2, 0, 3)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, heads, 1, d)], dim=2)
            v = torch.cat([v, v.new_zeros(N, heads, 1, d)], dim=2)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        S = k.shape[2]
        attn_mask, key_padding_mask = _attention_masks(attn_mask, key_padding_mask, N, heads, L, S)

        what = "RPEMultiheadAttention backend"
        if not need_weights and resolve(self.backend, ATTENTION_BACKENDS, what) != "reference":
            out = _fused_attention(q, k, v, scaling, self.rpe_q, self.rpe_k, self.rpe_v, hw,
                                   attn_bias=_additive(attn_mask, q.dtype),
                                   key_padding_mask=None if key_padding_mask is None else key_padding_mask.bool(),
                                   dropout_p=self.dropout if self.training else 0.0, backend=self.backend, what=what)
            return self.out_proj(out.permute(2, 0, 1, 3).reshape(L, N, E)), None

        # the original formulation: logits materialised (and the probabilities, which need_weights returns)
        attn = torch.matmul(q, k.transpose(2, 3))  # (N, heads, L, S)
        attn = _add_rpe_logits(attn, q, k * scaling if self.rpe_q is not None else None, self.rpe_q, self.rpe_k, hw)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool or attn_mask.dtype == torch.uint8:
                attn = attn.masked_fill(attn_mask.bool(), float("-inf"))
            else:
                attn = attn + attn_mask
        if key_padding_mask is not None:
            attn = attn.masked_fill(key_padding_mask.bool().view(N, 1, 1, S), float("-inf"))

        attn = F.softmax(attn, dim=-1)
        attn = F.dropout(attn, p=self.dropout, training=self.training)
        out = torch.matmul(attn, v)  # (N, heads, L, d)
        if self.rpe_v is not None:
            h, w = hw if hw is not None else (None, None)
            out = out + self.rpe_v(attn, height=h, width=w)  # post-dropout probabilities, like the original
        out = out.permute(2, 0, 1, 3).reshape(L, N, E)
        out = self.out_proj(out)
        if need_weights:
            return out, attn.sum(dim=1) / heads
        return out, None


class RPEAttention(nn.Module):
    __doc__ = """DeiT-with-iRPE's attention block (timm ``Attention`` + iRPE), drop-in for the original.

    Args as the original: dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.,
    proj_drop=0., rpe_config=None. Keys: ``qkv.*``, ``proj.*``, ``rpe_{q,k,v}.*``.
    Input x (B, N, C) with N = skip + H*W tokens (H = W = floor(sqrt(N)) unless ``hw`` is given);
    output (B, N, C).
""" + _BACKENDS_DOC

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, rpe_config=None, *, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.backend = check_backend(backend, ATTENTION_BACKENDS, "RPEAttention backend")
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rpe_q, self.rpe_k, self.rpe_v = build_rpe(rpe_config, head_dim=head_dim, num_heads=num_heads)

    def forward(self, x: torch.Tensor, hw: Optional[Sequence[int]] = None) -> torch.Tensor:
        if x.dim() != 3:
            raise InputError(f"RPEAttention expects (B, N, C), got {tuple(x.shape)}")
        B, N, C = x.shape
        hw = _check_hw(hw, N)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, d)
        q = q * self.scale
        what = "RPEAttention backend"
        if resolve(self.backend, ATTENTION_BACKENDS, what) != "reference":
            out = _fused_attention(q, k, v, self.scale, self.rpe_q, self.rpe_k, self.rpe_v, hw,
                                   dropout_p=self.attn_drop.p if self.training else 0.0, backend=self.backend,
                                   what=what)
        else:  # the original formulation
            attn = q @ k.transpose(-2, -1)
            attn = _add_rpe_logits(attn, q, k * self.scale if self.rpe_q is not None else None, self.rpe_q,
                                   self.rpe_k, hw)
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = attn @ v
            if self.rpe_v is not None:
                h, w = hw if hw is not None else (None, None)
                out = out + self.rpe_v(attn, height=h, width=w)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))
