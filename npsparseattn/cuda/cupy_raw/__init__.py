"""Backend ``"cupy"``: tensor-core CUDA C++ (``kernels/*.cu``) loaded with ``cupy.RawModule``.

One thin module per operation, like :mod:`npsparseattn.cpu`:
:mod:`~.exact` (``attention``) and :mod:`~.block_sparse`; one host driver for
both (:mod:`~.driver`: launch geometry, buffers, the backward's steps); the
sources and their template instances (:mod:`~.sources`), their loading on a
GPU (:mod:`~.loader`), their NVRTC compile check (:mod:`~.nvrtc`) and their
host emulation (:mod:`~.emulate`).

This package holds the declarations of the kernel contract its modules share.
The kernels read float16/bfloat16 (tensor cores, float32 accumulation) with
``D == Dv`` in :data:`~npsparseattn.cuda.cupy_raw.sources.HEAD_DIMS`.
float32 and float64 inputs are refused with a reason that names where they go
(``numba-cuda`` on a GPU, ``numba`` on the CPU).  The arrays they read are
C-contiguous (the glue copies others).  CuPy arrays on a GPU of compute
capability 8.0 or newer, or NumPy arrays under ``NPSPARSEATTN_CUDA_EMULATE=1``
(the same sources compiled for the host).  Importing it imports neither CuPy
nor the host build.
"""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np

from npsparseattn.cuda import _env

DTYPES = ("float16", "bfloat16", "float32", "float64")  # float32/float64: refused by unsupported(), with the reason
HALF_DTYPES = ("float16", "bfloat16")
STRIDED_ROWS = False
TOLERANCE = {"float16": 4e-3, "bfloat16": 3e-2}  # relative to max |reference|, measured at D = 32..128
MAX_LENGTH = 1 << 28  # int32 index arithmetic with the window bounds added
MAX_GRID_YZ = 65535


def kinds() -> tuple[str, ...]:
    """``("numpy",)`` under ``NPSPARSEATTN_CUDA_EMULATE=1`` (the host build runs), else ``("cupy",)``."""
    return ("numpy",) if _env.emulation() else ("cupy",)


def __getattr__(name: str) -> Any:
    """``KINDS`` is read when asked (:func:`kinds`): ``NPSPARSEATTN_CUDA_EMULATE`` may change after import.

    The operation modules import this function as their own ``__getattr__``.
    """
    if name == "KINDS":
        return kinds()
    raise AttributeError(f"module has no attribute {name!r}")


def compute_dtype(dtype: Any) -> np.dtype:
    """The kernels read the input dtype itself (half-precision storage, float32 in registers)."""
    return np.dtype(dtype)


def unsupported(problem: Any) -> list[str]:
    """Reasons the tensor-core kernels cannot take ``problem`` (an attention or block-sparse problem)."""
    from npsparseattn.cuda.cupy_raw.sources import HEAD_DIMS

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
    elif d not in HEAD_DIMS:
        dims = ", ".join(map(str, HEAD_DIMS))
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
        from npsparseattn.cuda.cupy_raw.emulate import build

        cxx = build.compiler()[0]
        if shutil.which(cxx) is None:
            return [f"NPSPARSEATTN_CUDA_EMULATE=1 but the host C++ compiler {cxx!r} is not installed"]
        return []
    return _env.cupy_reasons()
