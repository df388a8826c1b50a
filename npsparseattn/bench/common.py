"""Timing, FLOP counts and the same-run matrix-product baseline for benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def attention_flops(batch: int, heads: int, seq_q: int, seq_k: int, dim: int, *, causal: bool) -> float:
    """Forward FLOPs ``4 * B * H * Lq * Lk * D`` (two GEMMs), halved for causal."""
    flops = 4.0 * batch * heads * seq_q * seq_k * dim
    return flops / 2 if causal else flops


BACKWARD_FLOP_RATIO = 2.5  # five GEMMs against two, the FlashAttention convention


def best_time(fn: Callable[[], Any], *, repeat: int = 3, warmup: int = 1) -> float:
    """Smallest wall time of ``repeat`` calls after ``warmup`` untimed calls, in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved_best(calls: dict[str, Callable[[], Any]], rounds: int, settle: float = 0.0) -> dict[str, float]:
    """Best wall time in seconds of each call over ``rounds`` rounds; every round times every call once, in turn.

    On a shared machine the load drifts over a run; interleaving exposes every
    call to the same drift, so the ratios between them hold.  ``settle``
    seconds pass before each call, so the thread pools of the call before
    (numba's, OpenBLAS's, PyTorch's OpenMP workers keep spinning for a
    while) have gone to sleep and every call starts from the same state.
    """
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, fn in calls.items():
            time.sleep(settle)
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def format_rate(gflops: float) -> str:
    """A rate in GFLOP/s written as ``'183.2 GF/s'`` or, from 1000 on, ``'1.25 TF/s'``.

    >>> format_rate(183.24), format_rate(1254.0)
    ('183.2 GF/s', '1.25 TF/s')
    """
    return f"{gflops / 1e3:.2f} TF/s" if gflops >= 1e3 else f"{gflops:.1f} GF/s"


def adaptive_time(fn: Callable[[], Any], *, budget: float = 1.0, repeat: int = 3) -> float:
    """Wall time of ``fn()`` in seconds: one call, or the best of ``repeat`` if one is cheap.

    For sweeps whose points range from milliseconds to many seconds: a call
    that takes less than ``budget / repeat`` seconds is repeated and the best
    time is kept; a slower one is timed once.  Warm up (compile) before.
    """
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first * repeat >= budget:
        return first
    return min(first, best_time(fn, repeat=repeat - 1, warmup=0))


def bytes_per_token(extra_bytes: float, tokens: int) -> float:
    """Extra memory per token of a call: ``extra_bytes / tokens`` (0 for no tokens).

    >>> bytes_per_token(4096, 1024)
    4.0
    """
    return extra_bytes / tokens if tokens else 0.0


SETTLE_SECONDS = 0.25


def matmul_rate(dtype: Any = np.float32, *, size: int = 2048, repeat: int = 3) -> float:
    """GFLOP/s of a square ``size`` x ``size`` NumPy matrix product: the machine's GEMM rate.

    Measured in the same run as the kernel it is compared with, so both see the
    same clock, cores and neighbours.  Waits :data:`SETTLE_SECONDS` before and
    after: thread pools (OpenBLAS's, numba's OpenMP workers) keep spinning for
    a while after their work, and whatever is timed in that window loses a
    core to them (measured: a causal L=1024 forward took 17 ms instead of 10
    right after a product, and a product ran at 100 instead of 180 GFLOP/s
    right after a kernel).
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(dtype)
    b = rng.standard_normal((size, size)).astype(dtype)
    time.sleep(SETTLE_SECONDS)
    rate = 2.0 * size**3 / best_time(lambda: a @ b, repeat=repeat) / 1e9
    time.sleep(SETTLE_SECONDS)
    return rate


def dense_numpy_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool) -> np.ndarray:
    """Textbook attention in the input dtype: full (L, L) scores, softmax, product.

    The baseline a NumPy user writes; needs ``2 * 4 * H * Lq * Lk`` bytes for
    float32 scores and probabilities.
    """
    scale = q.dtype.type(1.0 / np.sqrt(q.shape[-1]))
    s = (q @ k.swapaxes(-1, -2)) * scale
    if causal:
        lq, lk = s.shape[-2:]
        s[..., np.triu(np.ones((lq, lk), dtype=bool), k=lk - lq + 1)] = -np.inf
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s @ v


def dense_numpy_bytes(heads: int, seq_q: int, seq_k: int, itemsize: int = 4) -> int:
    """Bytes :func:`dense_numpy_attention` holds at its peak (scores + a temporary)."""
    return 2 * itemsize * heads * seq_q * seq_k


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with right-aligned columns."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)
    return "\n".join(lines)


def progress(items: list, desc: str):
    """Iterate ``items`` with a progress bar (tqdm when installed, else one line per step)."""
    try:
        from tqdm import tqdm
    except ImportError:
        total = len(items)
        for i, item in enumerate(items, 1):
            print(f"[{desc} {i}/{total}] {item}", flush=True)
            yield item
        return
    yield from tqdm(items, desc=desc, unit="config")
