"""Array-kind detection and the per-operation backend registry.

Every operation (``"attention"``, ``"block_sparse_attention"``, ...) keeps a
list of :class:`Implementation` objects in priority order.  An implementation
explains why it cannot take a call (:meth:`Implementation.unsupported`);
``backend="auto"`` takes the first one with no reasons, and when none fits the
error lists every implementation with its reasons (the xformers pattern).

CuPy is never imported here: an array is recognised as CuPy only if the
``cupy`` module is already in ``sys.modules`` (the array-api-compat pattern),
so ``import npsparseattn`` needs NumPy and numba only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

KNOWN_BACKENDS = ("numba", "numba-cuda", "cupy", "reference")
GPU_BACKENDS = ("numba-cuda", "cupy")


class BackendError(ValueError):
    """No implementation can take the call (or the one asked for cannot)."""


def is_cupy_array(x: Any) -> bool:
    """True for a ``cupy.ndarray``, without importing CuPy."""
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(x, cupy.ndarray)


def array_kind(x: Any, name: str) -> str:
    """``"numpy"`` or ``"cupy"``; ``TypeError`` naming ``name`` for anything else."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if is_cupy_array(x):
        return "cupy"
    raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(x).__module__}.{type(x).__qualname__}")


def common_kind(**arrays: Any) -> str:
    """The array kind shared by all ``arrays``; ``TypeError`` naming two that differ."""
    kinds = {name: array_kind(x, name) for name, x in arrays.items()}
    first_name, first_kind = next(iter(kinds.items()))
    for name, kind in kinds.items():
        if kind != first_kind:
            raise TypeError(
                f"{first_name} is a {_KIND_NAMES[first_kind]} array but {name} is a "
                f"{_KIND_NAMES[kind]} array; pass all arrays as NumPy (CPU) or all as CuPy (GPU)"
            )
    return first_kind


_KIND_NAMES = {"numpy": "NumPy", "cupy": "CuPy"}


def array_module(kind: str) -> ModuleType:
    """The array module (``numpy`` or ``cupy``) for an array kind."""
    if kind == "cupy":
        import cupy

        return cupy
    return np


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of one operation.

    Parameters
    ----------
    name : str
        Backend name, one of :data:`KNOWN_BACKENDS`.
    kinds : tuple of str
        Array kinds accepted (``"numpy"``, ``"cupy"``).
    dtypes : tuple of str
        Input dtypes accepted, by name.
    forward, backward : callable
        Called with the validated problem (and gradient inputs for backward).
    auto : bool
        Whether ``backend="auto"`` may choose it (the dense float64 reference
        may not: it is the test oracle, O(L^2) in memory).
    environment : callable, optional
        Returns a reason string when the machine lacks something (no GPU,
        package missing), else ``None``.  Called only when kind and dtype fit.
    extra : callable, optional
        Returns a list of further reasons for a given problem.
    priority : int
        Lower is tried first by ``backend="auto"`` (CPU kernels 10, CuPy 20,
        numba-cuda 30, reference 100).
    """

    name: str
    kinds: tuple[str, ...]
    dtypes: tuple[str, ...]
    forward: Callable[..., Any]
    backward: Callable[..., Any]
    auto: bool = True
    environment: Callable[[], str | None] | None = None
    extra: Callable[[Any], list[str]] | None = field(default=None)
    priority: int = 50

    def unsupported(self, problem: Any) -> list[str]:
        """Reasons this implementation cannot take ``problem`` (empty: it can)."""
        reasons = []
        if problem.kind not in self.kinds:
            wanted = " or ".join(_KIND_NAMES[k] for k in self.kinds)
            reasons.append(f"takes {wanted} arrays, got {_KIND_NAMES[problem.kind]}")
        if problem.dtype.name not in self.dtypes:
            reasons.append(f"dtype {problem.dtype.name} not supported (supports {', '.join(self.dtypes)})")
        if not reasons and self.environment is not None:
            missing = self.environment()
            if missing:
                reasons.append(missing)
        if not reasons and self.extra is not None:
            reasons.extend(self.extra(problem))
        return reasons


_REGISTRY: dict[str, list[Implementation]] = {}


def register(op: str, impl: Implementation) -> None:
    """Add ``impl`` to the implementations of ``op``, kept sorted by priority."""
    impls = _REGISTRY.setdefault(op, [])
    if any(existing.name == impl.name for existing in impls):
        raise ValueError(f"backend {impl.name!r} is already registered for {op}")
    impls.append(impl)
    impls.sort(key=lambda existing: existing.priority)


def implementations(op: str) -> list[Implementation]:
    """The registered implementations of ``op`` in priority order."""
    return list(_REGISTRY.get(op, []))


def select(op: str, problem: Any, backend: str) -> Implementation:
    """Choose the implementation of ``op`` for ``problem``.

    ``backend="auto"`` picks the first implementation with no reasons against
    it that allows auto selection; a name picks that backend or raises
    :class:`BackendError` with its reasons.
    """
    impls = implementations(op)
    if backend != "auto":
        if backend not in KNOWN_BACKENDS:
            raise BackendError(
                f"backend must be 'auto' or one of {', '.join(map(repr, KNOWN_BACKENDS))}, got {backend!r}"
            )
        for impl in impls:
            if impl.name == backend:
                reasons = impl.unsupported(problem)
                if reasons:
                    raise BackendError(f"backend {backend!r} cannot run {op}: " + "; ".join(reasons))
                return impl
        have = ", ".join(impl.name for impl in impls) or "none"
        kind = "GPU kernels" if backend in GPU_BACKENDS else "an implementation"
        raise BackendError(
            f"backend {backend!r} has no {op} in this release ({kind} for it are not built yet); "
            f"available for {op}: {have}"
        )
    lines = []
    for impl in impls:
        reasons = impl.unsupported(problem)
        if not impl.auto:
            reasons = reasons + [f"not chosen automatically (pass backend={impl.name!r} to use it)"]
        if not reasons:
            return impl
        lines.append(f"  {impl.name}: " + "; ".join(reasons))
    raise BackendError(f"no backend can run {op} for these inputs:\n" + "\n".join(lines))
