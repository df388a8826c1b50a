"""What the two ``cupy`` backend modules declare and share: what they take, the launch geometry of the kernels,
and the backward's two small kernels (:mod:`~npsparseattn.cuda.raw_exact`, :mod:`~npsparseattn.cuda.raw_block_sparse`).

The kernels read float16/bfloat16 (tensor cores, float32 accumulation) with
``D == Dv`` in :data:`~npsparseattn.cuda.raw_sources.HEAD_DIMS`.  float32 and
float64 inputs are refused with a reason that names where they go
(``numba-cuda`` on a GPU, ``numba`` on the CPU).  The arrays they read are
C-contiguous (the glue copies others).
"""

from __future__ import annotations

import math
import shutil
from typing import Any

import numpy as np

from npsparseattn._arrays import array_module
from npsparseattn.cuda import _env, raw_loader, raw_sources
from npsparseattn.cuda.emulate import build

DTYPES = ("float16", "bfloat16", "float32", "float64")  # float32/float64: refused by unsupported(), with the reason
HALF_DTYPES = ("float16", "bfloat16")
STRIDED_ROWS = False
TOLERANCE = {"float16": 4e-3, "bfloat16": 3e-2}  # relative to max |reference|, measured at D = 32..128

NTHREADS = 128  # npsa::NTHREADS: 4 warps
MAX_LENGTH = 1 << 28  # int32 index arithmetic with the window bounds added
MAX_GRID_YZ = 65535
LOG2E = 1.4426950408889634


def kinds() -> tuple[str, ...]:
    """``("numpy",)`` under ``NPSPARSEATTN_CUDA_EMULATE=1`` (the host build runs), else ``("cupy",)``."""
    return ("numpy",) if _env.emulation() else ("cupy",)


def compute_dtype(dtype: Any) -> np.dtype:
    """The kernels read the input dtype itself (half-precision storage, float32 in registers)."""
    return np.dtype(dtype)


def unsupported(problem: Any) -> list[str]:
    """Reasons the tensor-core kernels cannot take ``problem`` (an attention or block-sparse problem)."""
    reasons = []
    name = problem.dtype.name
    if name not in HALF_DTYPES:
        reasons.append(
            f"{name} inputs go to the numba-cuda backend on a GPU (numba on the CPU): "
            f"the cupy backend's tensor-core kernels read float16 and bfloat16"
        )
    d, dv = problem.q.shape[3], problem.v.shape[3]
    if d != dv:
        reasons.append(f"head dimensions D={d} and Dv={dv} differ; these kernels need D == Dv")
    elif d not in raw_sources.HEAD_DIMS:
        dims = ", ".join(map(str, raw_sources.HEAD_DIMS))
        reasons.append(f"head dimension {d} has no kernel instance (instances: {dims})")
    if max(problem.seq_q, problem.seq_k) >= MAX_LENGTH:
        reasons.append(f"sequence length {max(problem.seq_q, problem.seq_k)} is {MAX_LENGTH} or more")
    if max(problem.q.shape[0], problem.q.shape[1]) > MAX_GRID_YZ:
        reasons.append(f"batch {problem.q.shape[0]} or heads {problem.q.shape[1]} exceed {MAX_GRID_YZ}")
    reasons.extend(environment_reasons())
    return reasons


def environment_reasons() -> list[str]:
    """What this machine lacks to run the kernels: a CUDA GPU with CuPy, or under emulation a host compiler."""
    if _env.emulation():
        cxx = build.compiler()[0]
        if shutil.which(cxx) is None:
            return [f"NPSPARSEATTN_CUDA_EMULATE=1 but the host C++ compiler {cxx!r} is not installed"]
        return []
    return _env.cupy_reasons()


def check_arrays(dtype: Any, lse: Any = None, **arrays: Any) -> None:
    """The kernels read raw pointers: every array C-contiguous, ``arrays`` all of ``dtype`` (float16 or
    bfloat16), ``lse`` float32.  ``ValueError``/``TypeError`` naming the array otherwise (the public
    functions copy and cast before calling the kernels)."""
    if np.dtype(dtype).name not in HALF_DTYPES:
        raise TypeError(f"the cupy kernels read float16 or bfloat16, got {np.dtype(dtype).name}")
    for name, x in {**arrays, **({} if lse is None else {"lse": lse})}.items():
        want = np.float32 if name == "lse" else dtype
        if x.dtype != np.dtype(want):
            raise TypeError(f"{name} has dtype {x.dtype.name}; the cupy kernels need {np.dtype(want).name}")
        if not x.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous for the cupy kernels")


