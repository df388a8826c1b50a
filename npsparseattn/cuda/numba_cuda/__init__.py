"""Backend ``"numba-cuda"``: SIMT kernels written with ``numba.cuda.jit``, on CuPy arrays.

One thin module per operation, like :mod:`npsparseattn.cpu`:
:mod:`~.exact` (``attention``), :mod:`~.block_sparse`, :mod:`~.lsh_hash`
(``lsh_buckets``), :mod:`~.lsh_sort`, :mod:`~.lsh` (``lsh_attention``); the
tiled attention kernels they share (:mod:`~.attention_kernels`, the LSH ones
in :mod:`~.lsh_kernels`), their tiles (:mod:`~.tiles`), the driver that
builds, launches and records kernels (:mod:`~.runtime`) and the compile
checks (:mod:`~.compile`).

This package holds the declarations of the kernel contract that every module
of the backend shares: :data:`KINDS`, :data:`DTYPES`, :data:`STRIDED_ROWS`,
:data:`TOLERANCE`, :func:`compute_dtype` and the reasons it cannot run
(:func:`reasons`).  Importing it imports neither CuPy nor ``numba.cuda``.

Takes CuPy arrays on a GPU of compute capability 8.0 or newer (NumPy arrays
under the CUDA simulator, ``NUMBA_ENABLE_CUDASIM=1``); float16, bfloat16 and
float32 storage, float32 arithmetic; head dimensions up to 128.  Tolerances
against the float64 reference: those of float32 accumulation, plus the
rounding of the output to its storage dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from npsparseattn.cuda import _env

KINDS = ("numpy",) if _env.simulator() else ("cupy",)
DTYPES = ("float16", "bfloat16", "float32")
STRIDED_ROWS = False
TOLERANCE = {"float16": 2e-3, "bfloat16": 8e-3, "float32": 1e-5}
MAX_HEAD_DIM = 128  # the widest shared-memory tiles (tiles.HEAD_DIMS)


def compute_dtype(dtype: Any) -> np.dtype:
    """The kernels read the input dtype itself: half precision stays half in memory and is widened in registers."""
    return np.dtype(dtype)


def reasons(dims: tuple[int, ...] = ()) -> list[str]:
    """Why the backend cannot take a problem with head dimensions ``dims`` here (empty: it can)."""
    found = list(_env.numba_cuda_reasons())
    wide = [d for d in dims if d > MAX_HEAD_DIM]
    if wide:
        found.append(f"head dimension {max(wide)} is wider than the {MAX_HEAD_DIM} columns of its shared-memory tiles")
    return found


def head_dims(problem: Any) -> tuple[int, int]:
    """``(D, Dv)`` of an attention problem, or of an LSH problem's dense form."""
    dense = getattr(problem, "dense", problem)
    return int(dense.q.shape[3]), int(dense.v.shape[3])


def unsupported(problem: Any) -> list[str]:
    """Environment reasons (numba-cuda, CuPy, a GPU of compute capability 8.0+) and head dimensions above 128."""
    return reasons(head_dims(problem))
