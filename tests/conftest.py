"""Shared helpers: random inputs (never zeros), error measures, tolerances."""

from __future__ import annotations

import sys
import types
import zlib

import numpy as np
import pytest

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


@pytest.fixture
def fake_cupy(monkeypatch):
    """A ``cupy`` module in ``sys.modules`` whose ``ndarray`` is :class:`FakeCupyArray`."""
    module = types.ModuleType("cupy")
    module.ndarray = FakeCupyArray
    monkeypatch.setitem(sys.modules, "cupy", module)
    return module
