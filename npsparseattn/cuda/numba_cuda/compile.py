"""Compile checks of the numba-cuda kernels, with or without a GPU.

:func:`representative_launches` runs every numba-cuda backend module of the
table (:mod:`npsparseattn._backend_table`) on small NumPy stand-ins with the launches recorded, not run
(:func:`~npsparseattn.cuda.numba_cuda.runtime.record_launches`), once per storage
dtype and head-dimension capacity: the kernel instances (kernel, argument
types) it collects are exactly those the backend launches on a GPU.
:func:`compile_report` compiles one of them to PTX for given compute
capabilities and reads off what matters before anything runs:

* static shared memory (a block may use 48 KiB);
* local memory (a register tile that did not stay in registers);
* float64 arithmetic (an accidental promotion in a float32 kernel; the LSH
  hashing is float64 by design).

``python -m npsparseattn.cuda.numba_cuda.compile`` prints the table; with
``--device`` (on a GPU) it also compiles each instance for the device and
adds the registers, local memory and shared memory the driver reports.
"""

from __future__ import annotations

import argparse
import importlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from npsparseattn._backend_table import entries
from npsparseattn.cuda.numba_cuda.runtime import Launch, record_launches, stand_in_device

CAPABILITIES = ((8, 0), (9, 0))
SHARED_LIMIT = 48 * 1024  # bytes of static shared memory per block
F64_KERNELS = ("hash_rows",)  # kernels whose float64 arithmetic is intended
_F64_OP = re.compile(r"^\s*(?:add|sub|mul|fma|div|max|min|neg|abs|sqrt|rcp|ex2|lg2)\.[\w.]*f64\b", re.MULTILINE)
_SHARED = re.compile(r"\.shared \.align \d+ \.b8 \S+\[(\d+)\]")
_LOCAL = re.compile(r"__local_depot\d+\[(\d+)\]")


@dataclass(frozen=True)
class PTXReport:
    """What one kernel instance's PTX for one compute capability declares."""

    kernel: str
    types: str
    cc: tuple[int, int]
    shared_bytes: int
    local_bytes: int
    f64_ops: int
    seconds: float

    def problems(self) -> list[str]:
        """What is wrong with this instance (empty: nothing)."""
        found = []
        if self.shared_bytes > SHARED_LIMIT:
            found.append(f"{self.shared_bytes} bytes of static shared memory (at most {SHARED_LIMIT})")
        if self.local_bytes:
            found.append(f"{self.local_bytes} bytes of local memory (a register tile spilled to memory)")
        if self.f64_ops and self.kernel not in F64_KERNELS:
            found.append(f"{self.f64_ops} float64 instructions in a float32 kernel")
        return found


def read_ptx(ptx: str) -> tuple[int, int, int]:
    """``(shared bytes, local bytes, float64 arithmetic instructions)`` declared by a PTX module."""
    shared = sum(int(n) for n in _SHARED.findall(ptx))
    local = sum(int(n) for n in _LOCAL.findall(ptx))
    return shared, local, len(_F64_OP.findall(ptx))


def storage_dtype(launch: Launch) -> str:
    """The storage dtype a launch reads (uint16 for bfloat16): its array dtype other than float32/int32/float64."""
    dtypes = [str(t.dtype) for t in launch.signature() if hasattr(t, "dtype")]
    return next((d for d in dtypes if d not in ("float32", "int32", "float64")), "float32")


def describe(launch: Launch) -> str:
    """The argument types of a launch, array dtypes first, compactly."""
    arrays = [str(t.dtype) for t in launch.signature() if hasattr(t, "dtype")]
    return ",".join(dict.fromkeys(arrays))


def _attention(module: Any, q: Any, k: Any, v: Any, rng: np.random.Generator) -> None:
    lse = np.zeros(q.shape[:3], np.float32)
    mask = dict(scale=0.125, offset=0, left=None, right=0)
    module.forward(q, k, v, **mask)
    module.backward(q, q, k, v, q, lse, **mask)


def _block_sparse(module: Any, q: Any, k: Any, v: Any, rng: np.random.Generator) -> None:
    from npsparseattn.layouts import sliding_window

    lse = np.zeros(q.shape[:3], np.float32)
    mask = dict(scale=0.125, offset=0, left=None, right=0)
    layout = sliding_window(q.shape[2], 16, (1, 0))
    module.forward(q, k, v, layout, **mask)
    module.backward(q, q, k, v, q, lse, layout, **mask)


def _sparse_attention(module: Any, q: Any, k: Any, v: Any, rng: np.random.Generator) -> None:
    lse = np.zeros(q.shape[:3], np.float32)
    mask = dict(scale=0.125, offset=0, left=None, right=0, q_block=16, kv_block=16)
    nqb = q.shape[2] // 16
    own = np.broadcast_to(np.arange(nqb, dtype=np.int32)[:, None], (1, k.shape[1], nqb, 1))
    kv_idx, kv_cnt = np.ascontiguousarray(own), np.ones((1, k.shape[1], nqb), np.int32)
    module.forward(q, k, v, kv_idx, kv_cnt, **mask)
    module.backward(q, q, k, v, q, lse, kv_idx, kv_cnt, **mask)


def _lsh_buckets(module: Any, q: Any, k: Any, v: Any, rng: np.random.Generator) -> None:
    module.buckets(q[0], rng.standard_normal((q.shape[3], 2, 4)), (8,))


