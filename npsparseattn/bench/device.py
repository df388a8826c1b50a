"""Where a benchmark runs: the backend named by ``--backend``, its arrays, its clock and its GEMM baseline.

A backend module declares the array kinds it reads (``KINDS``); the benchmark
creates its inputs as the first of them, NumPy where the backend takes NumPy
arrays (the CPU backends, and ``numba-cuda`` under ``NUMBA_ENABLE_CUDASIM=1``),
CuPy otherwise.  :meth:`Device.call` makes a timed call synchronous: GPU work
is queued asynchronously, so the current CuPy stream is synchronised inside
the call.  :meth:`Device.gemm_rate` is the same-run matrix-product baseline
on that device.  :func:`device_for` refuses, with the registry's own
:class:`~npsparseattn.BackendError` message, a backend that cannot run here,
before any array is created (creating a CuPy array without a GPU would fail
with a less useful error).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from npsparseattn import BackendError, available_backends
from npsparseattn._dispatch import implementations, select
from npsparseattn.bench.common import matmul_rate
from npsparseattn.bench.isa import describe_cpu
from npsparseattn.bench.memory import measure_peak

OPERATIONS = {"attention": "attention", "block-sparse": "block_sparse_attention", "lsh": "lsh_attention"}
DTYPES = ("float32", "float64", "float16", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser, op: str, dtypes: tuple[str, ...] = DTYPES) -> None:
    """``--backend`` (choices from the registry for ``op``) and ``--dtype``."""
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", *available_backends(op)],
        help="implementation to time (default auto: the first that fits NumPy inputs); inputs are created on its "
        "device (CuPy arrays for the GPU backends)",
    )
    parser.add_argument(
        "--dtype",
        choices=dtypes,
        default="float32",
        help="input dtype (float16/bfloat16 for the GPU backends; the numba backend reads float16 as float32)",
    )


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype named ``name``; ``bfloat16`` comes from ml_dtypes (a clear error when it is missing)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as exc:
            raise SystemExit("bfloat16 inputs need the ml_dtypes package (pip install ml_dtypes)") from exc
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _as_kind(problem: Any, kind: str) -> Any:
    """``problem`` as if its arrays were of ``kind``: the registry asks a backend about the kind, dtype and
    options only, so its reasons come without creating arrays on its device."""
    if problem.kind == kind:
        return problem
    if hasattr(problem, "dense"):  # an LSHProblem keeps its arrays in an AttentionProblem
        return dataclasses.replace(problem, dense=_as_kind(problem.dense, kind))
    return dataclasses.replace(problem, kind=kind)


def _device_kind(op: str, backend: str) -> str:
    """The array kind ``backend``'s kernels for ``op`` read: NumPy if it takes NumPy arrays, else its first kind."""
    if backend == "auto":
        return "numpy"
    for impl in implementations(op):
        if impl.name == backend:
            return "numpy" if "numpy" in impl.kinds else impl.kinds[0]
    raise BackendError(f"backend {backend!r} has no {op}; available for {op}: {', '.join(available_backends(op))}")


