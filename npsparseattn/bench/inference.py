"""``npsparseattn bench inference``: KV-cache decoding against PyTorch SDPA and paged caches; varlen against padding.

Three tables, every contender measured side by side in one run and
interleaved (round after round, each contender timed once per round; the
best and the median over the rounds are kept), so a noisy neighbour slows
all of them alike:

* decode: one query per sequence (``Lq = 1``) against a long KV cache,
  ``attention_with_kvcache`` on a contiguous cache and on paged caches (pages
  shuffled in memory), and PyTorch's ``scaled_dot_product_attention`` with
  ``enable_gqa`` on the same (contiguous) tensors when PyTorch is installed;
  the rate is the bytes of K and V read per second;
* varlen: ``attention_varlen`` on sequences of mixed lengths against
  ``attention`` on the same batch padded to the longest, with the padding's
  share of tokens and of attention FLOPs beside the measured speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from npsparseattn import reference
from npsparseattn.bench.common import attention_flops, best_time, format_table
from npsparseattn.exact import attention
from npsparseattn.kvcache import attention_with_kvcache
from npsparseattn.varlen import attention_varlen

SETTLE_SECONDS = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bench inference``."""
    parser.add_argument("--cache", type=int, nargs="+", default=[32768], help="KV-cache lengths Lk of the decode")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--q-heads", type=int, default=32, help="query heads Hq")
    parser.add_argument("--kv-heads", type=int, default=8, help="key/value heads Hk")
    parser.add_argument("--dim", type=int, default=128, help="head dimension D")
    parser.add_argument("--page-size", type=int, nargs="+", default=[256, 16], help="page sizes of the paged caches")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (best and median are reported)")
    parser.add_argument("--repeat", type=int, default=3, help="calls per contender per round (best is kept)")
    parser.add_argument("--varlen-seqs", type=int, default=16, help="sequences in the varlen batch (0 skips it)")
    parser.add_argument("--varlen-max", type=int, default=2048, help="longest varlen sequence")
    parser.add_argument("--varlen-heads", type=int, default=8)
    parser.add_argument("--varlen-dim", type=int, default=64)
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch SDPA out")