def _lsh_sort(module: Any, q: Any, k: Any, v: Any, rng: np.random.Generator) -> None:
    module.sort(np.zeros((2, 2, q.shape[2]), np.int32), 1000)


def _lsh_attention(module: Any, q: Any, k: Any, v: Any, rng: np.random.Generator) -> None:
    lse = np.zeros(q.shape[:3], np.float32)
    plan = np.zeros((1, 2, 2 * q.shape[2]), np.int32)
    lsh = dict(chunk_size=32, chunks_before=1, chunks_after=0, causal=True, exclude_self=True)
    module.forward(q, v, plan, plan, **lsh)
    module.backward(q, q, v, q, lse, plan, plan, **lsh)


EXAMPLES: dict[str, Callable[..., None]] = {
    "attention": _attention,
    "block_sparse": _block_sparse,
    "sparse_attention": _sparse_attention,
    "lsh_buckets": _lsh_buckets,
    "lsh_sort": _lsh_sort,
    "lsh_attention": _lsh_attention,
}
"""Per compile group of the table (:func:`npsparseattn._backend_table.groups`): a call of the group's
module on NumPy stand-ins ``q, k, v`` (1, 2, 64, D) that makes every launch its kernels need."""


def representative_launches() -> list[Launch]:
    """One launch per kernel instance the backend uses: every module of the table, storage dtype and tile size.

    Runs the host code of each ``numba-cuda`` entry of the table
    (:mod:`npsparseattn._backend_table`) on NumPy stand-ins with the launches
    recorded (no kernel runs), through its group's example
    (:data:`EXAMPLES`); duplicates (same kernel and argument types) are dropped.
    """
    import ml_dtypes

    rng = np.random.default_rng(0)
    modules = [(importlib.import_module(e.path), EXAMPLES[e.group]) for e in entries(backend="numba-cuda") if e.group]
    launches: list[Launch] = []
    with record_launches() as recorded:
        for dtype in (np.float16, ml_dtypes.bfloat16, np.float32):
            for d in (40, 100):  # head dimensions of the 64- and 128-column tiles
                q, k, v = (rng.standard_normal((1, 2, 64, d)).astype(dtype) for _ in range(3))
                for module, example in modules:
                    example(module, q, k, v, rng)
    seen = set()
    for launch in recorded:
        key = (launch.kernel, launch.signature())
        if key not in seen:
            seen.add(key)
            launches.append(launch)
    return launches


def compile_report(launch: Launch, capabilities: tuple[tuple[int, int], ...] = CAPABILITIES) -> list[PTXReport]:
    """Compile ``launch``'s kernel instance to PTX for each of ``capabilities`` and read the PTX.

    The Python function is typed and lowered once; NVVM then makes the PTX of
    each capability from the same module.
    """
    from numba.cuda import compiler

    fn = launch.kernel.py_func
    signature = launch.signature()
    reports = []
    with stand_in_device(capabilities[0]):
        start = time.perf_counter()
        library, _ = compiler._compile_pyfunc_with_fixup(fn, signature, device=False, cc=capabilities[0], abi="numba")
        for cc in capabilities:
            (ptx,) = library.get_asm_strs(cc=cc)
            shared, local, f64 = read_ptx(ptx)
            elapsed, start = time.perf_counter() - start, time.perf_counter()
            reports.append(PTXReport(fn.__name__, describe(launch), cc, shared, local, f64, elapsed))
    return reports


def device_report(launch: Launch) -> dict[str, Any]:
    """Registers, local and shared memory per thread/block of ``launch``'s instance compiled for the current GPU."""
    kernel = launch.kernel
    signature = launch.signature()
    kernel.compile(signature)
    return dict(
        registers=kernel.get_regs_per_thread(signature),
        local_bytes=kernel.get_local_mem_per_thread(signature),
        shared_bytes=kernel.get_shared_mem_per_block(signature),
    )


def main(argv: list[str] | None = None) -> int:
    """Print the compile report of every kernel instance; exit status 1 if any instance has a problem."""
    parser = argparse.ArgumentParser(prog="python -m npsparseattn.cuda.numba_cuda.compile", description=__doc__)
    parser.add_argument("--device", action="store_true", help="also compile for the current GPU (registers)")
    parser.add_argument(
        "--dtypes", nargs="+", default=["float16", "uint16", "float32"], help="storage dtypes (uint16 is bfloat16)"
    )
    args = parser.parse_args(argv)
    failed = 0
    print(f"{'kernel':<12} {'dtypes':<34} {'cc':<5} {'shared':>8} {'local':>6} {'f64':>4}  problems")
    for launch in representative_launches():
        if storage_dtype(launch) not in args.dtypes and launch.kernel.py_func.__name__ != "sort_rows":
            continue
        for report in compile_report(launch):
            problems = report.problems()
            failed += bool(problems)
            cc = f"{report.cc[0]}.{report.cc[1]}"
            print(
                f"{report.kernel:<12} {report.types:<34} {cc:<5} {report.shared_bytes:>8} {report.local_bytes:>6} "
                f"{report.f64_ops:>4}  {'; '.join(problems) or 'ok'}"
            )
        if args.device:
            found = device_report(launch)
            print(f"{'':<12} {'on this GPU:':<34} {'':<5} {found}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
