"""Relational Self-Attention (RSA), Kim et al., NeurIPS 2021 (spec ``shared/specs/rsa.md`` §1).

:class:`RSA` is a drop-in for ``RSA`` in ``ops/rsa.py`` of KimManjin/RSA: same constructor
arguments, same parameter names (``P1``, ``I``, ``projection``, ``H1``, ``H2``, ``G``) in the
same ``state_dict`` order, same output (checked against the golden fixtures). It does not
print its arguments on construction as the original does.

What the layer computes, per position p of a (T, H, W) clip and with ⋆ the zero-padded
(kT, kH, kW) cross-correlation of a single-channel map (spec §1.3):

1. ``z = projection(x)`` split into Q (``nh * dk`` channels, head-major), K (``dk``,
   absent for ``kernel_type='V'``), V (``dv``); K and V are shared by all heads.
2. L2 normalisation with eps inside the root: q per head, k and v over all their channels.
3. Kernel κ (nh x dd): ``'V'``: κ = q̂. ``'R'``/``'VplusR'``: R[c, j] = H1[c*dd + j] ⋆ k̂_c
   (+ P1[c, j] for 'VplusR'), κ[h, j] = Σ_c q̂[h, c] R[c, j].
4. Context F (dv x dd): E[v, j] = H2[j] ⋆ v̂_v. ``'V'``: F = E. ``'R'``/``'VplusR'``:
   Γ[v, u] = G[u] ⋆ v̂_v (+ I[v, u]), F[u, j] = Σ_v Γ[v, u] E[v, j].
5. O[u, h] = Σ_j κ[h, j] F[u, j], output channel ``u * nh + h`` (value-major; the original's
   comments say head-major, its memory order is value-major, pitfall §5.2).
6. If any stride > 1: 3x3 average pool, spatial stride 2 (the stride values are otherwise unused).

Two formulations of steps 3-5 give the same numbers; ``backend`` (:mod:`zoo.ops.backend`, no native
op) chooses:

* :func:`rsa_core_reference` (``backend="reference"``) -- the original's: materialises R, E, Γ and F
  for every position (each ``N * 32 * 32 * T * H * W`` floats at the released sizes) and lets
  autograd keep them.
* :func:`rsa_core_chunked` (``backend="auto"``, the default) -- reorders the sums as
  ``O[u, h] = Σ_v Γ[v, u] A[h, v]`` with ``A[h, v] = Σ_j κ[h, j] E[v, j]`` (no F), works on
  slices of samples / channels so only one slice of R, E, Γ exists at a time, keeps only
  q̂, k̂, v̂ and κ for backward, and recomputes a slice's R, E, Γ there (custom backward).
  It also routes each convolution to the fastest CPU primitive for its direction (see
  :class:`_RSAChunkedFunction`). ``benchmarks/rsa.py`` measures both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.errors import ConfigError, InputError, InputTypeError
from zoo.ops.backend import PURE_TORCH, check_backend, from_deprecated, resolve

__all__ = ["RSA", "RSADims", "rsa_core_reference", "rsa_core_chunked"]

_TYPES = ("V", "R", "VplusR")
_EPS = 1e-6  # inside the square root of the L2 norms (pitfall §5.3)


@dataclass(frozen=True)
class RSADims:
    """The derived sizes of one RSA layer (spec §1.1) and its kernel/feature types."""

    nh: int
    dk: int
    dv: int
    dd: int
    kernel_size: Tuple[int, int, int]
    kernel_type: str
    feat_type: str

    @property
    def padding(self) -> Tuple[int, int, int]:
        return tuple(k // 2 for k in self.kernel_size)  # type: ignore[return-value]

    @property
    def relational_kernel(self) -> bool:
        return self.kernel_type != "V"

    @property
    def relational_context(self) -> bool:
        return self.feat_type != "V"


def _l2norm(z: Tensor, dim: int) -> Tensor:
    """z / sqrt(Σ z² + 1e-6) over ``dim`` (eps inside the root, as the original)."""
    return z / torch.sqrt(z.pow(2).sum(dim, keepdim=True) + _EPS)


# ---------------------------------------------------------------------------------------------
# Reference formulation (the original's order of operations; the definition)
# ---------------------------------------------------------------------------------------------

def rsa_core_reference(q: Tensor, k: Optional[Tensor], v: Tensor, H1: Optional[Tensor], H2: Tensor,
                       G: Optional[Tensor], P1: Optional[Tensor], I: Optional[Tensor], dims: RSADims) -> Tensor:
    """Steps 3-5 exactly as the original orders them (everything materialised, autograd keeps it).

    Args:
        q: (N, nh, dk, T, H, W) normalised queries. k: (N, dk, T, H, W) normalised keys or None
        ('V' kernel). v: (N, dv, T, H, W) normalised values.
        H1: (dk*dd, 1, kT, kH, kW) or None; H2: (dd, 1, kT, kH, kW); G: (dv, 1, kT, kH, kW) or None;
        P1: (1, dk, dd) or None; I: (1, dv, dv) or None.

    Returns:
        (N, dv * nh, T, H, W), channel ``u * nh + h``.
    """
    N, nh, dk = q.shape[:3]
    T, H, W = v.shape[-3:]
    dv, dd, pad = dims.dv, dims.dd, dims.padding
    # Position-major layout "(n t h w) . .", as the original's rearranges.
    q_pm = q.permute(0, 3, 4, 5, 1, 2).reshape(-1, nh, dk)  # (NP, nh, dk)
    if dims.relational_kernel:
        r = F.conv3d(k, H1, padding=pad, groups=dk)  # (N, dk*dd, T, H, W), channel c*dd + j
        r = r.permute(0, 2, 3, 4, 1).reshape(-1, dk, dd)  # (NP, dk, dd)
        if P1 is not None:
            r = r + P1
        kernel = torch.bmm(q_pm, r)  # (NP, nh, dd)
    else:
        kernel = q_pm  # dd == dk
    v_img = v.reshape(N * dv, 1, T, H, W)  # every value channel is its own one-channel image
    e = F.conv3d(v_img, H2, padding=pad).reshape(N, dv, dd, T, H, W)
    feature = e.permute(0, 3, 4, 5, 1, 2).reshape(-1, dv, dd)  # (NP, dv, dd)
    if dims.relational_context:
        gam = F.conv3d(v_img, G, padding=pad).reshape(N, dv, dv, T, H, W)
        gam = gam.permute(0, 3, 4, 5, 1, 2).reshape(-1, dv, dv)  # (NP, v, u)
        if I is not None:
            gam = gam + I
        feature = torch.bmm(gam.transpose(1, 2), feature)  # (NP, u, dd)
    out = torch.bmm(feature, kernel.transpose(1, 2))  # (NP, u, nh)
    # contiguous, as the chunked path's: a channels-last-strided output would make the next 3-D convolutions
    # channels-last on the CPU but not in torch.export's fake tensors, and the exported views would not fit
    return out.reshape(N, T, H, W, dv * nh).permute(0, 4, 1, 2, 3).contiguous()


# ---------------------------------------------------------------------------------------------
# Memory-efficient formulation
# ---------------------------------------------------------------------------------------------

def _slices(total: int, step: int) -> Iterator[slice]:
    for start in range(0, total, step):
        yield slice(start, min(start + step, total))


def _chunk_sizes(dims: RSADims, n: int, positions: int, budget: int) -> Tuple[int, int, int]:
    """(samples per slice, value channels per slice, key channels per slice).

    The biggest per-slice tensors are the context convolution's output (values x (dd [+ dv]))
    and the kernel convolution's output (keys x dd); a slice keeps each under ``budget``
    elements where possible. Whole samples are preferred (the convolutions run fastest on
    full channel sets); channels are split only when one sample alone is too big.
    """
    m = dims.dd + (dims.dv if dims.relational_context else 0)
    per_sample = positions * max(dims.dv * m, dims.dk * dims.dd)
    if per_sample <= budget:
        return max(1, min(n, budget // per_sample)), dims.dv, dims.dk
    vc = max(1, min(dims.dv, budget // (positions * m)))
    kc = max(1, min(dims.dk, budget // (positions * dims.dd)))
    return 1, vc, kc


def _chunked_forward(q, k, v, H1, H2, G, P1, I, dims: RSADims, budget: int,
                     keep_kappa: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """Output (N, dv * nh, T, H, W) slice by slice, and κ (N, nh, dd, P) if ``keep_kappa``."""
    N = q.shape[0]
    T, H, W = v.shape[-3:]
    P = T * H * W
    ns, vc, kc = _chunk_sizes(dims, N, P, budget)
    w_ctx = H2 if G is None else torch.cat([H2, G], 0)  # (m, 1, kT, kH, kW), E channels first
    out = q.new_empty(N, dims.dv, dims.nh, P)
    kappa = q.new_empty(N, dims.nh, dims.dd, P) if keep_kappa else None
    for sn in _slices(N, ns):
        kap = _kernel_forward(q[sn], None if k is None else k[sn], H1, P1, dims, kc)
        if kappa is not None:
            kappa[sn] = kap
        out[sn] = _context_forward(kap, v[sn], w_ctx, I, dims, vc)
    return out.view(N, dims.dv * dims.nh, T, H, W), kappa


class _RSAChunkedFunction(torch.autograd.Function):
    """Steps 3-5 slice by slice with a hand-written backward that recomputes R, E, Γ per slice.

    Saved for backward: q̂, k̂, v̂ and κ (together about the size of the layer's input and
    output); the original keeps R, E, Γ, F and their position-major copies instead.

    Which convolution primitive for which direction (CPU, oneDNN; measured at the released
    sizes): the context convs (one input channel, dd + dv outputs, all value channels folded
    into the batch) are fastest in that folded form FORWARD, but their input-gradient is
    several times faster in the equivalent grouped form (value channels as groups, the
    filter bank repeated per group); H1 is grouped in both directions.
    """

    @staticmethod
    def forward(ctx, q, k, v, H1, H2, G, P1, I, dims: RSADims, budget: int):
        keep = dims.relational_kernel and any(ctx.needs_input_grad)  # κ is kept for backward only
        out, kappa = _chunked_forward(q, k, v, H1, H2, G, P1, I, dims, budget, keep_kappa=keep)
        ctx.dims, ctx.budget = dims, budget
        ctx.has_g = G is not None
        ctx.save_for_backward(q, k, v, H1, H2, G, P1, I, kappa)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, H1, H2, G, P1, I, kappa = ctx.saved_tensors
        dims: RSADims = ctx.dims
        N = q.shape[0]
        T, H, W = v.shape[-3:]
        P = T * H * W
        ns, vc, kc = _chunk_sizes(dims, N, P, ctx.budget)
        grad_out = grad_out.reshape(N, dims.dv, dims.nh, P)
        w_ctx = H2 if G is None else torch.cat([H2, G], 0)
        dq = torch.empty_like(q)
        dk = None if k is None else torch.empty_like(k)
        dv = torch.empty_like(v)
        dw_ctx = torch.zeros_like(w_ctx)
        dH1 = None if H1 is None else torch.zeros_like(H1)
        dP1 = None if P1 is None else torch.zeros_like(P1)
        dI = None if I is None else torch.zeros_like(I)
        for sn in _slices(N, ns):
            kap = kappa[sn] if kappa is not None else q[sn].reshape(-1, dims.nh, dims.dd, P)
            dkap = _context_backward(kap, v[sn], w_ctx, I, grad_out[sn], dims, vc, dv[sn], dw_ctx, dI)
            if dims.relational_kernel:
                _kernel_backward(q[sn], k[sn], H1, P1, dkap, dims, kc, dq[sn], dk[sn], dH1, dP1)
            else:
                dq[sn] = dkap.view_as(dq[sn])
        dH2 = dw_ctx[: dims.dd]
        dG = dw_ctx[dims.dd:] if ctx.has_g else None
        return dq, dk, dv, dH1, dH2, dG, dP1, dI, None, None


# The per-position contractions below run over the small channel axes (8-64 long) with P (all
# positions) as the innermost, contiguous axis. They are written as short loops of in-place
# ``addcmul_`` on channel-major tensors, which is about twice as fast on CPU as moving every
# tensor to position-major layout for ``bmm`` and back, and needs no extra memory.

def _kernel_forward(q: Tensor, k: Optional[Tensor], H1: Optional[Tensor], P1: Optional[Tensor],
                    dims: RSADims, kc: int) -> Tensor:
    """κ (n, nh, dd, P) of one sample slice; q (n, nh, dk, T, H, W), k (n, dk, T, H, W)."""
    n, nh, dk = q.shape[:3]
    q = q.reshape(n, nh, dk, -1)
    if not dims.relational_kernel:
        return q  # 'V': the normalised query is the kernel (dd == dk)
    kappa = q.new_zeros(n, nh, dims.dd, q.shape[-1])
    for sc in _slices(dk, kc):
        r = _relational_kernel(k[:, sc], H1, P1, sc, dims)  # (n, c, dd, P)
        for i, c in enumerate(range(sc.start, sc.stop)):  # κ[h, j] += q[h, c] R[c, j]
            kappa.addcmul_(q[:, :, c, None], r[:, None, i])
        del r
    return kappa


def _relational_kernel(k: Tensor, H1: Tensor, P1: Optional[Tensor], sc: slice, dims: RSADims) -> Tensor:
    """R[c, j] (+ P1[c, j]) for the key channels ``sc``: (n, c, dd, P)."""
    n, c = k.shape[:2]
    dd = dims.dd
    r = F.conv3d(k, H1[sc.start * dd: sc.stop * dd], padding=dims.padding, groups=c).view(n, c, dd, -1)
    if P1 is not None:
        r += P1[0, sc, :, None]
    return r


def _context(v: Tensor, w_ctx: Tensor, I: Optional[Tensor], sv: slice, dims: RSADims) -> Tensor:
    """[E | Γ (+ I)] of the value channels ``sv``: (n, c, dd [+ dv], P), E channels first.

    One folded convolution: every value channel is a one-channel image, filtered by H2 and G
    stacked (``w_ctx``), which is the fastest forward form on CPU.
    """
    n, c = v.shape[:2]
    y = F.conv3d(v.reshape(n * c, 1, *v.shape[2:]), w_ctx, padding=dims.padding).view(n, c, w_ctx.shape[0], -1)
    if I is not None:
        y[:, :, dims.dd:] += I[0, sv, :, None]
    return y


def _mix_kernel(kappa: Tensor, e: Tensor) -> Tensor:
    """A[h, v] = Σ_j κ[h, j] E[v, j]: κ (n, nh, dd, P), E (n, c, dd, P) -> (n, nh, c, P)."""
    a = kappa.new_zeros(kappa.shape[0], kappa.shape[1], e.shape[1], kappa.shape[-1])
    for j in range(kappa.shape[2]):
        a.addcmul_(kappa[:, :, j, None], e[:, None, :, j])
    return a


def _context_forward(kappa: Tensor, v: Tensor, w_ctx: Tensor, I: Optional[Tensor], dims: RSADims,
                     vc: int) -> Tensor:
    """O (n, dv, nh, P) = Σ_v Γ[v, u] A[h, v] ('V' context: O[u, h] = A[h, u])."""
    n, dd = v.shape[0], dims.dd
    out = kappa.new_zeros(n, dims.dv, dims.nh, kappa.shape[-1])
    for sv in _slices(dims.dv, vc):
        y = _context(v[:, sv], w_ctx, I, sv, dims)
        a = _mix_kernel(kappa, y[:, :, :dd])  # (n, nh, c, P)
        if dims.relational_context:
            for i in range(a.shape[2]):  # O[u, h] += Γ[v, u] A[h, v]
                out.addcmul_(y[:, i, dd:, None], a[:, None, :, i])
        else:
            out[:, sv] = a.transpose(1, 2)
        del y, a
    return out


def _context_backward(kappa: Tensor, v: Tensor, w_ctx: Tensor, I: Optional[Tensor], grad_out: Tensor,
                      dims: RSADims, vc: int, dv_out: Tensor, dw_ctx: Tensor, dI: Optional[Tensor]) -> Tensor:
    """Gradients of one sample slice's context part; returns dκ (n, nh, dd, P).

    Writes dv̂ into ``dv_out`` and accumulates the filter-bank / I gradients in place. The
    recomputed conv output [E | Γ] is overwritten by its own gradient [dE | dΓ] once E and Γ
    have been used, so a slice holds one such tensor at a time.
    """
    dkappa = torch.zeros_like(kappa)
    m, dd, nh = w_ctx.shape[0], dims.dd, dims.nh
    for sv in _slices(dims.dv, vc):
        vs = v[:, sv]
        n, c = vs.shape[:2]
        y = _context(vs, w_ctx, I, sv, dims)
        e, gam = y[:, :, :dd], y[:, :, dd:]
        if dims.relational_context:
            a = _mix_kernel(kappa, e)
            da = kappa.new_zeros(n, nh, c, kappa.shape[-1])
            for u in range(dims.dv):  # dA[h, v] = Σ_u Γ[v, u] dO[u, h]
                da.addcmul_(gam[:, None, :, u], grad_out[:, u, :, None])
        else:
            a, da = None, grad_out[:, sv].transpose(1, 2)  # (n, nh, c, P)
        for i in range(c):  # dκ[h, j] += dA[h, v] E[v, j]
            dkappa.addcmul_(da[:, :, i, None], e[:, None, i])
        y.zero_()  # E and Γ are used up: y now accumulates [dE | dΓ]
        for h in range(nh):
            e.addcmul_(da[:, h, :, None], kappa[:, None, h])  # dE[v, j] = Σ_h dA[h, v] κ[h, j]
            if a is not None:
                gam.addcmul_(a[:, h, :, None], grad_out[:, None, :, h])  # dΓ[v, u] = Σ_h A[h, v] dO[u, h]
        if dI is not None:
            dI[0, sv] += gam.sum((0, 3))
        del a, da, e, gam
        # Grouped form (groups = value channels, filter bank repeated per group) for the conv
        # backward: the same maths as the folded conv, a much faster input gradient on CPU.
        dvs, dw = torch.ops.aten.convolution_backward(
            y.view(n, c * m, *vs.shape[2:]), vs, w_ctx.repeat(c, 1, 1, 1, 1), None,
            (1, 1, 1), dims.padding, (1, 1, 1), False, (0, 0, 0), c, (True, True, False))[:2]
        del y
        dv_out[:, sv] = dvs
        dw_ctx += dw.view(c, m, *dw.shape[1:]).sum(0)
    return dkappa


def _kernel_backward(q: Tensor, k: Tensor, H1: Tensor, P1: Optional[Tensor], dkappa: Tensor, dims: RSADims,
                     kc: int, dq_out: Tensor, dk_out: Tensor, dH1: Tensor, dP1: Optional[Tensor]) -> None:
    """Gradients of one sample slice's relational kernel (recomputing R per key-channel slice)."""
    n, nh, dk = q.shape[:3]
    P = dkappa.shape[-1]
    dd = dims.dd
    qf = q.reshape(n, nh, dk, P)
    dqf = dq_out.view(n, nh, dk, P)
    for sc in _slices(dk, kc):
        ks = k[:, sc]
        c = ks.shape[1]
        r = _relational_kernel(ks, H1, P1, sc, dims)  # (n, c, dd, P)
        dqs = dqf[:, :, sc]
        dqs.zero_()
        for j in range(dd):  # dq[h, c] = Σ_j dκ[h, j] R[c, j]
            dqs.addcmul_(dkappa[:, :, j, None], r[:, None, :, j])
        dr = r.zero_()  # R is used up: reuse its memory for dR[c, j] = Σ_h q[h, c] dκ[h, j]
        for h in range(nh):
            dr.addcmul_(qf[:, h, sc, None], dkappa[:, None, h])
        if dP1 is not None:
            dP1[0, sc] += dr.sum((0, 3))
        wsl = slice(sc.start * dd, sc.stop * dd)
        dks, dw = torch.ops.aten.convolution_backward(
            dr.view(n, c * dd, *ks.shape[2:]), ks, H1[wsl], None,
            (1, 1, 1), dims.padding, (1, 1, 1), False, (0, 0, 0), c, (True, True, False))[:2]
        del r, dr
        dk_out[:, sc] = dks
        dH1[wsl] += dw


