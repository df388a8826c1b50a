"""Compile every numba CPU kernel ahead of its first use, into numba's on-disk cache, on several cores.

A kernel compiles on its first call (10-30 s each, single-threaded) and is
then loaded from numba's cache next to its source (or ``NUMBA_CACHE_DIR``) in
a fraction of a second.  :func:`precompile` makes every version a program can
need, for float32 and float64 inputs (float16 and bfloat16 read as float32;
a float16 or bfloat16 KV cache as its 16-bit patterns),
C-contiguous and, for the kernels that read strided rows in place (varlen,
the KV cache), strided (:mod:`npsparseattn.cpu._jit`), by calling each
operation on small random inputs: for a container image, a cluster job's
first step, or a test run.  ``npsparseattn compile --jobs N`` runs it.

numba's cache keeps one index file per kernel, and two processes that
compile different versions of one kernel at the same moment can overwrite
each other's entry.  The work is therefore split into groups that own
disjoint kernels, run in phases: in phase 1 the ``attention`` kernels (which
the block-sparse and varlen backwards also call) compile beside the LSH and
KV-cache ones; in phase 2 the sparse walk (block-sparse and index-driven
sparse attention share its kernels) and the varlen kernels compile while
the ``attention`` kernels they share are only loaded (varlen adds the
strided version of the row-dot kernel, and is the only process writing it).
The groups and their phases are those of the table of implementations
(:mod:`npsparseattn._backend_table`, the ``numba`` entries); :data:`GROUPS`
holds each group's warm-up call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

from npsparseattn import _backend_table

__all__ = ["GROUPS", "PHASES", "precompile", "run_group"]

DTYPES = (np.float32, np.float64)


def _array(rng: np.random.Generator, shape: tuple[int, ...], dtype, strided: bool) -> np.ndarray:
    """Random ``shape`` array; ``strided``: a view of wider rows (unit stride on the last axis, rows further apart)."""
    if not strided:
        return rng.standard_normal(shape).astype(dtype)
    return rng.standard_normal(shape[:-1] + (shape[-1] + 5,)).astype(dtype)[..., : shape[-1]]


def _attention(dtype, rng: np.random.Generator) -> None:
    from npsparseattn.cpu import exact

    q, k, v = (_array(rng, (1, 2, 80, 16), dtype, False) for _ in range(3))
    mask = {"scale": 0.25, "offset": 0, "left": None, "right": 0}
    out, lse = exact.forward(q, k, v, **mask)
    dout = _array(rng, out.shape, dtype, False)
    for scheme in exact.SCHEMES:
        exact.backward(dout, q, k, v, out, lse, scheme=scheme, **mask)


def _sparse_walk(dtype, rng: np.random.Generator) -> None:
    """The walk kernels (``cpu/_walk.py``) through block-sparse and index-driven sparse attention (which also
    builds its index with the numba helpers of ``cpu/sparse.py``), both backward schemes."""
    from npsparseattn import layouts
    from npsparseattn.cpu import block_sparse, exact, sparse
    from npsparseattn.problems.sparse import sparse_problem

    layout = layouts.sliding_window((80, 80), 16, 20)
    q, k, v = (_array(rng, (1, 2, 80, 16), dtype, False) for _ in range(3))
    mask = {"scale": 0.25, "offset": 0, "left": None, "right": None}
    out, lse = block_sparse.forward(q, k, v, layout, **mask)
    dout = _array(rng, out.shape, dtype, False)
    for scheme in exact.SCHEMES:
        block_sparse.backward(dout, q, k, v, out, lse, layout, scheme=scheme, **mask)
    kv_idx = np.argsort(rng.random((1, 1, 80, 80)), axis=-1)[..., :24].astype(np.int32)
    p = sparse_problem(q, k[:, :1], v[:, :1], kv_idx, q_block=1, kv_block=1, causal=True)
    out, lse = sparse.forward(q, k[:, :1], v[:, :1], *p.kernel_index(), **p.options())
    for scheme in exact.SCHEMES:
        sparse.backward(dout, q, k[:, :1], v[:, :1], out, lse, *p.kernel_index(), scheme=scheme, **p.options())


def _varlen(dtype, rng: np.random.Generator) -> None:
    import npsparseattn as nsa

    cu = np.array([0, 30, 31, 80], np.int32)
    for strided in (False, True):
        q, k, v = (_array(rng, (2, 80, 16), dtype, strided) for _ in range(3))
        out, lse = nsa.attention_varlen(q, k, v, cu, cu, causal=True, return_lse=True, backend="numba")
        dout = _array(rng, out.shape, dtype, strided)
        nsa.attention_varlen_backward(dout, q, k, v, out, lse, cu, cu, causal=True, backend="numba")


def _kvcache(dtype, rng: np.random.Generator) -> None:
    import npsparseattn as nsa

    # one query over 4096 cached keys splits them across threads and merges (flash-decoding)
    for lq, capacity, strided in ((1, 4096, False), (9, 64, False), (9, 64, True)):
        q = _array(rng, (2, 4, lq, 16), dtype, False)
        k_cache, v_cache = (_array(rng, (2, 2, capacity, 16), dtype, strided) for _ in range(2))
        seqlens = np.full(2, capacity - 8, np.int32)
        nsa.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, backend="numba")
        if dtype == np.float32 and lq == 9:  # float16/bfloat16 caches are read as stored: their bits, as uint16
            half = (x.astype(np.float16) for x in (q, k_cache, v_cache))
            nsa.attention_with_kvcache(*half, cache_seqlens=seqlens, backend="numba")


def _lsh(dtype, rng: np.random.Generator) -> None:
    import npsparseattn as nsa

    qk, v = (_array(rng, (1, 2, 64, 16), dtype, False) for _ in range(2))
    options = {"n_buckets": 4, "n_hashes": 2, "chunk_size": 16, "seed": 0, "backend": "numba"}
    out, lse = nsa.lsh_attention(qk, v, return_lse=True, **options)
    nsa.lsh_attention_backward(_array(rng, out.shape, dtype, False), qk, v, out, lse, **options)


GROUPS: dict[str, Callable[..., None]] = {
    "attention": _attention,
    "lsh": _lsh,
    "kvcache": _kvcache,
    "sparse_walk": _sparse_walk,
    "varlen": _varlen,
}
"""The warm-up of each group that the table's ``numba`` entries name (:func:`npsparseattn._backend_table.groups`)."""


