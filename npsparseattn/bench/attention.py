"""``npsparseattn bench attention``: tiled attention against the machine's GEMM rate (and PyTorch's SDPA).

For each sequence length (and causal setting) it reports, measured side by side
in one run: forward and backward time and FLOP rate, the rate of a square
matrix product on the same device (the BLAS rate of this machine, or CuPy's on
a GPU), their ratio, the time of textbook dense NumPy attention where it fits
in memory, the peak extra memory of the forward and of the backward, tokens
per second, the energy per token where a GPU run can be metered through NVML,
and the error against the float64 reference on a slice.  ``--backend`` picks
the implementation (inputs are created on its device); ``--compare torch``
times PyTorch's ``scaled_dot_product_attention`` forward and autograd
backward on the same data, interleaved with ours, and adds the speed ratios
(ours / PyTorch's: above 1 means ours is faster); ``--isa avx2`` runs both
sides as on an AVX2-only CPU, ``--isa native`` as the machine is
(:mod:`npsparseattn.bench.isa`).  ``--plot out.png`` adds the
scaling chart (time against length for dense NumPy, tiled, block-sparse and
LSH attention).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from npsparseattn import reference
from npsparseattn.bench import device as devices
from npsparseattn.bench import isa
from npsparseattn.bench.common import (
    BACKWARD_FLOP_RATIO,
    SETTLE_SECONDS,
    attention_flops,
    best_time,
    bytes_per_token,
    dense_numpy_attention,
    dense_numpy_bytes,
    format_bytes,
    format_table,
    interleaved_best,
)
from npsparseattn.bench.energy import energy_per_token, format_energy_per_token
from npsparseattn.bench.torch_sdpa import COMPARE_CHOICES, TorchAttention, torch_missing
from npsparseattn.exact import attention, attention_backward
from npsparseattn.problems import attention_problem


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bench attention``."""
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096], help="sequence lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8, help="query heads")
    parser.add_argument("--kv-heads", type=int, help="key/value heads (grouped-query attention; default: --heads)")
    parser.add_argument("--dim", type=int, default=64, help="head dimension D")
    devices.add_arguments(parser, "attention")
    parser.add_argument("--causal", choices=["no", "yes", "both"], default="both")
    parser.add_argument(
        "--repeat", type=int, default=3, help="timing rounds, every call once per round in turn (best is kept)"
    )
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    parser.add_argument(
        "--compare",
        choices=COMPARE_CHOICES,
        help="also time PyTorch's scaled_dot_product_attention (forward, and autograd backward) on the same data",
    )
    parser.add_argument(
        "--memory-seq",
        type=int,
        default=65536,
        help="length of the single-head peak-memory check (0 skips it)",
    )
    isa.add_argument(parser)


def check_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with a combination of options (the command line checks each count on its own), or ``None``."""
    if args.kv_heads is not None and args.heads % args.kv_heads:
        return f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads} (grouped-query attention)"
    return None


def total_memory() -> int:
    """Physical memory of the machine in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _inputs(rng, batch, heads, seq, dim, dtype, kv_heads=None):
    kv_heads = heads if kv_heads is None else kv_heads
    shapes = ((batch, heads, seq, dim), (batch, kv_heads, seq, dim), (batch, kv_heads, seq, dim))
    return tuple(rng.standard_normal(shape, dtype=np.float64).astype(dtype) for shape in shapes)