@dataclass(frozen=True)
class Device:
    """The backend a benchmark calls and the arrays it reads (``kind``: ``"numpy"`` or ``"cupy"``)."""

    backend: str
    kind: str

    @property
    def xp(self) -> Any:
        """The array module of the inputs."""
        if self.kind == "cupy":
            import cupy

            return cupy
        return np

    def put(self, x: np.ndarray) -> Any:
        """``x`` on this device (a CuPy copy for GPU backends, ``x`` itself otherwise)."""
        return self.xp.asarray(x) if self.kind == "cupy" else x

    def get(self, x: Any) -> np.ndarray:
        """``x`` as a NumPy array."""
        return x.get() if self.kind == "cupy" else np.asarray(x)

    def sync(self) -> None:
        """Wait for the work queued on the current CuPy stream (nothing to wait for on the CPU)."""
        if self.kind == "cupy":
            self.xp.cuda.get_current_stream().synchronize()

    def call(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` made synchronous: it returns when the device has finished the work it queued."""
        if self.kind != "cupy":
            return fn

        def synchronised() -> Any:
            result = fn()
            self.sync()
            return result

        return synchronised

    def gemm_dtype(self, dtype: Any) -> str:
        """The dtype of the baseline product: the benchmark's where the device's BLAS has it, else float32.

        NumPy on the CPU: float32 or float64.  cuBLAS through CuPy: float16 too.
        """
        name = np.dtype(dtype).name
        return name if name in (("float16",) if self.kind == "cupy" else ()) + ("float32", "float64") else "float32"

    def gemm_call(self, dtype: Any, size: int = 2048) -> tuple[Callable[[], Any], float, str]:
        """A square ``size`` x ``size`` matrix product on this device: ``(call, flops, dtype name)``.

        Time it beside the kernels (:func:`~npsparseattn.bench.common.interleaved_best`).
        """
        gemm_dtype = self.gemm_dtype(dtype)
        a = self.put(np.random.default_rng(0).standard_normal((size, size)).astype(gemm_dtype))
        return self.call(lambda: a @ a), 2.0 * size**3, gemm_dtype

    def gemm_rate(self, dtype: Any, size: int = 2048, repeat: int = 3) -> tuple[float, str]:
        """GFLOP/s of :meth:`gemm_call`'s product (best of ``repeat``, thread pools settled around it), and its
        dtype."""
        if self.kind != "cupy":
            gemm_dtype = self.gemm_dtype(dtype)
            return matmul_rate(gemm_dtype, size=size, repeat=repeat), gemm_dtype
        product, flops, gemm_dtype = self.gemm_call(dtype, size)
        product()
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - start)
        return flops / best / 1e9, gemm_dtype

    def peak_memory(self, fn: Callable[[], Any]) -> tuple[Any, int, str]:
        """``fn()``'s result, the peak bytes it added, and how they were measured.

        On the CPU: the process's resident-set peak (:func:`measure_peak`).
        On a GPU: CuPy's memory pool, emptied first, so the bytes it holds
        after the call are the call's peak.
        """
        if self.kind != "cupy":
            result, peak = measure_peak(fn)
            return result, peak.extra_bytes, peak.method
        pool = self.xp.get_default_memory_pool()
        self.sync()
        pool.free_all_blocks()
        before = pool.used_bytes()
        result = self.call(fn)()
        return result, max(pool.total_bytes() - before, 0), "cupy pool"

    def refusal(self, op: str, problem: Any) -> str:
        """Why this device's backend cannot run ``op`` for ``problem`` (built on small NumPy arrays), or ``""``."""
        try:
            select(op, _as_kind(problem, self.kind), self.backend)
        except BackendError as exc:
            return " ".join(line.strip() for line in str(exc).splitlines())
        return ""

    def describe(self) -> str:
        """``'numba on NumPy arrays (CPU: <model> [<flags>], ...)'``, ``'cupy on CuPy arrays (GPU 0: NVIDIA H100)'``.

        On the CPU it names the model, its vector flags, the vector width of
        numba's loops and the BLAS (:func:`npsparseattn.bench.isa.describe_cpu`):
        every CPU table says which machine it came from.
        """
        where = "NumPy arrays" if self.kind == "numpy" else "CuPy arrays"
        if self.kind == "numpy":
            where += f" ({describe_cpu()})"
        if self.kind == "cupy":
            props = self.xp.cuda.runtime.getDeviceProperties(self.xp.cuda.Device().id)
            name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            where += f" (GPU {self.xp.cuda.Device().id}: {name})"
        return f"{self.backend} on {where}"


def device_for(op: str, backend: str, problem: Callable[[], Any]) -> Device:
    """The :class:`Device` for ``backend`` running ``op``; ``SystemExit`` with the registry's reasons if it cannot.

    ``problem()`` builds the operation's problem on small NumPy arrays of the
    benchmark's dtype; the registry is asked about it as if it lived on the
    backend's device, so a missing GPU, package or dtype is reported before
    any array is created there.
    """
    try:
        kind = _device_kind(op, backend)
        select(op, _as_kind(problem(), kind), backend)
    except BackendError as exc:
        first, *rest = str(exc).splitlines()
        message = " ".join(["npsparseattn bench:", first, "; ".join(line.strip() for line in rest)])
        raise SystemExit(message.strip()) from None
    return Device(backend, kind)
