"""What the benchmark modules share: sizes, backends, arrays, stream sync, rates.

Backends are a benchmark parameter, asked from the registry
(:func:`backends`: every implementation of the operation but the float64
reference).  A backend that cannot run here makes ``setup`` raise
``SkipNotImplemented`` with the registry's own reasons, which asv reports as
a skipped benchmark (SciPy's ``XPBenchmark`` pattern).  GPU work is synchronised inside the timed call,
and ``setup`` runs every kernel once so that numba compilation (or loading
its cache) is never timed.

``NPSPARSEATTN_ASV_QUICK=1`` shrinks every parameter grid to one small size
for the CI smoke run (``make asv-smoke``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from asv_runner.benchmarks.mark import SkipNotImplemented

import npsparseattn as nsa
from npsparseattn import _dispatch
from npsparseattn.bench.common import BACKWARD_FLOP_RATIO, best_time
from npsparseattn.problems import attention_problem, sparse_problem

QUICK = os.environ.get("NPSPARSEATTN_ASV_QUICK", "0") not in ("", "0")
MATMUL_SIZE = 512 if QUICK else 2048


def backends(op: str) -> list[str]:
    """The registered implementations of ``op``, the float64 reference excepted."""
    return [name for name in nsa.available_backends(op) if name != "reference"]


def sizes(full: list, quick: list) -> list:
    """``quick`` under ``NPSPARSEATTN_ASV_QUICK=1``, else ``full``."""
    return quick if QUICK else full


def _implementation(op: str, name: str) -> _dispatch.Implementation:
    return next(impl for impl in _dispatch.implementations(op) if impl.name == name)


def unavailable(backend: str, op: str) -> list[str]:
    """Why ``backend`` cannot run ``op`` on this machine (empty: it can): the registry's reasons.

    Asked for a small problem in :func:`benchmark_dtype` on the array kind the backend reads.
    """
    if backend not in nsa.available_backends(op):
        return [f"npsparseattn has no {backend} implementation of {op}"]
    impl = _implementation(op, backend)
    return _reasons(impl, benchmark_dtype(impl))


def _reasons(impl: _dispatch.Implementation, dtype: str) -> list[str]:
    """The registry's reasons against a small (1, 1, 16, 64) problem of ``dtype`` on the backend's array kind (for
    index-driven sparse attention: one 16 x 16 block selected)."""
    x = np.ones((1, 1, 16, 64), dtype)
    dense = dataclasses.replace(attention_problem(x, x, x), kind=_kind(impl))
    if impl.row.op != "sparse_attention":
        return impl.unsupported(dense)
    sparse = sparse_problem(x, x, x, np.zeros((1, 1, 1, 1), np.int32), q_block=16, kv_block=16)
    return impl.unsupported(dataclasses.replace(sparse, dense=dense))


def benchmark_dtype(impl: _dispatch.Implementation) -> str:
    """float32, or float16 for a backend that refuses float32 (the tensor-core ``cupy``: half precision only)."""
    return "float32" if len(_reasons(impl, "float32")) <= len(_reasons(impl, "float16")) else "float16"


def _kind(impl: _dispatch.Implementation) -> str:
    return "numpy" if "numpy" in impl.kinds else impl.kinds[0]


class Backend:
    """Arrays and synchronisation for one backend; skips the benchmark if it cannot run.

    ``op`` is the registered operation whose kernels the benchmark runs;
    ``label`` names the benchmarked function in the skip message (default ``op``).
    """

    def __init__(self, name: str, op: str, label: str | None = None) -> None:
        reasons = unavailable(name, op)
        if reasons:
            raise SkipNotImplemented(f"{label or op} on {name}: " + "; ".join(reasons))
        self.name = name
        self.dtype = benchmark_dtype(_implementation(op, name))
        self.gpu = _kind(_implementation(op, name)) == "cupy"
        if self.gpu:
            import cupy

            self.xp = cupy
        else:
            self.xp = np

    def random(self, rng: np.random.Generator, shape: tuple[int, ...], dtype: str | None = None) -> Any:
        """Standard-normal array on this backend's device, in :attr:`dtype` unless told otherwise."""
        return self.xp.asarray(rng.standard_normal(shape).astype(dtype or self.dtype))

    def sync(self) -> None:
        """Wait for queued GPU work (no-op on the CPU)."""
        if self.gpu:
            self.xp.cuda.get_current_stream().synchronize()

    def timed(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` followed by a stream synchronisation: what a benchmark may time."""

        def call():
            result = fn()
            self.sync()
            return result

        return call

    def matmul_gflops(self, dtype: str | None = None, size: int = MATMUL_SIZE) -> float:
        """GFLOP/s of a square matrix product on this backend's device in :attr:`dtype`, measured now."""
        rng = np.random.default_rng(0)
        a = self.random(rng, (size, size), dtype)
        b = self.random(rng, (size, size), dtype)
        return 2.0 * size**3 / best_time(self.timed(lambda: a @ b), repeat=3) / 1e9

    def gflops(self, fn: Callable[[], Any], flops: float) -> float:
        """GFLOP/s of ``fn`` (best of three synchronised calls)."""
        return flops / best_time(self.timed(fn), repeat=3) / 1e9


def forward_backward_suite(flops_unit: str) -> type:
    """Base class of a kernel's benchmarks: time, peak memory and rates of ``forward``/``backward``.

    A subclass's ``setup`` sets ``self.backend`` (a :class:`Backend`),
    ``self.flops`` (forward FLOPs, counted as ``flops_unit`` says) and defines
    ``forward()`` and ``backward()``.  The backward is counted as
    ``BACKWARD_FLOP_RATIO`` times the forward.  The class is made by a
    function so that asv, which collects every class in a benchmark module,
    never sees a base without ``setup``.
    """

    class ForwardBackward:
        def time_forward(self, *params):
            self.backend.timed(self.forward)()

        def time_backward(self, *params):
            self.backend.timed(self.backward)()

        def peakmem_forward(self, *params):
            self.backend.timed(self.forward)()

        def peakmem_backward(self, *params):
            self.backend.timed(self.backward)()

        def track_forward_gflops(self, *params):
            return self.backend.gflops(self.forward, self.flops)

        track_forward_gflops.unit = flops_unit

        def track_backward_gflops(self, *params):
            return self.backend.gflops(self.backward, BACKWARD_FLOP_RATIO * self.flops)

        track_backward_gflops.unit = flops_unit

        def track_forward_vs_matmul(self, *params):
            return self.backend.gflops(self.forward, self.flops) / self.backend.matmul_gflops()

        track_forward_vs_matmul.unit = "fraction of matmul GFLOP/s"

        def track_backward_vs_matmul(self, *params):
            return self.backend.gflops(self.backward, BACKWARD_FLOP_RATIO * self.flops) / self.backend.matmul_gflops()

        track_backward_vs_matmul.unit = "fraction of matmul GFLOP/s"

    return ForwardBackward
