"""The one backend switch: which implementation of an op or a layer runs.

Every op, and every layer with more than one implementation, takes ``backend=`` with one of
:data:`BACKENDS`; a layer stores it as its ``backend`` attribute, which users may change later.

``"auto"`` (default)
    whatever ``$RELZOO_OPS`` says (:func:`mode`; ``auto`` when unset): by default the fastest
    implementation there is. A native kernel when it builds (one warning when it does not, then the
    pure-torch path), and for layers without a native op their fast pure-torch formulation.
``"native"``
    the native kernel (``ops/<name>/``, compiled on first use); one that cannot be built, or has no
    kernel for the input's device, is an :class:`~zoo.errors.OpsError` instead of a silent fallback.
``"reference"``
    the pure-torch reference formulation: readable, the definition; slow. Tests hold every other
    backend equal to it.

Attention layers (:data:`ATTENTION_BACKENDS`: iRPE's ``RPEMultiheadAttention`` and ``RPEAttention``, RPA's
``MultiheadNonlocal{1,2,3}d``, all through :func:`zoo.ops.relative_attn.relative_attention`) have two more:

``"sdpa"``
    ``torch.nn.functional.scaled_dot_product_attention``; relative terms enter as a float ``attn_mask``
    built by the fast index step (with a value term, which needs the probabilities, the scores are
    computed explicitly instead).
``"flex"``
    FlexAttention (``torch.nn.attention.flex_attention``, compiled): relative terms as a ``score_mod``
    reading the small per-bucket tables inside the kernel; no L x L bias is materialised. CUDA, or
    CPU inference (FlexAttention has no CPU backward).

and there ``"auto"`` picks per device, dtype and shape (:func:`zoo.ops.relative_attn.choose_backend`);
SASA's neighbourhood layers (:data:`NEIGHBORHOOD_BACKENDS`) have ``"flex"`` too (a 2-D block mask, CUDA).

``RELZOO_OPS`` is thus the process-wide meaning of ``"auto"``: ``RELZOO_OPS=reference`` runs every
reference formulation and never compiles; ``RELZOO_OPS=native`` makes every native op mandatory
(layers that have no native op keep their fast formulation).

A layer lists the backends it has (:data:`PURE_TORCH` when it has no native op) and calls
:func:`resolve` when it runs; an op with a native kernel calls :func:`zoo.ops.build.use_native`.
"""
from __future__ import annotations

import warnings

import torch

from zoo.errors import ConfigError
from zoo.paths import env_choice

BACKENDS = ("auto", "native", "reference")
PURE_TORCH = ("auto", "reference")  # the backends of a layer without a native op
ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "native", "reference")  # layers on zoo.ops.relative_attn
NEIGHBORHOOD_BACKENDS = ("auto", "flex", "native", "reference")        # SASA's zoo.ops.neighborhood_attention


def mode() -> str:
    """``$RELZOO_OPS``, the process default behind ``backend="auto"``: one of :data:`BACKENDS` (``auto`` when unset).

    Any other value is a :class:`~zoo.errors.ConfigError` listing the valid ones."""
    return env_choice("RELZOO_OPS", BACKENDS, "auto")


def check_backend(backend: str, supported: tuple[str, ...] = BACKENDS, what: str = "backend") -> str:
    """``backend`` if it is one of ``supported``, else a :class:`~zoo.errors.ConfigError` listing them.

    ``what`` names the argument in the message, e.g. ``"RGA_Module backend"``."""
    if not isinstance(backend, str) or backend not in supported:
        raise ConfigError(f"{what} must be one of {', '.join(map(repr, supported))}, got {backend!r}")
    return backend


# torch.compile runs this once while tracing and bakes the answer into the graph, instead of tracing
# the environment lookup; a change of RELZOO_OPS after compiling needs a recompile.
@torch.compiler.assume_constant_result
def resolve(backend: str, supported: tuple[str, ...] = BACKENDS, what: str = "backend") -> str:
    """The backend that runs: ``backend`` itself, or for ``"auto"`` the ``RELZOO_OPS`` default when
    it is one of ``supported`` (else ``"auto"``: e.g. ``RELZOO_OPS=native`` for a layer without a native op).

    For ``"auto"`` the result may still be ``"auto"``: the fastest path, native where available."""
    check_backend(backend, supported, what)
    if backend != "auto":
        return backend
    default = mode()
    return default if default in supported else "auto"


def from_deprecated(what: str, name: str, value, meaning: dict, backend: str) -> str:
    """The backend an older argument asks for (RGA's ``low_rank=``, RSA's ``impl=``), with a DeprecationWarning.

    ``value`` None (not given): ``backend``. Otherwise ``meaning[value]``, which must agree with
    ``backend`` unless that is the default ``"auto"``; the warning names the ``backend`` to pass instead.
    """
    if value is None:
        return backend
    if value not in meaning:
        raise ConfigError(f"{what}: {name} must be one of {', '.join(map(repr, meaning))}, got {value!r}")
    new = meaning[value]
    if backend not in ("auto", new):
        raise ConfigError(f"{what}: {name}={value!r} means backend={new!r}, which contradicts backend={backend!r}; "
                          f"pass backend only")
    warnings.warn(f"{what}({name}={value!r}) is deprecated: use backend={new!r}", DeprecationWarning, stacklevel=3)
    return new
