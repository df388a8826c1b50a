"""Threads and processes: concurrent calls, fork()ed children, the BLAS limit and the threading layer."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from conftest import random_qkv

import npsparseattn as nsa
from npsparseattn.cpu import _threads


def _blas_threads() -> dict[str, int]:
    from threadpoolctl import threadpool_info

    return {info["filepath"]: info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}


def test_concurrent_calls_agree_and_leave_blas_as_it_was(rng):
    q, k, v = random_qkv(rng, batch=(2,), hq=4, hk=2, lq=300, lk=300, d=32, dtype=np.float32)
    layout = nsa.layouts.sliding_window(300, 32, 64)
    expected = nsa.attention(q, k, v, causal=True), nsa.block_sparse_attention(q, k, v, layout)
    before = _blas_threads()
    results, errors = [], []

    def work():
        try:
            for _ in range(6):
                results.append((nsa.attention(q, k, v, causal=True), nsa.block_sparse_attention(q, k, v, layout)))
        except Exception as err:  # reported below, with the thread's traceback lost but its message kept
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 18
    for dense, sparse in results:
        assert np.array_equal(dense, expected[0]) and np.array_equal(sparse, expected[1])
    assert _blas_threads() == before


def test_blas_limit_holds_in_a_thread_after_the_main_thread_used_it():
    """threadpoolctl 3.8 ignores limits set from a second Python thread; ours must not (a call from a worker
    thread would run BLAS multi-threaded inside numba's threads)."""
    with _threads.single_threaded_blas():
        pass
    seen = []

    def work():
        with _threads.single_threaded_blas():
            seen.append(_blas_threads())
        seen.append(_blas_threads())

    before = _blas_threads()
    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert len(seen) == 2 and seen[0] and all(n == 1 for n in seen[0].values()), seen
    assert seen[1] == before


def test_blas_limit_is_counted_across_overlapping_calls():
    before = _blas_threads()
    outer = _threads.single_threaded_blas()
    inner = _threads.single_threaded_blas()
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # the first caller leaves while the second still runs
    assert all(n == 1 for n in _blas_threads().values())
    inner.__exit__(None, None, None)
    assert _blas_threads() == before


FORK_SCRIPT = textwrap.dedent(
    """
    import multiprocessing as mp
    import numpy as np
    import npsparseattn as nsa

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 64, 16)) for _ in range(3))
    expected = nsa.attention(q, k, v, causal=True)  # numba's threads run in the parent first

    def child(i):
        return float(np.abs(nsa.attention(q, k, v, causal=True) - expected).max())

    with mp.get_context("fork").Pool(2) as pool:
        errors = pool.map(child, range(4))
    assert max(errors) == 0.0, errors
    import numba
    print("ok", numba.threading_layer())
    """
)


def test_forked_children_can_call_kernels():
    """multiprocessing's default start method on Linux forks a process whose numba threads already ran."""
    result = subprocess.run([sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", "tbb"]


def test_threading_layer_is_tbb_unless_the_user_chose_one():
    script = (
        "import numpy as np, numba, npsparseattn as nsa\n"
        "x = np.ones((8, 4))\n"
        "nsa.attention(x, x, x)\n"
        "print(numba.threading_layer())\n"
    )
    chosen = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(NUMBA_THREADING_LAYER="workqueue"),
    )
    assert chosen.stdout.strip() == "workqueue", chosen.stderr[-2000:]
    default = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=_env())
    assert default.stdout.strip() == "tbb", default.stderr[-2000:]


def _env(**extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    env.update(extra)
    return env


@pytest.mark.skipif(_threads.tbb_library() is None, reason="the tbb wheel is not installed")
def test_tbb_library_is_found():
    assert _threads.tbb_library().name.startswith(("libtbb", "tbb"))
