"""iRPE's index step, ``out[..., i, j] = x[..., i, index[i, j]]``: the gather of its contextual q/k terms.

Two implementations of one definition (spec irpe §3, §6):

* :func:`rpe_index_reference` -- ``torch.gather`` along the last axis; it *is* the definition.
* the native op ``torch.ops.relzoo.rpe_index`` (+ ``_backward``) (``ops/rpe_index/``, C++/OpenMP and
  CUDA): each output row owns its gradient row, so the backward needs no atomics and adds in the
  same order as the reference (bit-identical gradients in float32/float64).

:func:`rpe_index` chooses between them with the ``backend`` switch (:mod:`zoo.ops.backend`).
"""
from __future__ import annotations

import torch

from zoo.errors import InputError, InputTypeError
from zoo.ops.build import on_load, use_native

__all__ = ["rpe_index", "rpe_index_reference", "OP_NAME"]

OP_NAME = "rpe_index"
_FWD = "relzoo::rpe_index"
_BWD = "relzoo::rpe_index_backward"

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _check_args(x: torch.Tensor, index: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(index, torch.Tensor):
        raise InputTypeError(f"rpe_index expects tensors, got {type(x).__name__} and {type(index).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise InputTypeError(f"rpe_index: x must be float64, float32, bfloat16 or float16, got {x.dtype}")
    if index.dtype not in (torch.int32, torch.int64):
        raise InputTypeError(f"rpe_index: index must be int32 or int64 bucket ids, got {index.dtype}")
    if x.dim() < 2:
        raise InputError(f"rpe_index: x must have shape (..., Lq, num_buckets), got {tuple(x.shape)}")
    if index.dim() != 2:
        raise InputError(f"rpe_index: index must have shape (Lq, Lk), got {tuple(index.shape)}")
    if x.shape[-2] != index.shape[0]:
        raise InputError(f"rpe_index: x has Lq = {x.shape[-2]} rows (shape {tuple(x.shape)}) but index has "
                         f"{index.shape[0]} (shape {tuple(index.shape)})")
    if x.device != index.device:
        raise InputError(f"rpe_index: x is on {x.device} but index is on {index.device}")


def rpe_index_reference(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pure-torch definition: ``out[..., i, j] = x[..., i, index[i, j]]``.

    Args:
        x: (..., Lq, num_buckets) float, e.g. (B, H, Lq, nb) = q @ lookup table.
        index: (Lq, Lk) int32/int64 bucket ids in [0, num_buckets).
    Returns:
        (..., Lq, Lk), same dtype as ``x``.

    A ``gather`` along the last axis with the index broadcast over the leading
    axes: the same values as the original's flat gather with ``index[i, j] + i * nb``
    (spec irpe §6), but an out-of-range id is an error instead of a silent read
    from the next row. Its backward (scatter_add) adds in increasing j.
    """
    _check_args(x, index)
    return x.gather(-1, index.to(torch.int64).expand(*x.shape[:-2], *index.shape))


def rpe_index(x: torch.Tensor, index: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``out[..., i, j] = x[..., i, index[i, j]]``, the gather of iRPE's contextual q/k terms.

    Args:
        x: (..., Lq, num_buckets) float64/float32/bfloat16/float16, typically (B, H, Lq, nb).
        index: (Lq, Lk) int32 or int64 bucket ids in [0, num_buckets), same device.
        backend: one of :data:`~zoo.ops.backend.BACKENDS`. ``"auto"``: the native kernel
            (built on first use) when ``RELZOO_OPS`` allows and it exists for ``x``'s device, else
            :func:`rpe_index_reference`; ``"native"``: the kernel or an OpsError; ``"reference"``.
    Returns:
        (..., Lq, Lk) with ``x``'s dtype; differentiable in ``x`` (twice).

    Both implementations give identical values; in float32/float64 the gradients are identical
    too. Works under ``torch.compile`` and ``gradcheck``.
    """
    _check_args(x, index)
    if use_native(OP_NAME, backend, x.device.type):
        return torch.ops.relzoo.rpe_index(x, index)
    return rpe_index_reference(x, index)


@on_load(OP_NAME)
def _register_native() -> None:
    """Fake kernels (shape functions for torch.compile) and autograd for the native op."""
    @torch.library.register_fake(_FWD)
    def _(x, index):
        return x.new_empty((*x.shape[:-1], index.shape[1]))

    @torch.library.register_fake(_BWD)
    def _(grad_output, index, num_buckets):
        return grad_output.new_empty((*grad_output.shape[:-1], num_buckets))

    def setup_forward(ctx, inputs, output):
        x, index = inputs
        ctx.save_for_backward(index)
        ctx.num_buckets = x.shape[-1]

    def backward_forward(ctx, grad):
        (index,) = ctx.saved_tensors
        return torch.ops.relzoo.rpe_index_backward(grad, index, ctx.num_buckets), None

    def setup_backward(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def backward_backward(ctx, grad):
        # the backward is linear in grad_output; its adjoint is the forward gather
        (index,) = ctx.saved_tensors
        return torch.ops.relzoo.rpe_index(grad, index), None, None

    torch.library.register_autograd(_FWD, backward_forward, setup_context=setup_forward)
    torch.library.register_autograd(_BWD, backward_backward, setup_context=setup_backward)
