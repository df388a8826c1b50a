"""``npsparseattn bench block-sparse``: block-sparse forward time against density, beside the dense tiled kernel.

One run times, on the same inputs: the tiled dense kernel (``attention``,
no mask) and ``block_sparse_attention`` on sliding-window layouts whose
half-width in blocks sets the density (2% to 50% by default), plus a BigBird
and a strided layout.  For each layout it reports the density, the forward
time, the speed-up over dense and the *cost ratio*
``time / (density * dense time)``: 1.0 means the time is exactly proportional
to the stored blocks.  Optionally the backward, and always the peak extra
memory of the densest forward (it must stay O(L)) and the error of the last
query rows against a float64 computation.  ``--backend`` picks the
implementation of both operations (inputs on its device, GPU work
synchronised inside each timed call); the FLOP rates count the stored
blocks and stand beside the same-run matrix-product rate of that device.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from npsparseattn import available_backends, layouts
from npsparseattn.bench import device as devices
from npsparseattn.bench.common import BACKWARD_FLOP_RATIO, format_bytes, format_rate, format_table
from npsparseattn.block_sparse import block_sparse_attention, block_sparse_attention_backward
from npsparseattn.exact import attention, attention_backward
from npsparseattn.problems import attention_problem


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bench block-sparse``."""
    parser.add_argument("--seq", type=int, default=16384, help="sequence length L (default 16384)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="head dimension D")
    parser.add_argument("--block", type=int, default=64, help="block edge in tokens (default 64)")
    devices.add_arguments(parser, "block_sparse_attention")
    parser.add_argument(
        "--windows",
        type=int,
        nargs="+",
        default=[2, 7, 15, 31, 63],
        help="sliding-window half-widths in blocks (default 2 7 15 31 63: about 2%%, 6%%, 12%%, 25%%, 50%% at L=16384)",
    )
    parser.add_argument("--no-patterns", action="store_true", help="time the sliding windows only")
    parser.add_argument("--backward", action="store_true", help="also time the backward")
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds; each times every call once, the best of each is kept"
    )


def _layouts(args: argparse.Namespace) -> list[tuple[str, layouts.BlockLayout]]:
    seq, block = args.seq, args.block
    items = [(f"window +-{w} blocks", layouts.sliding_window(seq, block, w * block)) for w in args.windows]
    if not args.no_patterns:
        items.append(("bigbird (3+2+3 blocks)", layouts.bigbird(seq, block, random_blocks=3, seed=0)))
        items.append(("strided, stride 16", layouts.strided(seq, block, 16, causal=False)))
    return items


def reference_rows(q, k, v, layout: layouts.BlockLayout, rows: int) -> np.ndarray:
    """Float64 output of the last ``rows`` queries of batch 0, head 0 under ``layout`` (no element mask)."""
    lq = q.shape[2]
    bq, bk = layout.block
    first = lq - rows
    blocks = layout.to_dense()[0, first // bq :]
    mask = blocks.repeat(bq, axis=0).repeat(bk, axis=1)[first % bq : first % bq + rows, : k.shape[2]]
    q64, k64, v64 = (x[0, 0].astype(np.float64) for x in (q, k, v))
    s = q64[first:] @ k64.T / np.sqrt(q.shape[-1])
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)) @ v64


def _interleaved_best(calls: dict[str, Callable[[], Any]], rounds: int, progress: Callable) -> dict[str, float]:
    """Best wall time of each call over ``rounds`` rounds; every round times every call once, in turn.

    On a shared machine the load drifts over a run; interleaving exposes the
    dense baseline and each layout to the same drift, so their ratios hold.
    """
    best = dict.fromkeys(calls, float("inf"))
    for _, name in progress([(r, name) for r in range(rounds) for name in calls], desc="block-sparse"):
        start = time.perf_counter()
        calls[name]()
        best[name] = min(best[name], time.perf_counter() - start)
    return best


def block_flops(layout: layouts.BlockLayout, batch: int, heads: int, dim: int) -> float:
    """Forward FLOPs of the stored blocks: ``4 * D`` per (query, key) pair of a stored block, every head."""
    per_head = layout.nnz * layout.block[0] * layout.block[1] * (heads if layout.heads == 1 else 1)
    return 4.0 * batch * per_head * dim


def _device(args: argparse.Namespace) -> devices.Device:
    """The device of ``--backend`` (also the backend of the dense baseline), refused with the registry's reasons."""
    dtype = devices.numpy_dtype(args.dtype)

    def problem():
        q, k, v = (np.ones((1, args.heads, 8, args.dim), dtype) for _ in range(3))
        return attention_problem(q, k, v)

    device = devices.device_for("block_sparse_attention", args.backend, problem)
    if args.backend != "auto" and args.backend not in available_backends("attention"):
        raise SystemExit(f"npsparseattn bench: backend {args.backend!r} has no dense attention to compare with")
    return device


