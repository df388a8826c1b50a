"""``npsparseattn bench attention``: tiled attention against the machine's GEMM rate.

For each sequence length (and causal setting) it reports, measured side by side
in one run: forward and backward time and GFLOP/s, the GFLOP/s of a square
float32 NumPy matrix product (the BLAS rate of this machine), their ratio, the
time of textbook dense NumPy attention where it fits in memory, the peak extra
memory of the forward (in total and per token), tokens per second, the energy
per token where a GPU run can be metered through NVML, and the error against
the float64 reference on a slice.  ``--plot out.png`` adds the scaling chart
(time against length for dense NumPy, tiled, block-sparse and LSH attention).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from npsparseattn import reference
from npsparseattn.bench.common import (
    BACKWARD_FLOP_RATIO,
    attention_flops,
    best_time,
    bytes_per_token,
    dense_numpy_attention,
    dense_numpy_bytes,
    format_bytes,
    format_table,
    matmul_rate,
)
from npsparseattn.bench.energy import energy_per_token, format_energy_per_token
from npsparseattn.bench.memory import measure_peak
from npsparseattn.exact import attention, attention_backward


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bench attention``."""
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096], help="sequence lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64, help="head dimension D")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--causal", choices=["no", "yes", "both"], default="both")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per measurement (best is kept)")
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    parser.add_argument(
        "--memory-seq",
        type=int,
        default=65536,
        help="length of the single-head peak-memory check (0 skips it)",
    )