def check_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with a combination of options (the command line checks each count on its own), or ``None``."""
    if args.q_heads % args.kv_heads:
        return f"--q-heads {args.q_heads} must be a multiple of --kv-heads {args.kv_heads} (grouped-query attention)"
    return None


def interleaved(contenders: dict[str, Callable[[], Any]], rounds: int, repeat: int) -> dict[str, dict[str, float]]:
    """Best and median seconds of each contender over ``rounds`` rounds, one timing of each per round."""
    for fn in contenders.values():
        fn()  # warm up (compilation, page faults)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            time.sleep(SETTLE_SECONDS)  # let the other contender's spinning thread pool go quiet
            times[name].append(best_time(fn, repeat=repeat, warmup=0))
    return {name: {"best_s": min(t), "median_s": statistics.median(t)} for name, t in times.items()}


def _torch_sdpa(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[Callable[[], Any] | None, str]:
    """PyTorch SDPA on the same arrays (shared memory), or ``None`` and the reason it is left out."""
    try:
        import torch
    except ImportError:
        return None, "PyTorch is not installed"
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def call() -> Any:
        with torch.no_grad():
            return sdpa(tq, tk, tv, enable_gqa=True)

    return call, f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def paged_copy(cache: np.ndarray, page_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A (B, Hk, L, D) cache as shuffled pages (P, Hk, page_size, D) and its block table (B, L // page_size)."""
    batch, heads, length, dim = cache.shape
    per_seq = -(-length // page_size)
    padded = np.zeros((batch, heads, per_seq * page_size, dim), cache.dtype)
    padded[:, :, :length] = cache
    pages = padded.reshape(batch, heads, per_seq, page_size, dim).transpose(0, 2, 1, 3, 4)
    pages = pages.reshape(batch * per_seq, heads, page_size, dim)
    where = rng.permutation(batch * per_seq)
    shuffled = np.empty(pages.shape, cache.dtype)  # C order, as a page pool is allocated
    shuffled[where] = pages
    return shuffled, where.reshape(batch, per_seq).astype(np.int32)


def decode(args: argparse.Namespace, length: int) -> dict:
    """One decode configuration: every contender's times, the KV bytes read per second, the errors."""
    rng = np.random.default_rng(length)
    dtype = np.dtype(args.dtype)
    b, hq, hk, d = args.batch, args.q_heads, args.kv_heads, args.dim
    q = rng.standard_normal((b, hq, 1, d)).astype(dtype)
    k, v = (rng.standard_normal((b, hk, length, d)).astype(dtype) for _ in range(2))
    lengths = np.full(b, length, np.int32)
    contenders: dict[str, Callable[[], Any]] = {
        "contiguous": lambda: attention_with_kvcache(q, k, v, cache_seqlens=lengths)
    }
    for page_size in args.page_size:
        kp, table = paged_copy(k, page_size, np.random.default_rng(page_size))
        vp, _ = paged_copy(v, page_size, np.random.default_rng(page_size))  # the same shuffle
        contenders[f"paged {page_size}"] = lambda kp=kp, vp=vp, table=table: attention_with_kvcache(
            q, kp, vp, cache_seqlens=lengths, block_table=table
        )
    sdpa, torch_note = (None, "--no-torch") if args.no_torch else _torch_sdpa(q, k, v)
    if sdpa is not None:
        contenders["torch SDPA"] = sdpa
    expected, _ = reference.attention(q, k, v, causal=True)
    errors = {}
    for name, fn in contenders.items():
        got = np.asarray(fn(), dtype=np.float64)
        errors[name] = float(np.abs(got - expected).max() / np.abs(expected).max())
    timing = interleaved(contenders, args.rounds, args.repeat)
    kv_bytes = k.nbytes + v.nbytes
    return {
        "batch": b, "q_heads": hq, "kv_heads": hk, "dim": d, "cache": length, "dtype": args.dtype,
        "kv_bytes": kv_bytes, "torch": torch_note,
        "contenders": {
            name: {**t, "kv_gb_per_s": kv_bytes / t["best_s"] / 1e9, "max_rel_error": errors[name]}
            for name, t in timing.items()
        },
    }  # fmt: skip


def varlen_lengths(n: int, longest: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` mixed lengths: log-uniform between ``longest / 32`` and ``longest``, the longest included."""
    lengths = np.exp(rng.uniform(np.log(max(1, longest // 32)), np.log(longest), n)).astype(np.int64)
    lengths[0] = longest
    return lengths


def varlen(args: argparse.Namespace) -> dict:
    """Packed mixed lengths against the same batch padded to the longest (causal, forward)."""
    rng = np.random.default_rng(0)
    dtype = np.dtype(args.dtype)
    h, d = args.varlen_heads, args.varlen_dim
    lengths = varlen_lengths(args.varlen_seqs, args.varlen_max, rng)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    q, k, v = (rng.standard_normal((h, int(cu[-1]), d)).astype(dtype) for _ in range(3))
    padded = np.zeros((3, len(lengths), h, args.varlen_max, d), dtype)
    for s, n in enumerate(lengths):  # left-aligned; rows past a sequence's end are padding
        for slot, x in enumerate((q, k, v)):
            padded[slot, s, :, :n] = x[:, cu[s] : cu[s + 1]]
    contenders = {
        "varlen": lambda: attention_varlen(q, k, v, cu, cu, causal=True),
        "padded": lambda: attention(*padded, causal=True),
    }
    packed = contenders["varlen"]()
    unpacked = contenders["padded"]()
    difference = max(
        (float(np.abs(unpacked[s, :, :n] - packed[:, cu[s] : cu[s + 1]]).max()) for s, n in enumerate(lengths)),
        default=0.0,
    )
    timing = interleaved(contenders, args.rounds, args.repeat)
    real_flops = sum(attention_flops(1, h, int(n), int(n), d, causal=True) for n in lengths)
    padded_flops = attention_flops(len(lengths), h, args.varlen_max, args.varlen_max, d, causal=True)
    return {
        "lengths": lengths.tolist(), "heads": h, "dim": d, "dtype": args.dtype,
        "real_tokens": int(cu[-1]), "padded_tokens": len(lengths) * args.varlen_max,
        "real_gflop": real_flops / 1e9, "padded_gflop": padded_flops / 1e9,
        "flop_ratio": padded_flops / real_flops, "token_ratio": len(lengths) * args.varlen_max / int(cu[-1]),
        "speedup_best": timing["padded"]["best_s"] / timing["varlen"]["best_s"],
        "speedup_median": timing["padded"]["median_s"] / timing["varlen"]["median_s"],
        "varlen_gflops": real_flops / timing["varlen"]["best_s"] / 1e9,
        "padded_gflops": padded_flops / timing["padded"]["best_s"] / 1e9,
        "max_abs_difference": difference, "contenders": timing,
    }  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    """Run the decode and varlen comparisons described by ``args``; print the tables; return the records."""
    decodes = [decode(args, length) for length in args.progress(args.cache, desc="decode")]
    print(render_decode(decodes))
    result: dict[str, Any] = {"benchmark": "inference", "decode": decodes, "rounds": args.rounds}
    if args.varlen_seqs:
        result["varlen"] = varlen(args)
        print()
        print(render_varlen(result["varlen"]))
    return result


def render_decode(records: list[dict]) -> str:
    """The decode table: per cache length and contender, times, KV GB/s, speed against SDPA and contiguous."""
    headers = ["Lk", "contender", "best ms", "median ms", "KV GB/s", "SDPA / this", "this / contiguous", "rel err"]
    rows = []
    for r in records:
        c = r["contenders"]
        sdpa = c.get("torch SDPA", {}).get("median_s")
        for name, t in c.items():
            rows.append([
                str(r["cache"]), name, f"{t['best_s'] * 1e3:.2f}", f"{t['median_s'] * 1e3:.2f}",
                f"{t['kv_gb_per_s']:.1f}", f"{sdpa / t['median_s']:.2f}x" if sdpa else "-",
                f"{t['median_s'] / c['contiguous']['median_s']:.2f}", f"{t['max_rel_error']:.1e}",
            ])  # fmt: skip
    first = records[0] if records else {}
    title = (
        f"decode: B={first.get('batch')} Hq={first.get('q_heads')} Hk={first.get('kv_heads')} D={first.get('dim')} "
        f"Lq=1 {first.get('dtype')}; {first.get('torch')}; ratios of medians"
    )
    return title + "\n" + format_table(headers, rows)


def render_varlen(r: dict) -> str:
    """The varlen table: packed against padded, with the padding's share of tokens and FLOPs."""
    headers = ["contender", "best ms", "median ms", "GFLOP", "GF/s"]
    rows = []
    for name, gflop, rate in (("varlen", "real_gflop", "varlen_gflops"), ("padded", "padded_gflop", "padded_gflops")):
        t = r["contenders"][name]
        rows.append(
            [name, f"{t['best_s'] * 1e3:.1f}", f"{t['median_s'] * 1e3:.1f}", f"{r[gflop]:.2f}", f"{r[rate]:.1f}"]
        )
    title = (
        f"varlen: {len(r['lengths'])} causal sequences, {r['real_tokens']} tokens (padded: {r['padded_tokens']}), "
        f"H={r['heads']} D={r['dim']} {r['dtype']}\n"
        f"padding: {r['token_ratio']:.2f}x the tokens, {r['flop_ratio']:.2f}x the FLOPs; "
        f"measured speed-up {r['speedup_median']:.2f}x (medians), {r['speedup_best']:.2f}x (best); "
        f"outputs agree to {r['max_abs_difference']:.1e}"
    )
    return title + "\n" + format_table(headers, rows)