def run(args: argparse.Namespace) -> dict:
    """Time dense tiled attention and each layout; print the table; return the records."""
    device = _device(args)
    be = device.backend
    rng = np.random.default_rng(0)
    shape = (args.batch, args.heads, args.seq, args.dim)
    host = tuple(rng.standard_normal(shape, dtype=np.float64).astype(devices.numpy_dtype(args.dtype)) for _ in "qkv")
    q, k, v = (device.put(x) for x in host)
    items = _layouts(args)
    warm = min(300, args.seq)
    small = tuple(x[..., :warm, :] for x in (q, k, v))
    for lay in (layouts.sliding_window(warm, args.block, args.block), layouts.bigbird(warm, args.block)):
        out, lse = block_sparse_attention(*small, lay, return_lse=True, backend=be)
        block_sparse_attention_backward(out, *small, out, lse, lay, backend=be)
    attention(*small, backend=be)
    calls: dict[str, Callable[[], Any]] = {"dense": partial(attention, q, k, v, backend=be)}
    calls.update({name: partial(block_sparse_attention, q, k, v, lay, backend=be) for name, lay in items})
    if args.backward:
        out, lse = attention(q, k, v, return_lse=True, backend=be)
        calls["dense backward"] = partial(attention_backward, out, q, k, v, out, lse, backend=be)
        for name, lay in items:
            out, lse = block_sparse_attention(q, k, v, lay, return_lse=True, backend=be)
            calls[name + " backward"] = partial(
                block_sparse_attention_backward, out, q, k, v, out, lse, lay, backend=be
            )
    calls = {name: device.call(fn) for name, fn in calls.items()}
    gemm, gemm_dtype = device.gemm_rate(q.dtype)
    best = _interleaved_best(calls, args.repeat, args.progress)
    dense_s = best["dense"]
    dense_flops = 4.0 * args.batch * args.heads * args.seq * args.seq * args.dim
    result: dict[str, Any] = {
        "benchmark": "block-sparse",
        "device": device.describe(),
        "backend": be,
        "batch": args.batch,
        "heads": args.heads,
        "seq": args.seq,
        "dim": args.dim,
        "block": args.block,
        "dtype": args.dtype,
        "gemm_gflops": gemm,
        "gemm_dtype": gemm_dtype,
        "dense_forward_s": dense_s,
        "dense_forward_gflops": dense_flops / dense_s / 1e9,
    }
    records = []
    for name, lay in items:
        fwd = best[name]
        flops = block_flops(lay, args.batch, args.heads, args.dim)
        row: dict[str, Any] = {
            "layout": name,
            "density": lay.density,
            "forward_s": fwd,
            "forward_gflops": flops / fwd / 1e9,
            "speedup": dense_s / fwd,
            "cost_ratio": fwd / (lay.density * dense_s),
        }
        if args.backward:
            bwd = best[name + " backward"]
            row.update(backward_s=bwd, backward_cost_ratio=bwd / (lay.density * best["dense backward"]))
            row["backward_gflops"] = (
                BACKWARD_FLOP_RATIO * block_flops(lay, args.batch, args.heads, args.dim) / bwd / 1e9
            )
        records.append(row)
    if args.backward:
        result["dense_backward_s"] = best["dense backward"]
    densest = max(items, key=lambda item: item[1].density)[1]
    (out, lse), peak, method = device.peak_memory(
        lambda: block_sparse_attention(q, k, v, densest, return_lse=True, backend=be)
    )
    rows = min(args.seq, 128)
    ref = reference_rows(*host, densest, rows)
    ours = device.get(out[0, 0, -rows:]).astype(np.float64)
    result.update(
        rows=records,
        forward_extra_bytes=max(peak - out.nbytes - lse.nbytes, 0),
        memory_method=method,
        max_rel_error=float(np.abs(ours - ref).max() / np.abs(ref).max()),
    )
    print(render(result))
    return result


def render(result: dict) -> str:
    """The table printed by ``bench block-sparse``, with the dense line and the memory/error footer."""
    backward = "dense_backward_s" in result
    headers = ["layout", "density", "fwd ms", "fwd rate", "speed-up", "cost ratio"]
    if backward:
        headers += ["bwd ms", "bwd rate", "bwd cost ratio"]
    rows = [["dense tiled (attention)", "100.0%", f"{result['dense_forward_s'] * 1e3:.1f}",
             format_rate(result["dense_forward_gflops"]), "1.0x", "1.00"]]  # fmt: skip
    if backward:
        rows[0] += [f"{result['dense_backward_s'] * 1e3:.1f}", "-", "1.00"]
    for r in result["rows"]:
        line = [r["layout"], f"{r['density']:.1%}", f"{r['forward_s'] * 1e3:.1f}", format_rate(r["forward_gflops"]),
                f"{r['speedup']:.1f}x", f"{r['cost_ratio']:.2f}"]  # fmt: skip
        if backward:
            line += [
                f"{r['backward_s'] * 1e3:.1f}",
                format_rate(r["backward_gflops"]),
                f"{r['backward_cost_ratio']:.2f}",
            ]
        rows.append(line)
    head = (
        f"{result['device']}; B={result['batch']} H={result['heads']} L={result['seq']} D={result['dim']} "
        f"block={result['block']} {result['dtype']}; same-run GEMM ({result['gemm_dtype']}): "
        f"{format_rate(result['gemm_gflops'])}; cost ratio = time / (density x dense time)"
    )
    foot = (
        f"peak extra memory of the densest forward: {format_bytes(result['forward_extra_bytes'])} beyond inputs "
        f"and output (measured by {result['memory_method']}); max rel error of the last rows vs float64: "
        f"{result['max_rel_error']:.1e}"
    )
    return "\n".join([head, format_table(headers, rows), foot])