def total_memory() -> int:
    """Physical memory of the machine in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _inputs(rng, batch, heads, seq, dim, dtype):
    shape = (batch, heads, seq, dim)
    return tuple(rng.standard_normal(shape, dtype=np.float64).astype(dtype) for _ in range(3))


def measure(
    batch: int, heads: int, seq: int, dim: int, *, causal: bool, dtype: str, repeat: int, backward: bool
) -> dict:
    """One row of the table as a dict (times in seconds, rates in GFLOP/s, memory in bytes)."""
    rng = np.random.default_rng(seq)
    q, k, v = _inputs(rng, batch, heads, seq, dim, dtype)
    flops = attention_flops(batch, heads, seq, seq, dim, causal=causal)
    gemm = matmul_rate(dtype)
    (out, lse), peak = measure_peak(lambda: attention(q, k, v, causal=causal, return_lse=True))
    fwd = best_time(lambda: attention(q, k, v, causal=causal), repeat=repeat)
    row: dict[str, Any] = {
        "batch": batch,
        "heads": heads,
        "seq": seq,
        "dim": dim,
        "dtype": dtype,
        "causal": causal,
        "gemm_gflops": gemm,
        "forward_s": fwd,
        "forward_gflops": flops / fwd / 1e9,
        "forward_vs_gemm": flops / fwd / 1e9 / gemm,
        "forward_extra_bytes": max(peak.extra_bytes - out.nbytes - lse.nbytes, 0),
        "memory_method": peak.method,
        "tokens_per_s": batch * seq / fwd,
    }
    row["extra_bytes_per_token"] = bytes_per_token(row["forward_extra_bytes"], batch * seq)
    row["energy_j_per_token"], row["energy_note"] = energy_per_token(
        lambda: attention(q, k, v, causal=causal), "numpy", batch * seq
    )
    if backward:
        dout = rng.standard_normal(out.shape).astype(dtype)
        bwd = best_time(lambda: attention_backward(dout, q, k, v, out, lse, causal=causal), repeat=repeat)
        row.update(
            backward_s=bwd,
            backward_gflops=BACKWARD_FLOP_RATIO * flops / bwd / 1e9,
            backward_vs_gemm=BACKWARD_FLOP_RATIO * flops / bwd / 1e9 / gemm,
        )
    if dense_numpy_bytes(batch * heads, seq, seq, np.dtype(dtype).itemsize) < total_memory() // 4:
        row["dense_numpy_s"] = best_time(lambda: dense_numpy_attention(q, k, v, causal=causal), repeat=1)
    rows = min(seq, 256)
    ref, _ = reference.attention(q[:1, :1, -rows:], k[:1, :1], v[:1, :1], causal=causal)
    row["max_rel_error"] = float(np.abs(out[:1, :1, -rows:] - ref).max() / np.abs(ref).max())
    return row


def memory_check(seq: int, dim: int, dtype: str) -> dict:
    """Peak memory of one head at length ``seq`` beyond inputs and output (causal)."""
    rng = np.random.default_rng(1)
    q, k, v = _inputs(rng, 1, 1, seq, dim, dtype)
    attention(q[..., :512, :], k[..., :512, :], v[..., :512, :], causal=True)
    (out, lse), peak = measure_peak(lambda: attention(q, k, v, causal=True, return_lse=True))
    extra = max(peak.extra_bytes - out.nbytes - lse.nbytes, 0)
    return {
        "seq": seq,
        "dim": dim,
        "dtype": dtype,
        "extra_bytes": extra,
        "extra_bytes_per_token": bytes_per_token(extra, seq),
        "dense_numpy_bytes": dense_numpy_bytes(1, seq, seq, np.dtype(dtype).itemsize),
        "memory_method": peak.method,
    }


def run(args: argparse.Namespace) -> dict:
    """Run the sweep described by ``args``; print the table; return the records."""
    causal_values = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    warm = _inputs(np.random.default_rng(0), 1, 1, 300, args.dim, args.dtype)
    out, lse = attention(*warm, return_lse=True)
    attention_backward(out, *warm, out, lse)
    records = []
    configs = [(seq, causal) for seq in args.seq for causal in causal_values]
    for seq, causal in args.progress(configs, desc="attention"):
        records.append(
            measure(
                args.batch,
                args.heads,
                seq,
                args.dim,
                causal=causal,
                dtype=args.dtype,
                repeat=args.repeat,
                backward=not args.no_backward,
            )
        )
    print(render(records))
    result: dict[str, Any] = {"benchmark": "attention", "rows": records}
    if args.memory_seq:
        mem = memory_check(args.memory_seq, args.dim, args.dtype)
        result["memory"] = mem
        print(
            f"\npeak extra memory, causal L={mem['seq']} H=1 D={mem['dim']} {mem['dtype']}: "
            f"{format_bytes(mem['extra_bytes'])} beyond inputs and output, "
            f"{mem['extra_bytes_per_token']:.1f} B/token "
            f"(dense NumPy would hold {format_bytes(mem['dense_numpy_bytes'])}; measured by {mem['memory_method']})"
        )
    return result


def render(records: list[dict]) -> str:
    """The table printed by ``bench attention``."""
    headers = ["L", "causal", "fwd ms", "fwd GF/s", "fwd/GEMM", "bwd ms", "bwd GF/s", "bwd/GEMM",
               "GEMM GF/s", "dense ms", "extra mem", "B/tok", "tok/s", "J/tok", "rel err"]  # fmt: skip
    rows = []
    for r in records:
        rows.append(
            [
                str(r["seq"]),
                "yes" if r["causal"] else "no",
                f"{r['forward_s'] * 1e3:.1f}",
                f"{r['forward_gflops']:.1f}",
                f"{r['forward_vs_gemm']:.0%}",
                f"{r['backward_s'] * 1e3:.1f}" if "backward_s" in r else "-",
                f"{r['backward_gflops']:.1f}" if "backward_s" in r else "-",
                f"{r['backward_vs_gemm']:.0%}" if "backward_s" in r else "-",
                f"{r['gemm_gflops']:.1f}",
                f"{r['dense_numpy_s'] * 1e3:.1f}" if "dense_numpy_s" in r else "too big",
                format_bytes(r["forward_extra_bytes"]),
                f"{r['extra_bytes_per_token']:.0f}",
                f"{r['tokens_per_s']:.3g}",
                format_energy_per_token(r["energy_j_per_token"], r["energy_note"]),
                f"{r['max_rel_error']:.1e}",
            ]
        )
    return format_table(headers, rows)
