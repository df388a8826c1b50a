"""The backend registry: which module implements each operation, and how one is chosen.

The registry is a table of rows ``(operation, backend, module, priority,
auto)``.  A row names its module by import path; the module is imported the
first time the row is consulted, so ``import npsparseattn`` imports no
backend (no numba, no CuPy, no ``numba.cuda``).  The module states, next to
its kernels, what it takes and refuses (the kernel contract of
:mod:`npsparseattn.problems`); :meth:`Implementation.unsupported` turns that
into a list of reasons.  ``backend="auto"`` takes the first row, in priority
order, that allows automatic choice and has no reasons against the problem;
when none fits, the error lists every row with its reasons (the xformers
habit).  A named backend is taken or refused with its reasons.

The rows are derived from the one table of implementations,
:mod:`npsparseattn._backend_table`, which also feeds the ahead-of-time
builds, the compile checks, the tests' backend axis and the docs.
``ring_attention`` runs the ``attention`` kernels block by block, so it is an
alias of ``attention`` here.  Adding a backend is one module per operation
plus one :func:`register_backend` call (or, inside the package, one entry
per operation in the table).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cached_property
from types import ModuleType
from typing import Any

import numpy as np

from npsparseattn import _backend_table
from npsparseattn._arrays import KIND_NAMES

OPERATIONS = tuple(op.name for op in _backend_table.OPERATIONS)
ALIASES = {op.name: op.alias_of for op in _backend_table.OPERATIONS if op.alias_of}  # ring attention: block by block


class BackendError(ValueError):
    """No implementation can take the call (or the one asked for cannot)."""


@dataclass(frozen=True)
class Row:
    """One backend's implementation of one operation: the module that holds its kernels.

    ``priority``: lower is tried first by ``backend="auto"`` (CPU kernels 10,
    CuPy 20, numba-cuda 30, reference 100; :data:`npsparseattn._backend_table.BACKENDS`).
    ``auto=False``: only taken when named (the dense float64 reference is the
    test oracle, O(L^2) in memory).
    """

    op: str
    backend: str
    module: str
    priority: int
    auto: bool = True


def _row(entry: _backend_table.Entry) -> Row:
    backend = _backend_table.BACKEND_BY_NAME[entry.backend]
    return Row(entry.op, entry.backend, entry.path, backend.priority, backend.auto)


# derived from the one table of implementations (npsparseattn/_backend_table.py); register_backend appends
_TABLE: list[Row] = [_row(entry) for entry in _backend_table.ENTRIES]


class Implementation:
    """A registry row with its module, imported on first use."""

    def __init__(self, row: Row):
        self.row = row

    @property
    def name(self) -> str:
        return self.row.backend

    @property
    def auto(self) -> bool:
        return self.row.auto

    @cached_property
    def module(self) -> ModuleType:
        """The backend module (imported now if it was not yet)."""
        return importlib.import_module(self.row.module)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.module.KINDS)

    @property
    def dtypes(self) -> tuple[str, ...]:
        return tuple(self.module.DTYPES)

    @property
    def tolerance(self) -> dict[str, float]:
        return dict(self.module.TOLERANCE)

    @property
    def strided_rows(self) -> bool:
        return bool(self.module.STRIDED_ROWS)

    def compute_dtype(self, dtype: Any) -> np.dtype:
        """The dtype this backend's kernels read for inputs of ``dtype``."""
        return np.dtype(self.module.compute_dtype(dtype))

    def unsupported(self, problem: Any) -> list[str]:
        """Reasons this implementation cannot take ``problem`` (empty: it can)."""
        reasons = []
        if problem.kind not in self.kinds:
            wanted = " or ".join(KIND_NAMES[k] for k in self.kinds)
            reasons.append(f"takes {wanted} arrays, got {KIND_NAMES[problem.kind]}")
        if problem.dtype.name not in self.dtypes:
            reasons.append(f"dtype {problem.dtype.name} not supported (supports {', '.join(self.dtypes)})")
        mods = getattr(problem, "mods", None)
        if not reasons and mods is not None:
            missing = [name for name in mods.features() if name not in getattr(self.module, "SCORE_MODS", ())]
            if missing:
                reasons.append(f"does not apply {', '.join(missing)}")
        if not reasons:
            reasons.extend(self.module.unsupported(problem))
        return reasons

    def __repr__(self) -> str:
        return f"Implementation({self.row.op!r}, {self.name!r}, module={self.row.module!r})"


