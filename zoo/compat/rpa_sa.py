"""``rpa_sa`` (inspiros/rpa_sa) on RelZoo's layers, bug for bug.

Change one line of code written for the original::

    import rpa_sa                              ->  from zoo.compat import rpa_sa
    from rpa_sa import MultiheadNonlocal2d     ->  from zoo.compat.rpa_sa import MultiheadNonlocal2d
    torch.ops.load_library(".../_C.so")        ->  import zoo.compat.rpa_sa

Importing this module registers the original's four ops as ``torch.ops.rpa_sa.*`` with the original's
schemas (spec rpa §3), plus their ``_<op>_backward`` ops and ``_cuda_version()`` (-1: no native build),
implemented in plain tensor operations (:mod:`zoo.layers.rpa`), on CPU and GPU, with gradients. If the
original's native library is already loaded, its ops are left in place.

What differs from :class:`zoo.layers.rpa.MultiheadNonlocal2d`: ``bug_compatible`` defaults to True,
which reproduces the two behaviours trained weights depend on (spec rpa §8):

* ``relative_position`` on non-square hidden maps reads the transposed reference table the original
  builds (its scrambled layout; the maps where the original reads out of bounds, H > W, are refused);
* ``rpa_interpolation='lerp'`` in ``relative_position`` means nearest, as the original op did (its
  angle-linear method is ``'alerp'``), and ``'alerp'``/``'slerp'`` in ``relative_distance`` mean nearest.

Not reproduced, because they were crashes rather than numbers: embedding ``padding > 0`` (the original's
hidden-size sign error) works, and ``MultiheadNonlocal1d``/``3d`` work instead of raising. The ops accept
the four interpolation names the original knew (``nearest``, ``lerp``, ``alerp``, ``slerp``, each with
the original's meaning per op) and refuse other strings, which the original silently ran as nearest.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from zoo.compat._bug_compatible import bug_compatible_by_default
from zoo.layers import rpa as _rpa

__all__ = ["MultiheadNonlocal1d", "MultiheadNonlocal2d", "MultiheadNonlocal3d", "rotative_pad2d", "spherical_pad2d",
           "relative_attend_query2d", "relative_attend_weight2d"]

#: The ops are registered (by this module, or by the original's native library loaded before it).
_HAS_OPS = True


MultiheadNonlocal1d = bug_compatible_by_default(_rpa.MultiheadNonlocal1d, __name__, "rpa_sa.MultiheadNonlocal1d")
MultiheadNonlocal2d = bug_compatible_by_default(_rpa.MultiheadNonlocal2d, __name__, "rpa_sa.MultiheadNonlocal2d")
MultiheadNonlocal3d = bug_compatible_by_default(_rpa.MultiheadNonlocal3d, __name__, "rpa_sa.MultiheadNonlocal3d")


# ---------------------------------------------------------------------------------------------------
# The ops, with the original's argument names and order
# ---------------------------------------------------------------------------------------------------

def rotative_pad2d(input: torch.Tensor, pad: Sequence[int], interpolation: str) -> torch.Tensor:
    """``torch.ops.rpa_sa.rotative_pad2d``: radial profile (B, C, K) -> table (B, C, 1+up+down, 1+left+right),
    pad = (left, right, up, down); see :func:`zoo.layers.rpa.rotative_pad2d`."""
    return _rpa.rotative_pad2d(input, pad, interpolation)


def spherical_pad2d(input: torch.Tensor, pad: Sequence[int], interpolation: str) -> torch.Tensor:
    """``torch.ops.rpa_sa.spherical_pad2d``: kernel (B, C, kh, kw) -> (B, C, kh+up+down, kw+left+right),
    pad = (left, right, up, down); see :func:`zoo.layers.rpa.spherical_pad2d`."""
    return _rpa.spherical_pad2d(input, pad, interpolation)


def _is_displacement_table(affinity: torch.Tensor, height: int, width: int) -> bool:
    return affinity.dim() == 3 and tuple(affinity.shape[1:]) == (2 * height - 1, 2 * width - 1)


def relative_attend_query2d(query: torch.Tensor, affinity: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``torch.ops.rpa_sa.relative_attend_query2d``: query (B, d, H*W), affinity (d, 2H-1, 2W-1) -> (B, N, N).

    Like the original kernel, another table layout is read through its own row length (the transposed
    (d, 2W-1, 2H-1) table the original module passes on non-square maps); a read past its end is a
    ValueError, where the original returned garbage.
    """
    if _is_displacement_table(affinity, height, width):
        return _rpa.relative_attend_query2d(query, affinity, height, width)
    return _rpa.relative_attend_query_reference(query, affinity, (int(height), int(width)))