def window_args(left: int | None, right: int | None, lq: int, lk: int) -> tuple[bool, int, int]:
    """``(masked, left, right)`` for the kernels: a side of ``None`` becomes a bound no pair reaches,
    and every bound is clamped so that ``i + offset +- bound`` stays inside int32."""
    limit = lq + lk + 1
    masked = left is not None or right is not None

    def clamp(x):
        return limit if x is None else max(-limit, min(int(x), limit))

    return masked, clamp(left), clamp(right)


def blocks(n: int, size: int) -> int:
    """``ceil(n / size)``."""
    return -(-n // size)


def fwd_rows(d: int, *, sparse: bool = False) -> int:
    """Query rows per forward CTA: npsa::DenseFwdShape<D>::BQ (two m-tiles of 16 rows per warp for
    D <= 64, one above) or npsa::SparseFwdShape<D>::BQ (one)."""
    return 64 if sparse or d > 64 else 128


def fwd_shared_bytes(d: int) -> int:
    """npsa::FwdShape<D, MT>::SMEM: double-buffered K and V tiles of 64 rows of D + 8 elements (Q passes
    through the K buffers)."""
    return 4 * 64 * (d + 8) * 2


def bwd_query_tile(d: int) -> int:
    """npsa::BwdShape<D>::BQ: queries per backward step."""
    return 64 if d <= 64 else 32


def bwd_shared_bytes(d: int) -> int:
    """npsa::BwdShape<D>::SMEM: K, V (64 rows), Q and dO double-buffered, lse2/delta, dS^T (64 x BQ + 8)."""
    bq = bwd_query_tile(d)
    return 2 * 64 * (d + 8) * 2 + 4 * bq * (d + 8) * 2 + 2 * 2 * bq * 4 + 64 * (bq + 8) * 2


def output_buffer(x: Any, shape: tuple[int, ...], dtype: Any, xp: Any) -> tuple[Any, Any]:
    """``(target, kernel_out)``: a C-contiguous array of ``shape``/``dtype`` for the kernel to write, and
    where the result goes (``x`` itself when the kernel can write it in place, else ``x`` after a copy)."""
    if x is None:
        out = xp.empty(shape, dtype)
        return out, out
    if x.flags.c_contiguous and x.dtype == np.dtype(dtype) and tuple(x.shape) == shape:
        return x, x
    return x, xp.empty(shape, dtype)


def finish(target: Any, computed: Any) -> Any:
    """Copy ``computed`` into ``target`` if they differ (see :func:`output_buffer`); return ``target``."""
    if computed is not target:
        target[...] = computed
    return target


def backward_prepare(dout: Any, out: Any, lse: Any, dtype: str, d: int) -> tuple[Any, Any, Any]:
    """``(lse2, delta, dq_acc)`` of a backward: ``lse * log2 e`` (+inf for empty rows), ``rowsum(dout * out)``
    and a zeroed float32 dQ accumulator shaped like ``out``."""
    xp = array_module("cupy" if not isinstance(dout, np.ndarray) else "numpy")
    rows = math.prod(out.shape[:3])
    lse2 = xp.empty(out.shape[:3], np.float32)
    delta = xp.empty(out.shape[:3], np.float32)
    dq_acc = xp.empty(out.shape, np.float32)
    raw_loader.launcher().launch(
        raw_sources.instance("npsa_bwd_prep", dtype, d),
        (blocks(rows, NTHREADS // 4),),
        (NTHREADS,),
        0,
        [out, dout, lse, lse2, delta, dq_acc, np.int32(rows)],
    )
    return lse2, delta, dq_acc


def store_dq(dq_acc: Any, dq: Any, dtype: str, scale: float) -> None:
    """``dq = dtype(dq_acc * scale)`` (both C-contiguous, same shape)."""
    n = dq_acc.size
    raw_loader.launcher().launch(
        raw_sources.instance("npsa_dq_store", dtype),
        (blocks(n // 8, NTHREADS),),
        (NTHREADS,),
        0,
        [dq_acc, dq, np.int64(n), np.float32(scale)],
    )