_LOADED: dict[Row, Implementation] = {}


ARRAY_OPERATIONS = {"merge_states": "array arithmetic that runs on NumPy and CuPy arrays as they are"}


def check_operation(op: Any) -> str:
    """``op`` is a known operation name; ``ValueError`` listing them otherwise.

    ``merge_states`` is named as what it is: a public operation with no
    backends (array arithmetic, no ``backend=`` argument).
    """
    if isinstance(op, str) and op in ARRAY_OPERATIONS:
        raise ValueError(
            f"{op} has no backends to choose from: it is {ARRAY_OPERATIONS[op]} (it takes no backend= argument); "
            f"the operations with backends are {', '.join(map(repr, OPERATIONS))}"
        )
    if not isinstance(op, str) or op not in OPERATIONS:
        raise ValueError(f"unknown operation {op!r}; the operations are {', '.join(map(repr, OPERATIONS))}")
    return op


def implementations(op: str) -> list[Implementation]:
    """The implementations of ``op`` in auto-selection order (modules not imported yet)."""
    kernel_op = ALIASES.get(check_operation(op), op)
    rows = sorted((row for row in _TABLE if row.op == kernel_op), key=lambda row: row.priority)
    return [_LOADED.setdefault(row, Implementation(row)) for row in rows]


def backend_names() -> list[str]:
    """Every backend name in the table, in first-seen priority order."""
    names: list[str] = []
    for row in sorted(_TABLE, key=lambda row: row.priority):
        if row.backend not in names:
            names.append(row.backend)
    return names


def available_backends(op: str = "attention") -> list[str]:
    """Names of the backends registered for ``op``, in auto-selection order.

    Every operation that takes ``backend=`` answers (``"ring_attention"``
    runs the ``"attention"`` kernels).  ``"merge_states"`` has no backends
    (it is array arithmetic on NumPy or CuPy arrays) and says so; an unknown
    name is a ``ValueError`` listing the operations.
    Whether one can run given inputs here: call with ``backend=<name>``; the
    :class:`BackendError` names every reason it cannot.

    >>> available_backends("attention")
    ['numba', 'cupy', 'numba-cuda', 'reference']
    """
    return [impl.name for impl in implementations(op)]


# what a backend module declares (the kernel contract of npsparseattn.problems), and its kernels per operation
CONTRACT = ("KINDS", "DTYPES", "TOLERANCE", "STRIDED_ROWS", "compute_dtype", "unsupported")
KERNELS = {op.name: op.kernels for op in _backend_table.OPERATIONS if not op.alias_of}
_REGISTERED: set[Row] = set()  # rows added by register_backend (the ones unregister_backend may remove)


def _check_module(op: str, module: Any) -> None:
    """``module`` names an importable module that declares the contract and has ``op``'s kernels."""
    if not isinstance(module, str) or not module:
        raise TypeError(f"module must be an import path such as 'mypackage.attention', got {module!r}")
    try:
        loaded = importlib.import_module(module)
    except Exception as err:  # an import error, or any error raised while the module runs
        raise ValueError(f"module {module!r} cannot be imported: {type(err).__name__}: {err}") from err
    missing = [name for name in CONTRACT + KERNELS[op] if not hasattr(loaded, name)]
    if missing:
        raise ValueError(
            f"module {module!r} does not follow the kernel contract of {op}: it lacks {', '.join(missing)} "
            f"(a backend module declares {', '.join(CONTRACT)} and the kernels {', '.join(KERNELS[op])}; "
            f"see npsparseattn.problems)"
        )
    not_callable = [
        name for name in ("compute_dtype", "unsupported", *KERNELS[op]) if not callable(getattr(loaded, name))
    ]
    if not_callable:
        raise ValueError(f"module {module!r}: {', '.join(not_callable)} must be functions")


