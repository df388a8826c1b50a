"""``npsparseattn demo``: what tiled attention buys, on built-in random data.

1. Dense NumPy attention versus tiled attention at a moderate length: time,
   peak extra memory, and the error of each against the float64 reference.
2. Causal attention with grouped-query heads, forward and backward, checked
   against the reference.
3. A sequence length at which textbook dense NumPy attention would need more
   memory than this machine has, run with tiled attention in O(L) memory.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from npsparseattn import reference
from npsparseattn.bench.attention import total_memory
from npsparseattn.bench.common import (
    attention_flops,
    best_time,
    dense_numpy_attention,
    dense_numpy_bytes,
    format_bytes,
    format_table,
)
from npsparseattn.bench.memory import measure_peak
from npsparseattn.exact import attention, attention_backward


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``demo``."""
    parser.add_argument("--seq", type=int, default=2048, help="length for the dense-vs-tiled comparison")
    parser.add_argument(
        "--long-seq",
        type=int,
        default=None,
        help="length of the beyond-memory run (default: smallest power of two where dense NumPy "
        "would exceed this machine's memory)",
    )
    parser.add_argument("--skip-long", action="store_true", help="skip the beyond-memory run")


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def _section(title: str) -> None:
    print(f"\n== {title} ==")


def compare_dense_and_tiled(seq: int, heads: int = 4, dim: int = 64) -> None:
    """Part 1: the same problem through dense NumPy and through tiled attention."""
    _section(f"1. dense NumPy vs tiled attention: B=1 H={heads} L={seq} D={dim} float32, causal")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, heads, seq, dim)).astype(np.float32) for _ in range(3))
    ref, _ = reference.attention(q, k, v, causal=True)
    rows = []
    for name, fn in (
        ("dense NumPy", lambda: dense_numpy_attention(q, k, v, causal=True)),
        ("tiled (numba)", lambda: attention(q, k, v, causal=True)),
    ):
        out, peak = measure_peak(fn)
        seconds = best_time(fn, repeat=3, warmup=0)
        gflops = attention_flops(1, heads, seq, seq, dim, causal=True) / seconds / 1e9
        rows.append(
            [name, f"{seconds * 1e3:.1f}", f"{gflops:.1f}", format_bytes(peak.extra_bytes), f"{_rel(out, ref):.1e}"]
        )
    print(format_table(["method", "time ms", "GFLOP/s", "peak extra mem", "rel err vs float64"], rows))


def gqa_forward_backward(seq: int = 1000) -> None:
    """Part 2: causal GQA forward and backward against the float64 reference."""
    _section(f"2. causal grouped-query attention (8 query heads, 2 KV heads), L={seq}, float64")
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 8, seq, 64))
    k = rng.standard_normal((2, 2, seq, 64))
    v = rng.standard_normal((2, 2, seq, 48))
    start = time.perf_counter()
    out, lse = attention(q, k, v, causal=True, return_lse=True)
    dout = rng.standard_normal(out.shape)
    grads = attention_backward(dout, q, k, v, out, lse, causal=True)
    elapsed = time.perf_counter() - start
    ref_out, ref_lse = reference.attention(q, k, v, causal=True)
    ref_grads = reference.attention_backward(dout, q, k, v, causal=True)
    errors = [_rel(out, ref_out), _rel(lse, ref_lse)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
    print(f"forward + backward in {elapsed * 1e3:.0f} ms; relative error vs reference:")
    print("  " + ", ".join(f"{n} {e:.1e}" for n, e in zip(["out", "lse", "dq", "dk", "dv"], errors)))


def beyond_memory(seq: int | None) -> None:
    """Part 3: a length where dense NumPy cannot run here, done tiled."""
    memory = total_memory()
    if seq is None:
        seq = 4096
        while dense_numpy_bytes(1, seq, seq) <= memory:
            seq *= 2
    need = dense_numpy_bytes(1, seq, seq)
    _section(f"3. beyond dense memory: H=1 L={seq} D=64 float32, causal")
    print(f"machine memory {format_bytes(memory)}; dense NumPy attention would hold {format_bytes(need)}")
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 1, seq, 64), dtype=np.float32) for _ in range(3))
    start = time.perf_counter()
    (out, lse), peak = measure_peak(lambda: attention(q, k, v, causal=True, return_lse=True))
    elapsed = time.perf_counter() - start
    rows = min(seq, 128)
    ref, _ = reference.attention(q[..., -rows:, :], k, v, causal=True)
    gflops = attention_flops(1, 1, seq, seq, 64, causal=True) / elapsed / 1e9
    extra = max(peak.extra_bytes - out.nbytes - lse.nbytes, 0)
    print(
        f"tiled attention: {elapsed:.1f} s ({gflops:.0f} GFLOP/s); peak memory beyond inputs "
        f"({format_bytes(3 * q.nbytes)}) and output ({format_bytes(out.nbytes + lse.nbytes)}): {format_bytes(extra)}; "
        f"rel err of the last {rows} rows vs float64: {_rel(out[..., -rows:, :], ref):.1e}"
    )


def run(args: argparse.Namespace) -> None:
    """The demo, in three parts."""
    print("npsparseattn demo: exact attention in O(L) memory on NumPy arrays")
    warm = np.random.default_rng(3).standard_normal((1, 300, 64)).astype(np.float32)
    start = time.perf_counter()
    attention(warm, warm, warm)
    attention(warm.astype(np.float64), warm.astype(np.float64), warm.astype(np.float64))
    print(
        f"(kernels ready in {time.perf_counter() - start:.1f} s; the first run compiles them, later runs load a cache)"
    )
    compare_dense_and_tiled(args.seq)
    gqa_forward_backward()
    if not args.skip_long:
        beyond_memory(args.long_seq)
