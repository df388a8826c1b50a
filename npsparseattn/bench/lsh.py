"""``npsparseattn bench lsh``: LSH attention time and memory against L, beside dense tiled attention.

For each sequence length (default 4096 to 65536, doubling; H=4, D=64,
n_hashes=2, chunk 64, one chunk back) one run reports: the hashing time, the
forward and backward time of ``lsh_attention``, the peak extra memory of each
(beyond inputs and results, measured as the process's resident-set peak), and
the growth of time and memory from the previous length (doubling L should
cost about 2x; the target is at most 2.3x).  Times are the best of
``--repeat`` rounds in which all lengths take turns, so that a busy spell of
a shared machine slows every length rather than skewing one ratio.  At
``--dense-seq`` (16384) the tiled exact ``attention`` forward runs on the same
inputs (``qk`` as q and k) and the speed-up of LSH over it is reported (target
at least 5x).  Also the error of a small case against the float64 reference.

``--backend`` picks the implementation (inputs on its device, GPU work
synchronised inside each timed call); the forward rate counts the chunk
products (``4 * D`` per (query, window key) pair per hash round) and stands
beside the same-run matrix-product rate of that device.

``--n-buckets auto`` follows Reformer's rule: about two buckets per chunk,
``2**floor(log2(2 L / chunk))``, factorized into two near-equal powers of two
from 64 buckets on (HF factorizes long sequences the same way), so that the
hashing cost grows with sqrt(L) per token, not with L.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from npsparseattn import available_backends, reference
from npsparseattn.bench import device as devices
from npsparseattn.bench.common import best_time, format_bytes, format_rate, format_table
from npsparseattn.exact import attention
from npsparseattn.lsh import lsh_attention, lsh_attention_backward, lsh_buckets
from npsparseattn.problems import lsh_problem

TIME_GROWTH_TARGET = 2.3
SPEEDUP_TARGET = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bench lsh``."""
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536], help="lengths L")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="head dimension D (= Dv)")
    parser.add_argument("--n-hashes", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--chunks-before", type=int, default=1)
    parser.add_argument("--chunks-after", type=int, default=0)
    parser.add_argument(
        "--n-buckets", default="auto", help="'auto' (Reformer's rule, see above), an even int, or factors like 16x32"
    )
    parser.add_argument("--causal", action="store_true", help="causal LSH (and causal dense attention)")
    devices.add_arguments(parser, "lsh_attention")
    parser.add_argument(
        "--repeat", type=int, default=5, help="timing rounds, all lengths in turn in each (the best time is kept)"
    )
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    parser.add_argument(
        "--dense-seq", type=int, default=16384, help="length at which dense tiled attention is timed too (0 skips)"
    )


def auto_buckets(seq: int, chunk: int) -> int | tuple[int, int]:
    """Reformer's bucket count for ``seq``: ``2**floor(log2(2 seq / chunk))``, factorized from 64 on.

    >>> auto_buckets(4096, 64), auto_buckets(65536, 64), auto_buckets(1024, 64)
    ((8, 16), (32, 64), 32)
    """
    power = max(1, int(math.log2(max(2 * seq // chunk, 2))))
    if power < 6:
        return 2**power
    return (2 ** (power // 2), 2 ** (power - power // 2))


def parse_buckets(text: str, seq: int, chunk: int) -> int | tuple[int, ...]:
    """``'auto'`` -> :func:`auto_buckets`; ``'16'`` -> 16; ``'16x32'`` -> (16, 32)."""
    if text == "auto":
        return auto_buckets(seq, chunk)
    factors = tuple(int(f) for f in text.split("x"))
    return factors[0] if len(factors) == 1 else factors


def _label(n_buckets: int | tuple[int, ...]) -> str:
    return "x".join(map(str, n_buckets)) if isinstance(n_buckets, tuple) else str(n_buckets)


def _options(args: argparse.Namespace, seq: int) -> dict[str, Any]:
    return dict(
        n_buckets=parse_buckets(args.n_buckets, seq, args.chunk_size),
        n_hashes=args.n_hashes,
        chunk_size=args.chunk_size,
        chunks_before=args.chunks_before,
        chunks_after=args.chunks_after,
        causal=args.causal,
        seed=0,
    )


def _inputs(rng: np.random.Generator, args: argparse.Namespace, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """Host ``qk`` and ``v`` (B, H, seq, D) in the benchmark's dtype."""
    shape = (args.batch, args.heads, seq, args.dim)
    dtype = devices.numpy_dtype(args.dtype)
    return tuple(rng.standard_normal(shape, dtype=np.float64).astype(dtype) for _ in range(2))


def lsh_flops(args: argparse.Namespace, seq: int) -> float:
    """Forward FLOPs of the chunk products: ``4 * D`` per (query, window key) pair, per hash round and head."""
    width = (1 + args.chunks_before + args.chunks_after) * args.chunk_size
    return 4.0 * args.batch * args.heads * args.n_hashes * seq * width * args.dim


def _dense_backend(backend: str) -> str:
    """The ``attention`` backend compared with ``backend``'s LSH attention: the same one where it has one."""
    return backend if backend in available_backends("attention") else "auto"


def _hash_backend(backend: str) -> str:
    """The ``lsh_buckets`` backend timed beside ``backend``'s attention: the same one where it has hashing."""
    return backend if backend in available_backends("lsh_buckets") else "auto"


def prepare(
    args: argparse.Namespace, seq: int, device: devices.Device
) -> tuple[dict[str, Any], dict[str, Callable[[], Any]]]:
    """One row with the peak extra memory of a first forward and backward call, and the calls to time."""
    qk, v = (device.put(x) for x in _inputs(np.random.default_rng(seq), args, seq))
    kw = _options(args, seq)
    be = device.backend
    (out, lse), peak, method = device.peak_memory(lambda: lsh_attention(qk, v, return_lse=True, backend=be, **kw))
    row: dict[str, Any] = {
        "seq": seq,
        "n_buckets": _label(kw["n_buckets"]),
        "forward_extra_bytes": max(peak - out.nbytes - lse.nbytes, 0),
        "memory_method": method,
    }
    hash_be = _hash_backend(be)
    calls = {
        "hash_s": lambda: lsh_buckets(qk, kw["n_buckets"], n_hashes=args.n_hashes, seed=0, backend=hash_be),
        "forward_s": lambda: lsh_attention(qk, v, backend=be, **kw),
    }
    if not args.no_backward:
        dout = device.put(np.random.default_rng(1).standard_normal(out.shape).astype(out.dtype))
        (dqk, dv), peak, _ = device.peak_memory(lambda: lsh_attention_backward(dout, qk, v, out, lse, backend=be, **kw))
        row["backward_extra_bytes"] = max(peak - dqk.nbytes - dv.nbytes, 0)
        calls["backward_s"] = lambda: lsh_attention_backward(dout, qk, v, out, lse, backend=be, **kw)
    calls = {name: device.call(fn) for name, fn in calls.items()}
    calls["hash_s"]()
    return row, calls


def time_interleaved(calls_per_row: list[dict[str, Callable[[], Any]]], repeat: int, progress: Any) -> list[dict]:
    """Best wall time of every call over ``repeat`` rounds; in each round the lengths take turns.

    Growth ratios compare lengths, so a busy spell of a shared machine should
    slow all of them alike rather than the one measured during it.
    """
    best = [dict.fromkeys(calls, math.inf) for calls in calls_per_row]
    for _ in progress(list(range(repeat)), desc="lsh timing rounds"):
        for calls, times in zip(calls_per_row, best):
            for name, fn in calls.items():
                start = time.perf_counter()
                fn()
                times[name] = min(times[name], time.perf_counter() - start)
    return best


def dense_comparison(
    args: argparse.Namespace, seq: int, lsh_forward_s: float | None, device: devices.Device
) -> dict[str, Any]:
    """Tiled exact attention forward at ``seq`` on the same kind of inputs, timed once (it takes seconds).

    Dense attention runs on the same backend where it has one, else on the automatic choice.
    """
    qk, v = (device.put(x) for x in _inputs(np.random.default_rng(seq), args, seq))
    be = _dense_backend(device.backend)
    if lsh_forward_s is None:
        lsh = device.call(lambda: lsh_attention(qk, v, backend=device.backend, **_options(args, seq)))
        lsh_forward_s = best_time(lsh, repeat=args.repeat)
    dense = device.call(lambda: attention(qk, qk, v, causal=args.causal, backend=be))
    dense_s = best_time(dense, repeat=2, warmup=0)
    return {"seq": seq, "dense_forward_s": dense_s, "lsh_forward_s": lsh_forward_s, "speedup": dense_s / lsh_forward_s}


def reference_error(args: argparse.Namespace, device: devices.Device) -> float:
    """Max relative error of the forward against the float64 reference on a small case (H=1, L=4 chunks)."""
    seq = 4 * args.chunk_size
    qk, v = (x[:1, :1] for x in _inputs(np.random.default_rng(2), args, seq))
    kw = _options(args, seq)
    out = device.get(lsh_attention(device.put(qk), device.put(v), backend=device.backend, **kw))
    ref, _ = reference.lsh_attention(qk, v, **kw)
    return float(np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max())


def _device(args: argparse.Namespace) -> devices.Device:
    """The device of ``--backend``, refused with the registry's reasons if it cannot run these inputs here."""
    dtype = devices.numpy_dtype(args.dtype)

    def problem():
        seq = 2 * args.chunk_size
        qk, v = (np.ones((1, args.heads, seq, args.dim), dtype) for _ in range(2))
        return lsh_problem(qk, v, **_options(args, seq))

    return devices.device_for("lsh_attention", args.backend, problem)


GROWTH_KEYS = {
    "forward_s": "forward_growth",
    "backward_s": "backward_growth",
    "forward_extra_bytes": "forward_memory_growth",
    "backward_extra_bytes": "backward_memory_growth",
}


def _growth(records: list[dict]) -> None:
    """Ratio of each time and memory to the row before, where L doubled."""
    for prev, row in itertools.pairwise(records):
        for key, name in GROWTH_KEYS.items():
            if key in row and prev.get(key) and row["seq"] == 2 * prev["seq"]:
                row[name] = row[key] / prev[key]


def unmap_large_buffers() -> None:
    """Have glibc return every freed buffer above 1 MiB to the system (``M_MMAP_THRESHOLD``).

    Otherwise glibc raises its threshold after the first large free and keeps
    later buffers of that size in its heap, already resident, so the
    resident-set peak of a call would miss temporaries that an earlier call
    had freed.  A no-op where there is no glibc.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return


def run(args: argparse.Namespace) -> dict:
    """Sweep the lengths; print the table and the targets; return the records."""
    device = _device(args)
    unmap_large_buffers()
    warm = tuple(device.put(x) for x in _inputs(np.random.default_rng(0), args, 4 * args.chunk_size))
    kw = _options(args, 4 * args.chunk_size)
    out, lse = lsh_attention(*warm, return_lse=True, backend=device.backend, **kw)
    lsh_attention_backward(out, *warm, out, lse, backend=device.backend, **kw)
    attention(warm[0], warm[0], warm[1], causal=args.causal, backend=_dense_backend(device.backend))
    prepared = [prepare(args, seq, device) for seq in args.progress(sorted(args.seq), desc="lsh memory")]
    records = [row for row, _ in prepared]
    gemm, gemm_dtype = device.gemm_rate(warm[0].dtype)
    for row, times in zip(records, time_interleaved([calls for _, calls in prepared], args.repeat, args.progress)):
        row.update(times)
        row["tokens_per_s"] = args.batch * row["seq"] / row["forward_s"]
        row["forward_gflops"] = lsh_flops(args, row["seq"]) / row["forward_s"] / 1e9
    _growth(records)
    result: dict[str, Any] = {
        "benchmark": "lsh",
        "device": device.describe(),
        "gemm_gflops": gemm,
        "gemm_dtype": gemm_dtype,
        "rows": records,
        "max_rel_error": reference_error(args, device),
    }
    print(render(records))
    lines = [
        f"{device.describe()}; same-run GEMM ({gemm_dtype}): {format_rate(gemm)}",
        f"float64-reference check (L={4 * args.chunk_size}, H=1): max rel error {result['max_rel_error']:.1e}",
    ]
    time_growth = [r[k] for r in records for k in ("forward_growth", "backward_growth") if k in r]
    if time_growth:
        worst = max(time_growth)
        verdict = "meets" if worst <= TIME_GROWTH_TARGET else "MISSES"
        lines.append(
            f"time growth per doubling of L: at most {worst:.2f}x ({verdict} the {TIME_GROWTH_TARGET}x target)"
        )
        result["max_time_growth"] = worst
    if args.dense_seq:
        match = next((r["forward_s"] for r in records if r["seq"] == args.dense_seq), None)
        dense = dense_comparison(args, args.dense_seq, match, device)
        result["dense"] = dense
        verdict = "meets" if dense["speedup"] >= SPEEDUP_TARGET else "MISSES"
        lines.append(
            f"L={dense['seq']}: dense tiled attention forward {dense['dense_forward_s'] * 1e3:.0f} ms, "
            f"LSH forward {dense['lsh_forward_s'] * 1e3:.0f} ms: {dense['speedup']:.1f}x faster "
            f"({verdict} the {SPEEDUP_TARGET:.0f}x target)"
        )
    print("\n" + "\n".join(lines))
    return result


def render(records: list[dict]) -> str:
    """The table printed by ``bench lsh``."""
    headers = ["L", "buckets", "hash ms", "fwd ms", "fwd x", "fwd rate", "bwd ms", "bwd x", "fwd mem", "mem x",
               "bwd mem", "mem x", "tok/s"]  # fmt: skip

    def cell(row: dict, key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "-"

    rows = []
    for r in records:
        rows.append(
            [
                str(r["seq"]),
                r["n_buckets"],
                f"{r['hash_s'] * 1e3:.1f}",
                f"{r['forward_s'] * 1e3:.1f}",
                cell(r, "forward_growth", ".2f"),
                format_rate(r["forward_gflops"]),
                f"{r['backward_s'] * 1e3:.1f}" if "backward_s" in r else "-",
                cell(r, "backward_growth", ".2f"),
                format_bytes(r["forward_extra_bytes"]),
                cell(r, "forward_memory_growth", ".2f"),
                format_bytes(r["backward_extra_bytes"]) if "backward_extra_bytes" in r else "-",
                cell(r, "backward_memory_growth", ".2f"),
                f"{r['tokens_per_s']:.3g}",
            ]
        )
    return format_table(headers, rows)