def register_backend(op: str, backend: str, module: str, *, priority: int = 50, auto: bool = True) -> None:
    """Add the implementation of ``op`` by ``backend``, whose kernels live in ``module`` (an import path).

    The module follows the kernel contract of :mod:`npsparseattn.problems`:
    it is imported now and must declare ``KINDS``, ``DTYPES``, ``TOLERANCE``,
    ``STRIDED_ROWS``, ``compute_dtype`` and ``unsupported`` and define the
    operation's kernels (``forward`` and ``backward``; ``buckets`` for
    ``lsh_buckets``, ``sort`` for ``lsh_sort``, ``forward`` only for
    ``attention_with_kvcache``), or registration fails and nothing changes.
    ``priority`` is an int (lower is tried first by ``backend="auto"``: the
    built-in CPU kernels have 10), ``auto`` a bool.  For example,
    ``register_backend("attention", "mine", "mypackage.attention", priority=5)``
    makes ``backend="mine"`` call ``mypackage.attention.forward`` (and
    ``backward``), and ``backend="auto"`` try it first.  Each name is taken
    once per operation; :func:`unregister_backend` removes it again:

    >>> register_backend("attention", "numba", "npsparseattn.cpu.exact")
    Traceback (most recent call last):
    ValueError: backend 'numba' is already registered for attention
    """
    kernel_op = check_operation(op)
    if kernel_op in ALIASES:
        raise ValueError(f"{op} runs the {ALIASES[op]} kernels; register the backend for {ALIASES[op]!r}")
    if not isinstance(backend, str) or not backend or backend == "auto":
        raise ValueError(f"backend must be a non-empty name other than 'auto', got {backend!r}")
    if any(row.op == op and row.backend == backend for row in _TABLE):
        raise ValueError(f"backend {backend!r} is already registered for {op}")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"priority must be an int (lower is tried first; the CPU kernels have 10), got {priority!r}")
    if not isinstance(auto, bool):
        raise TypeError(f"auto must be True or False, got {auto!r}")
    _check_module(op, module)
    row = Row(op, backend, module, int(priority), auto)
    _TABLE.append(row)
    _REGISTERED.add(row)


def unregister_backend(op: str, backend: str) -> None:
    """Remove the implementation of ``op`` by ``backend`` that :func:`register_backend` added.

    Built-in backends stay (pass another ``backend=`` to avoid one); a name
    not registered for ``op`` is a ``ValueError`` listing the names that are.

    >>> unregister_backend("attention", "numba")
    Traceback (most recent call last):
    ValueError: backend 'numba' is built into npsparseattn and cannot be removed from attention
    """
    check_operation(op)
    rows = [row for row in _TABLE if row.op == op and row.backend == backend]
    if not rows:
        have = ", ".join(impl.name for impl in implementations(op))
        raise ValueError(f"backend {backend!r} is not registered for {op}; its backends: {have}")
    if rows[0] not in _REGISTERED:
        raise ValueError(f"backend {backend!r} is built into npsparseattn and cannot be removed from {op}")
    _TABLE.remove(rows[0])
    _REGISTERED.discard(rows[0])
    _LOADED.pop(rows[0], None)


def select(op: str, problem: Any, backend: str) -> Implementation:
    """Choose the implementation of ``op`` for ``problem``.

    ``backend="auto"`` picks the first implementation with no reasons against
    it that allows auto selection; a name picks that backend or raises
    :class:`BackendError` with its reasons.
    """
    impls = implementations(op)
    if backend != "auto":
        known = backend_names()
        if backend not in known:
            raise BackendError(f"backend must be 'auto' or one of {', '.join(map(repr, known))}, got {backend!r}")
        for impl in impls:
            if impl.name == backend:
                reasons = impl.unsupported(problem)
                if reasons:
                    raise BackendError(f"backend {backend!r} cannot run {op}: " + "; ".join(reasons))
                return impl
        have = ", ".join(impl.name for impl in impls)
        raise BackendError(f"backend {backend!r} has no {op}; available for {op}: {have}")
    lines = []
    for impl in impls:
        reasons = impl.unsupported(problem)
        if not impl.auto:
            reasons = reasons + [f"not chosen automatically (pass backend={impl.name!r} to use it)"]
        if not reasons:
            return impl
        lines.append(f"  {impl.name}: " + "; ".join(reasons))
    raise BackendError(f"no backend can run {op} for these inputs:\n" + "\n".join(lines))
