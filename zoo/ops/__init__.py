"""Native ops: compiled on first use, cached, safe under concurrency; each with a pure-torch reference.

Layout (NATTEN's convention: functional ops take ``backend=``, the layers in :mod:`zoo.layers` are thin)::

    zoo/ops/backend.py            the one switch: BACKENDS, RELZOO_OPS (mode), check_backend, resolve
    zoo/ops/build.py              the build machinery: recipe, compile under a lock, cache, load, use_native
    zoo/ops/rpe_index.py          iRPE's index step: rpe_index_reference, rpe_index, fake kernels, autograd
    zoo/ops/neighborhood_attn.py  SASA's neighbourhood attention: reference, dispatcher, fake kernels, autograd
    zoo/ops/relative_attn.py      fused attention with relative terms (iRPE, RPA, plain): reference, SDPA,
                                  FlexAttention and native paths, the RPA original's attend ops
    zoo/ops/onnx.py               ONNX translations of the native ops (onnxscript; the ``export`` extra),
                                  imported by zoo.export only
    ops/<name>/                   the kernel sources (C++ with OpenMP, CUDA), data, not Python

Note that ``zoo.ops.build`` and ``zoo.ops.rpe_index`` are the functions of those names; import from
the modules with ``from zoo.ops.build import ...``.

The switch (:mod:`zoo.ops.backend`). Every op and every layer with more than one implementation
takes ``backend=``: ``"auto"`` (default), ``"native"`` or ``"reference"``. ``"auto"`` means what
``RELZOO_OPS`` says, and that is ``auto`` when unset:

``RELZOO_OPS=auto`` (default)
    the fastest implementation: a native kernel when it builds (otherwise warn ONCE per op and use
    the pure-torch path), the fast pure-torch formulation of layers without a native op.
``RELZOO_OPS=native``
    a native kernel that cannot be built or loaded raises :class:`zoo.errors.OpsError`.
``RELZOO_OPS=reference``
    never compile; every op and layer runs its pure-torch reference formulation.

An explicit ``backend="native"`` or ``"reference"`` overrides ``"auto"``; a name outside
:data:`BACKENDS` (or ``RELZOO_OPS=bogus``) is a :class:`zoo.errors.ConfigError` listing the valid ones.
Attention layers and :func:`relative_attention` also take ``"sdpa"`` and ``"flex"``
(:data:`zoo.ops.backend.ATTENTION_BACKENDS`), SASA's neighbourhood attention ``"flex"``.
Build settings (``RELZOO_OPS_CUDA``, ``RELZOO_OPS_LOCK_TIMEOUT``, ``RELZOO_OPS_BUILD_TIMEOUT``,
``RELZOO_OPS_VERBOSE``, ``RELZOO_EXTENSIONS_DIR``) are listed in :data:`zoo.paths.ENVIRONMENT`.

Adding a kernel (e.g. a new attention op)::

    // ops/my_attend/my_attend.cpp  -- header-light: ATen + torch/library.h
    #define TORCH_ASSERT_ONLY_METHOD_OPERATORS
    #include <ATen/core/Tensor.h>
    #include <torch/library.h>
    TORCH_LIBRARY_FRAGMENT(relzoo, m) {          // FRAGMENT: the namespace is shared
      m.def("my_attend(Tensor q, Tensor k, int kernel_size) -> Tensor");
    }
    TORCH_LIBRARY_IMPL(relzoo, CPU, m) { m.impl("my_attend", &my_attend_cpu); }
    // ops/my_attend/my_attend_cuda.cu: TORCH_LIBRARY_IMPL(relzoo, CUDA, m) {...}

    # zoo/ops/my_attend.py
    import torch
    from zoo.ops.build import on_load, use_native

    @on_load("my_attend")                    # runs once, right after the library is loaded
    def _register():
        torch.library.register_fake("relzoo::my_attend")(lambda q, k, ks: q.new_empty(...))
        torch.library.register_autograd("relzoo::my_attend", _backward, setup_context=_setup)

    def my_attend(q, k, kernel_size, backend="auto"):
        if use_native("my_attend", backend, q.device.type):   # honours backend and RELZOO_OPS
            return torch.ops.relzoo.my_attend(q, k, kernel_size)
        return my_attend_reference(q, k, kernel_size)        # pure torch, the definition

Tests hold the native and reference paths equal (``tests/test_ops.py``, ``tests/test_sasa_op.py``).
"""
from zoo.errors import OpsError
from zoo.ops.backend import BACKENDS, check_backend, mode, resolve
from zoo.ops.build import (MANIFEST, build, cuda_toolkit_home, get_op, load, native_available, on_load,
                           use_native)
from zoo.ops.neighborhood_attn import neighborhood_attention, neighborhood_attention_reference
from zoo.ops.relative_attn import relative_attention, relative_attention_reference
from zoo.ops.rpe_index import rpe_index, rpe_index_reference
from zoo.paths import extensions_dir

__all__ = [
    "OpsError", "BACKENDS", "mode", "check_backend", "resolve", "extensions_dir", "build", "load", "get_op",
    "native_available", "use_native", "on_load", "cuda_toolkit_home", "MANIFEST", "rpe_index",
    "rpe_index_reference", "neighborhood_attention", "neighborhood_attention_reference", "relative_attention",
    "relative_attention_reference",
]