def relative_attend_weight2d(weight: torch.Tensor, affinity: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``torch.ops.rpa_sa.relative_attend_weight2d``: weight (B, N, N), affinity (d, 2H-1, 2W-1) -> (B, d, N).

    Other table layouts as :func:`relative_attend_query2d`.
    """
    if _is_displacement_table(affinity, height, width):
        return _rpa.relative_attend_weight2d(weight, affinity, height, width)
    return _rpa.relative_attend_weight_reference(weight, affinity, (int(height), int(width)))


# ---------------------------------------------------------------------------------------------------
# torch.ops.rpa_sa.*
# ---------------------------------------------------------------------------------------------------

def _vjp(fn: Callable, tensors: Sequence[torch.Tensor], others: Sequence, grad: torch.Tensor) -> tuple:
    """Gradients of ``sum(fn(*tensors, *others) * grad)`` with respect to ``tensors`` (the ``_backward`` ops)."""
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(True) for t in tensors]
        out = fn(*inputs, *others)
        return torch.autograd.grad(out, inputs, grad, allow_unused=True)


def _pad_backward(fn: Callable) -> Callable:
    def backward(grad, input, pad, interpolation):
        (grad_input,) = _vjp(fn, [input], [pad, interpolation], grad)
        return grad_input
    return backward


def _attend_backward(fn: Callable) -> Callable:
    def backward(grad, first, affinity, height, width):
        return _vjp(fn, [first, affinity], [height, width], grad)
    return backward


# name -> (schema, implementation); the schemas are the original's (rpa_sa/csrc/ops/*.cpp).
_OPS: dict[str, tuple[str, Callable]] = {
    "rotative_pad2d": ("(Tensor input, int[] pad, str interpolation) -> Tensor", rotative_pad2d),
    "spherical_pad2d": ("(Tensor input, int[] pad, str interpolation) -> Tensor", spherical_pad2d),
    "relative_attend_query2d": ("(Tensor query, Tensor affinity, int height, int width) -> Tensor",
                                relative_attend_query2d),
    "relative_attend_weight2d": ("(Tensor weight, Tensor affinity, int height, int width) -> Tensor",
                                 relative_attend_weight2d),
    "_rotative_pad2d_backward": ("(Tensor grad, Tensor input, int[] pad, str interpolation) -> Tensor",
                                 _pad_backward(rotative_pad2d)),
    "_spherical_pad2d_backward": ("(Tensor grad, Tensor input, int[] pad, str interpolation) -> Tensor",
                                  _pad_backward(spherical_pad2d)),
    "_relative_attend_query2d_backward": (
        "(Tensor grad, Tensor query, Tensor affinity, int height, int width) -> (Tensor, Tensor)",
        _attend_backward(relative_attend_query2d)),
    "_relative_attend_weight2d_backward": (
        "(Tensor grad, Tensor weight, Tensor affinity, int height, int width) -> (Tensor, Tensor)",
        _attend_backward(relative_attend_weight2d)),
    "_cuda_version": ("() -> int", lambda: -1),
}


def _registered(name: str) -> bool:
    try:
        getattr(torch.ops.rpa_sa, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _register_ops() -> torch.library.Library | None:
    """Define the missing ``rpa_sa::*`` ops; their composite kernels run the functions above, so autograd
    differentiates through them (first order, like the original). Returns the library (kept alive)."""
    missing = [name for name in _OPS if not _registered(name)]
    if not missing:
        return None
    library = torch.library.Library("rpa_sa", "FRAGMENT")
    for name in missing:
        schema, fn = _OPS[name]
        library.define(name + schema)
        library.impl(name, fn, "CompositeImplicitAutograd")
    return library


_LIBRARY = _register_ops()