def _phases() -> tuple[tuple[tuple[str, ...], ...], ...]:
    """The groups of the table's ``numba`` entries by phase, one process group each, phases in order."""
    by_phase: dict[int, list[tuple[str, ...]]] = {}
    for group, phase in _backend_table.groups("numba").items():
        by_phase.setdefault(phase, []).append((group,))
    return tuple(tuple(by_phase[phase]) for phase in sorted(by_phase))


# groups of one phase own disjoint kernels and run side by side; a later phase only loads what an earlier one made
PHASES: tuple[tuple[tuple[str, ...], ...], ...] = _phases()


def run_group(names: tuple[str, ...]) -> dict[str, float]:
    """Compile (or load) every version of the kernels of the groups ``names``; seconds per group."""
    seconds = {}
    for name in names:
        start = time.perf_counter()
        rng = np.random.default_rng(0)
        for dtype in DTYPES:
            GROUPS[name](dtype, rng)
        seconds[name] = time.perf_counter() - start
    return seconds


def precompile(jobs: int = 1, report: Callable[[str], None] | None = None) -> dict[str, float]:
    """Compile every CPU kernel version into numba's cache, ``jobs`` processes at a time; seconds per group.

    With ``jobs=1`` everything runs in this process, one group after another.
    ``report`` (``print``, say) is called with a line per finished group.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    seconds: dict[str, float] = {}
    for phase in PHASES:
        if jobs == 1:
            results = [run_group(group) for group in phase]
        else:
            with ProcessPoolExecutor(max_workers=min(jobs, len(phase)), mp_context=get_context("spawn")) as pool:
                results = list(pool.map(run_group, phase))
        for result in results:
            seconds.update(result)
            if report is not None:
                for name, value in result.items():
                    report(f"{name}: {value:.1f} s")
    return seconds