def rsa_core_chunked(q: Tensor, k: Optional[Tensor], v: Tensor, H1: Optional[Tensor], H2: Tensor,
                     G: Optional[Tensor], P1: Optional[Tensor], I: Optional[Tensor], dims: RSADims,
                     budget: int = 1 << 23) -> Tensor:
    """Same arguments and result as :func:`rsa_core_reference`, computed slice by slice.

    ``budget``: elements allowed for the biggest per-slice intermediate (default 8 M floats,
    32 MB; one sample of any released RSANet stage at 16 frames fits in one slice).
    """
    return _RSAChunkedFunction.apply(q.contiguous(), None if k is None else k.contiguous(), v.contiguous(),
                                     H1, H2, G, P1, I, dims, int(budget))


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------

class RSA(nn.Module):
    """Relational self-attention over a (kT, kH, kW) spatio-temporal neighbourhood.

    Args (the original's, spec §1.1): ``d_in`` input channels; ``d_out`` output channels (used
    only to derive ``dv``); ``nh`` query heads; ``dk`` query/key channels per head (0: = dv);
    ``dv`` value channels (0: d_out // nh); ``dd`` basis filters of the dynamic kernel (0: = dk);
    ``kernel_size`` (kT, kH, kW) -- the class default (3, 7, 7), the released network uses
    (5, 7, 7); ``stride``: any entry > 1 adds a 3x3 average pool with spatial stride 2;
    ``kernel_type`` and ``feat_type``: 'V', 'R' or 'VplusR'.

    Extra keyword-only args: ``backend`` ``"auto"`` (default: the chunked, memory-efficient
    formulation) or ``"reference"`` (the original's formulation); ``impl`` its deprecated spelling
    (``'chunked'`` = ``"auto"``, ``'reference'``); ``chunk_budget`` elements per slice of the chunked path.

    Constraints the original needs but does not check (checked here): kernel_type 'V' needs
    dd == dk; feat_type 'VplusR' needs dv == dk.

    Input (N, d_in, T, H, W) -> output (N, nh * dv, T, H', W') with H' = H (or ceil(H / 2) when
    strided); channel ``u * nh + h`` for value channel u and head h.
    """

    def __init__(self, d_in: int, d_out: int, nh: int = 1, dk: int = 16, dv: int = 0, dd: int = 0,
                 kernel_size: Sequence[int] = (3, 7, 7), stride: Sequence[int] = (1, 1, 1),
                 kernel_type: str = "V", feat_type: str = "V", *, backend: str = "auto",
                 impl: Optional[str] = None, chunk_budget: int = 1 << 23):
        super().__init__()
        if kernel_type not in _TYPES:
            raise ConfigError(f"RSA: kernel_type must be one of {_TYPES}, got {kernel_type!r}")
        if feat_type not in _TYPES:
            raise ConfigError(f"RSA: feat_type must be one of {_TYPES}, got {feat_type!r}")
        backend = from_deprecated("RSA", "impl", impl, {"chunked": "auto", "reference": "reference"},
                                  check_backend(backend, PURE_TORCH, "RSA backend"))
        kernel_size = tuple(int(s) for s in kernel_size)
        if len(kernel_size) != 3 or any(s < 1 for s in kernel_size):
            raise ConfigError(f"RSA: kernel_size must be three positive ints (kT, kH, kW), got {kernel_size}")
        if nh < 1 or d_in < 1:
            raise ConfigError(f"RSA: d_in and nh must be positive, got d_in={d_in}, nh={nh}")
        # Derivation order matters (spec §1.1): dv, then dk, then dd.
        dv = d_out // nh if dv == 0 else dv
        dk = dv if dk == 0 else dk
        dd = dk if dd == 0 else dd
        if min(dv, dk, dd) < 1:
            raise ConfigError(f"RSA: derived sizes must be positive, got dv={dv}, dk={dk}, dd={dd}")
        if kernel_type == "V" and dd != dk:
            raise ConfigError(f"RSA: kernel_type 'V' uses the query as the kernel, so dd must equal dk; got dd={dd}, dk={dk}")
        if feat_type == "VplusR" and dv != dk:
            raise ConfigError(f"RSA: feat_type 'VplusR' adds a dk x dk identity to a dv x dv matrix, so dv must equal dk; got dv={dv}, dk={dk}")
        self.d_in, self.d_out, self.nh = d_in, d_out, nh
        self.dv, self.dk, self.dd = dv, dk, dd
        self.kernel_size = kernel_size
        self.stride = tuple(stride)
        self.kernel_type, self.feat_type = kernel_type, feat_type
        self.ksize = math.prod(kernel_size)
        self.pad = tuple(s // 2 for s in kernel_size)
        self.backend, self.chunk_budget = backend, int(chunk_budget)
        self.dims = RSADims(nh, dk, dv, dd, kernel_size, kernel_type, feat_type)

        d_hid = nh * dk + dv if kernel_type == "V" else nh * dk + dk + dv
        # Own parameters first: they precede the children in the state_dict, as in the original.
        if kernel_type == "VplusR":
            self.P1 = nn.Parameter(torch.randn(1, dk, dd) * math.sqrt(1.0 / (self.ksize * dd)))
        if feat_type == "VplusR":
            self.I = nn.Parameter(torch.eye(dk).unsqueeze(0))
        self.projection = nn.Conv3d(d_in, d_hid, 1, bias=False)
        if kernel_type != "V":
            self.H1 = nn.Conv3d(dk, dk * dd, kernel_size, padding=self.pad, groups=dk, bias=False)
        self.H2 = nn.Conv3d(1, dd, kernel_size, padding=self.pad, bias=False)
        if feat_type != "V":
            self.G = nn.Conv3d(1, dv, kernel_size, padding=self.pad, bias=False)
        if max(self.stride) > 1:
            self.avgpool = nn.AvgPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, nh={self.nh}, dk={self.dk}, dv={self.dv}, dd={self.dd}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, kernel_type={self.kernel_type!r}, "
                f"feat_type={self.feat_type!r}, backend={self.backend!r}")

    def forward(self, x: Tensor) -> Tensor:
        """x (N, d_in, T, H, W) -> (N, nh * dv, T, H', W')."""
        if x.dim() != 5 or x.shape[1] != self.d_in:
            raise InputError(f"RSA expects input (N, {self.d_in}, T, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise InputTypeError(f"RSA expects a floating-point input, got {x.dtype}")
        N, _, T, H, W = x.shape
        nh, dk, dv = self.nh, self.dk, self.dv
        z = self.projection(x)
        if self.kernel_type == "V":
            q, v = torch.split(z, [nh * dk, dv], dim=1)
            k = None
        else:
            q, k, v = torch.split(z, [nh * dk, dk, dv], dim=1)
            k = _l2norm(k, 1)
        q = _l2norm(q.reshape(N, nh, dk, T, H, W), 2)
        v = _l2norm(v, 1)
        params = (self.H1.weight if hasattr(self, "H1") else None, self.H2.weight,
                  self.G.weight if hasattr(self, "G") else None,
                  getattr(self, "P1", None), getattr(self, "I", None))
        # torch.export: the reference formulation, whose ops do not depend on the batch size (the chunked
        # one slices the batch by a budget, which would fix the exported batch size)
        if resolve(self.backend, PURE_TORCH, "RSA backend") == "reference" or torch.compiler.is_exporting():
            out = rsa_core_reference(q, k, v, *params, self.dims)
        else:
            out = rsa_core_chunked(q, k, v, *params, self.dims, budget=self.chunk_budget)
        if max(self.stride) > 1:
            # self.avgpool's (1, 3, 3) window frame by frame as a 2-D pool: the same numbers, and CPU has a
            # bfloat16 / float16 kernel for avg_pool2d, not for avg_pool3d
            pool = self.avgpool
            n, c, t = out.shape[:3]
            out = F.avg_pool2d(out.flatten(1, 2), pool.kernel_size[1:], pool.stride[1:], pool.padding[1:],
                               pool.ceil_mode, pool.count_include_pad, pool.divisor_override)
            out = out.view(n, c, t, *out.shape[-2:])
        return out
