"""Shared helpers: random inputs (never zeros), error measures, tolerances."""

from __future__ import annotations

import dataclasses
import sys
import types
import zlib

import numpy as np
import pytest

from npsparseattn import _backend_table
from npsparseattn.distributed.base import Communicator, check_reduce

# Relative error bounds against the float64 reference (DESIGN.md section 8).
TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}


def rel_err(actual, expected, floor: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, floor), in float64.

    ``floor`` guards quantities that are exactly zero in exact arithmetic
    (e.g. dq when every query sees one key), where only rounding noise is left;
    inputs are unit-variance, so 1.0 is their natural scale.
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    if e.size == 0:
        return 0.0
    scale = max(float(np.abs(e).max()), floor, 1e-300)
    return float(np.abs(a - e).max()) / scale


def random_array(rng: np.random.Generator, shape, dtype=np.float64) -> np.ndarray:
    """Standard-normal entries; a fresh draw per call, never zeros."""
    return rng.standard_normal(shape).astype(dtype)


def random_qkv(rng, *, batch=(), hq=2, hk=None, lq=33, lk=None, d=16, dv=None, dtype=np.float64):
    """q (*batch, hq, lq, d), k (*batch, hk, lk, d), v (*batch, hk, lk, dv)."""
    hk = hq if hk is None else hk
    lk = lq if lk is None else lk
    dv = d if dv is None else dv
    batch = tuple(batch)
    return (
        random_array(rng, (*batch, hq, lq, d), dtype),
        random_array(rng, (*batch, hk, lk, d), dtype),
        random_array(rng, (*batch, hk, lk, dv), dtype),
    )


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's name: fresh data per test, reproducible runs."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


class FakeCupyArray:
    """Stands in for ``cupy.ndarray`` so GPU-array handling can be tested without CuPy."""

    def __init__(self, x: np.ndarray):
        self._x = x
        self.shape, self.dtype, self.ndim = x.shape, x.dtype, x.ndim

    def reshape(self, shape):
        return FakeCupyArray(self._x.reshape(shape))

    def __getitem__(self, item):
        return FakeCupyArray(self._x[item])


class SoloComm(Communicator):
    """A ring of one: the argument agreement and the single-step schedule without MPI."""

    rank, size, timeout, kinds = 0, 1, 1.0, ("numpy",)

    def shift(self, send, recv, *, tag=0):
        raise AssertionError("a ring of one never shifts")

    def allreduce(self, values, op="sum"):
        return check_reduce(values, op).copy()

    def barrier(self):
        pass


@pytest.fixture
def fake_cupy(monkeypatch):
    """A ``cupy`` module in ``sys.modules`` whose ``ndarray`` is :class:`FakeCupyArray`."""
    module = types.ModuleType("cupy")
    module.ndarray = FakeCupyArray
    monkeypatch.setitem(sys.modules, "cupy", module)
    return module


# --------------------------------------------------------------------------- the backend axis
# A test that takes ``attention_backend`` (or ``block_sparse_backend``, ``lsh_backend``, ...) runs once per
# implementation the registry lists for that operation (the reference oracle excluded: it is what the
# others are compared with).  An implementation that cannot run here is skipped with the registry's own
# reasons, so ``pytest -ra`` shows why (no CuPy, no GPU, ...).  The fixtures come from the one table of
# implementations: ``<short>_backend`` for every operation that has kernels of its own.

BACKEND_FIXTURES = {f"{op.short}_backend": op.name for op in _backend_table.OPERATIONS if op.alias_of is None}


def with_kind(problem, kind: str):
    """``problem`` as if its arrays were of ``kind`` (the registry asks only for the kind, dtype and options)."""
    if problem.kind == kind:
        return problem
    if hasattr(problem, "dense"):  # an LSHProblem keeps its arrays in an AttentionProblem
        return dataclasses.replace(problem, dense=with_kind(problem.dense, kind))
    return dataclasses.replace(problem, kind=kind)


class BackendCase:
    """One registered implementation of one operation, with the array conversions its tests need."""

    def __init__(self, op: str, name: str):
        from npsparseattn import _dispatch

        self.op, self.name = op, name
        self.impl = next(impl for impl in _dispatch.implementations(op) if impl.name == name)
        self.kind = "numpy" if "numpy" in self.impl.kinds else self.impl.kinds[0]

    def __repr__(self) -> str:
        return f"BackendCase({self.op!r}, {self.name!r})"

    @property
    def xp(self):
        """The array module this backend reads (NumPy, or CuPy for a GPU backend)."""
        if self.kind == "numpy":
            return np
        import cupy

        return cupy

    def require(self, problem) -> None:
        """Skip the test, with the registry's reasons, unless this backend can take ``problem`` here."""
        reasons = self.impl.unsupported(with_kind(problem, self.kind))
        if reasons:
            pytest.skip(f"{self.name} cannot run {self.op} here: " + "; ".join(reasons))

    def put(self, *arrays):
        """NumPy test inputs as this backend's arrays, as a tuple."""
        return tuple(a if self.kind == "numpy" else self.xp.asarray(a) for a in arrays)

    def get(self, x):
        """A result back as a NumPy array."""
        return x if isinstance(x, np.ndarray) else self.xp.asnumpy(x)

    def tolerance(self, dtype) -> float:
        """The relative error bound this backend declares for inputs of ``dtype``."""
        return self.impl.tolerance[np.dtype(dtype).name]


class AutoCase(BackendCase):
    """``backend="auto"`` on NumPy arrays, with the bounds of :data:`TOL`."""

    def __init__(self, op: str):
        self.op, self.name, self.kind = op, "auto", "numpy"

    def require(self, problem) -> None:
        """Auto on NumPy arrays always has an implementation."""

    def tolerance(self, dtype) -> float:
        return TOL[np.dtype(dtype)]


def pytest_generate_tests(metafunc):
    from npsparseattn import available_backends

    for fixture, op in BACKEND_FIXTURES.items():
        if fixture in metafunc.fixturenames:
            names = [name for name in available_backends(op) if name != "reference"]
            metafunc.parametrize(fixture, [BackendCase(op, name) for name in names], ids=names)