def measure(
    device: devices.Device,
    batch: int,
    heads: int,
    seq: int,
    dim: int,
    *,
    causal: bool,
    dtype: str,
    repeat: int,
    backward: bool,
    kv_heads: int | None = None,
    compare: str | None = None,
) -> dict:
    """One row of the table as a dict (times in seconds, rates in GFLOP/s, memory in bytes).

    Our calls (and PyTorch's with ``compare="torch"``) are timed in
    ``repeat`` interleaved rounds; the best time of each is kept.
    """
    rng = np.random.default_rng(seq)
    host = _inputs(rng, batch, heads, seq, dim, devices.numpy_dtype(dtype), kv_heads)
    q, k, v = (device.put(x) for x in host)
    be = device.backend
    flops = attention_flops(batch, heads, seq, seq, dim, causal=causal)
    gemm_call, gemm_flops, gemm_dtype = device.gemm_call(q.dtype)

    def forward():
        return attention(q, k, v, causal=causal, backend=be)

    (out, lse), fwd_peak, method = device.peak_memory(lambda: attention(q, k, v, causal=causal, return_lse=True,
                                                                         backend=be))  # fmt: skip
    calls = {"forward_s": device.call(forward), "gemm_s": gemm_call}
    row: dict[str, Any] = {
        "backend": device.backend,
        "device": device.kind,
        "batch": batch,
        "heads": heads,
        "kv_heads": heads if kv_heads is None else kv_heads,
        "seq": seq,
        "dim": dim,
        "dtype": dtype,
        "causal": causal,
        "gemm_dtype": gemm_dtype,
        "forward_extra_bytes": max(fwd_peak - out.nbytes - lse.nbytes, 0),
        "memory_method": method,
    }
    dout = device.put(rng.standard_normal(out.shape).astype(out.dtype))
    if backward:

        def backward_only():
            return attention_backward(dout, q, k, v, out, lse, causal=causal, backend=be)

        def forward_backward():
            o, m = attention(q, k, v, causal=causal, return_lse=True, backend=be)
            return attention_backward(dout, q, k, v, o, m, causal=causal, backend=be)

        grads, bwd_peak, _ = device.peak_memory(backward_only)
        row["backward_extra_bytes"] = max(bwd_peak - sum(g.nbytes for g in grads), 0)
        calls["backward_s"] = device.call(backward_only)
        calls["forward_backward_s"] = device.call(forward_backward)
    if compare == "torch":
        sdpa = TorchAttention(device, q, k, v, dout, causal=causal, threads=_threads())
        calls.update(sdpa.calls(backward=backward))
        row["torch"] = sdpa.version()
    for fn in calls.values():
        fn()
    row.update(interleaved_best(calls, repeat, settle=SETTLE_SECONDS))
    gemm = row["gemm_gflops"] = gemm_flops / row.pop("gemm_s") / 1e9
    fwd = row["forward_s"]
    row.update(
        forward_gflops=flops / fwd / 1e9,
        forward_vs_gemm=flops / fwd / 1e9 / gemm,
        tokens_per_s=batch * seq / fwd,
    )
    row["extra_bytes_per_token"] = bytes_per_token(row["forward_extra_bytes"], batch * seq)
    row["energy_j_per_token"], row["energy_note"] = energy_per_token(device.call(forward), device.kind, batch * seq)
    if backward:
        bwd = row["backward_s"]
        row.update(
            backward_gflops=BACKWARD_FLOP_RATIO * flops / bwd / 1e9,
            backward_vs_gemm=BACKWARD_FLOP_RATIO * flops / bwd / 1e9 / gemm,
        )
    if compare == "torch":
        row["forward_vs_torch"] = row["torch_forward_s"] / fwd
        if backward:
            row["forward_backward_vs_torch"] = row["torch_forward_backward_s"] / row["forward_backward_s"]
    itemsize = np.dtype(q.dtype).itemsize
    if device.kind == "numpy" and dense_numpy_bytes(batch * heads, seq, seq, itemsize) < total_memory() // 4:
        q_n, k_n, v_n = (x.astype(np.float32) if x.dtype.itemsize < 4 else x for x in host)
        if k_n.shape[1] != q_n.shape[1]:
            k_n, v_n = (x.repeat(heads // x.shape[1], axis=1) for x in (k_n, v_n))
        row["dense_numpy_s"] = best_time(lambda: dense_numpy_attention(q_n, k_n, v_n, causal=causal), repeat=1)
    rows = min(seq, 256)
    ref, _ = reference.attention(*(x[:1, :1, -rows:] if i == 0 else x[:1, :1] for i, x in enumerate(host)),
                                 causal=causal)  # fmt: skip
    ours = device.get(out[:1, :1, -rows:]).astype(np.float64)
    row["max_rel_error"] = float(np.abs(ours - ref).max() / np.abs(ref).max())
    return row


def _threads() -> int:
    """numba's thread count (PyTorch is given as many)."""
    from numba import get_num_threads

    return get_num_threads()


def memory_check(device: devices.Device, seq: int, dim: int, dtype: str) -> dict:
    """Peak memory of one head's causal forward at length ``seq`` beyond inputs and output."""
    q, k, v = (device.put(x) for x in _inputs(np.random.default_rng(1), 1, 1, seq, dim, devices.numpy_dtype(dtype)))
    be = device.backend
    attention(q[..., :512, :], k[..., :512, :], v[..., :512, :], causal=True, backend=be)
    (out, lse), peak, method = device.peak_memory(lambda: attention(q, k, v, causal=True, return_lse=True,
                                                                     backend=be))  # fmt: skip
    extra = max(peak - out.nbytes - lse.nbytes, 0)
    return {
        "seq": seq,
        "dim": dim,
        "dtype": dtype,
        "extra_bytes": extra,
        "extra_bytes_per_token": bytes_per_token(extra, seq),
        "dense_numpy_bytes": dense_numpy_bytes(1, seq, seq, q.dtype.itemsize),
        "memory_method": method,
    }


def _device(args: argparse.Namespace) -> devices.Device:
    """The device of ``--backend``, refused with the registry's reasons if it cannot run these inputs here."""
    dtype = devices.numpy_dtype(args.dtype)
    kv_heads = args.kv_heads or args.heads

    def problem():
        q, k, v = _inputs(np.random.default_rng(0), 1, args.heads, 8, args.dim, dtype, kv_heads)
        return attention_problem(q, k, v)

    return devices.device_for("attention", args.backend, problem)


def run(args: argparse.Namespace) -> dict:
    """Run the sweep described by ``args``; print the table; return the records."""
    device = _device(args)
    if args.compare == "torch" and (reason := torch_missing(device.kind)):
        raise SystemExit(f"npsparseattn bench: --compare torch: {reason}")
    causal_values = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    dtype = devices.numpy_dtype(args.dtype)
    for heads in (1, args.heads):  # one head and many: a backend may run different kernels (the CPU backward does)
        warm = tuple(device.put(x) for x in _inputs(np.random.default_rng(0), 1, heads, 300, args.dim, dtype))
        out, lse = attention(*warm, return_lse=True, backend=args.backend)
        attention_backward(out, *warm, out, lse, backend=args.backend)
    records = []
    configs = [(seq, causal) for seq in args.seq for causal in causal_values]
    for seq, causal in args.progress(configs, desc="attention"):
        records.append(
            measure(
                device,
                args.batch,
                args.heads,
                seq,
                args.dim,
                causal=causal,
                dtype=args.dtype,
                repeat=args.repeat,
                backward=not args.no_backward,
                kv_heads=args.kv_heads,
                compare=args.compare,
            )
        )
    print(render(records))
    print(f"{device.describe()}; B={args.batch} Hq={args.heads} Hk={args.kv_heads or args.heads} D={args.dim} "
          f"{args.dtype}; best of {args.repeat} interleaved rounds")  # fmt: skip
    if args.compare == "torch" and records:
        print(f"compared with {records[0]['torch']}: 'x torch' is PyTorch's time / ours (above 1: ours is faster)")
    result: dict[str, Any] = {"benchmark": "attention", "device": device.describe(), "rows": records}
    if args.memory_seq:
        mem = memory_check(device, args.memory_seq, args.dim, args.dtype)
        result["memory"] = mem
        print(
            f"\npeak extra memory, causal L={mem['seq']} H=1 D={mem['dim']} {mem['dtype']}: "
            f"{format_bytes(mem['extra_bytes'])} beyond inputs and output, "
            f"{mem['extra_bytes_per_token']:.1f} B/token "
            f"(dense NumPy would hold {format_bytes(mem['dense_numpy_bytes'])}; measured by {mem['memory_method']})"
        )
    return result


def _rate_unit(records: list[dict]) -> tuple[str, float]:
    """``("GF/s", 1)`` or, when a rate reaches 1000 GFLOP/s, ``("TF/s", 1e-3)``."""
    rates = [r[key] for r in records for key in ("forward_gflops", "backward_gflops", "gemm_gflops") if key in r]
    return ("TF/s", 1e-3) if rates and max(rates) >= 1e3 else ("GF/s", 1.0)


def render(records: list[dict]) -> str:
    """The table printed by ``bench attention``."""
    unit, factor = _rate_unit(records)
    backward = any("backward_s" in r for r in records)
    torch = any("torch_forward_s" in r for r in records)
    headers = ["L", "causal", "fwd ms", f"fwd {unit}", "fwd/GEMM"]
    if backward:
        headers += ["bwd ms", f"bwd {unit}", "bwd/GEMM"]
    headers.append(f"GEMM {unit}")
    if torch:
        headers += ["torch fwd ms", "fwd x torch"]
        if backward:
            headers += ["f+b ms", "torch f+b ms", "f+b x torch"]
    headers += ["dense ms", "fwd mem"]
    if backward:
        headers.append("bwd mem")
    headers += ["B/tok", "tok/s", "J/tok", "rel err"]

    def ms(r: dict, key: str) -> str:
        return f"{r[key] * 1e3:.1f}" if key in r else "-"

    def rate(r: dict, key: str) -> str:
        return f"{r[key] * factor:.{1 if factor == 1 else 2}f}" if key in r else "-"

    def share(r: dict, key: str, fmt: str = ".0%") -> str:
        return format(r[key], fmt) if key in r else "-"

    notes = {r["energy_note"] for r in records if r["energy_j_per_token"] is None}
    shared_note = notes.pop() if len(notes) == 1 and all(r["energy_j_per_token"] is None for r in records) else None

    def energy(r: dict) -> str:
        return "n/a" if shared_note is not None else format_energy_per_token(r["energy_j_per_token"], r["energy_note"])

    rows = []
    for r in records:
        line = [str(r["seq"]), "yes" if r["causal"] else "no", ms(r, "forward_s"), rate(r, "forward_gflops"),
                share(r, "forward_vs_gemm")]  # fmt: skip
        if backward:
            line += [ms(r, "backward_s"), rate(r, "backward_gflops"), share(r, "backward_vs_gemm")]
        line.append(rate(r, "gemm_gflops"))
        if torch:
            line += [ms(r, "torch_forward_s"), share(r, "forward_vs_torch", ".2f")]
            if backward:
                line += [ms(r, "forward_backward_s"), ms(r, "torch_forward_backward_s"),
                         share(r, "forward_backward_vs_torch", ".2f")]  # fmt: skip
        dense = ms(r, "dense_numpy_s") if "dense_numpy_s" in r or r["device"] != "numpy" else "too big"
        line += [dense, format_bytes(r["forward_extra_bytes"])]
        if backward:
            line.append(format_bytes(r["backward_extra_bytes"]) if "backward_extra_bytes" in r else "-")
        line += [
            f"{r['extra_bytes_per_token']:.0f}",
            f"{r['tokens_per_s']:.3g}",
            energy(r),
            f"{r['max_rel_error']:.1e}",
        ]
        rows.append(line)
    table = format_table(headers, rows)
    return table if shared_note is None else f"{table}\nJ/tok: n/a ({shared_note})"
