"""``npsparseattn bench sparse``: index-driven sparse attention against density, beside dense and FlexAttention.

One run times, on the same inputs: dense tiled ``attention`` (no mask) and
``sparse_attention`` with random lists of key blocks (every query block of
every key head picks ``density x nkb`` distinct blocks at random, a seeded
draw), density by density (5/10/20/50 % by default), plus two shapes the
routers produce: *tokens* (``kv_block=1``, DSA-style scattered tokens, 10 %)
and *per query* (``q_block=1``, NSA-style lists per query, 64-key blocks,
10 %).  The FLOP rate counts the selected pairs only (``4 * D`` per query-key
pair; 2.5x for the backward), and *of dense* is that rate over the dense
kernel's rate in the same run: 1.0 means the selected blocks run as fast as
dense attention does.

``--compare flex`` (the default when PyTorch is installed) times PyTorch's
FlexAttention on the same block lists (``BlockMask.from_kv_blocks``, the same
format), compiled by ``torch.compile`` for the CPU (Inductor's C++ backend,
which needs a C++ compiler), forward only (its CPU path has no backward);
when it cannot run, the table says why.  All calls run interleaved, round by
round, best of ``--repeat``; compilation happens before timing.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from npsparseattn.bench import device as devices
from npsparseattn.bench.common import BACKWARD_FLOP_RATIO, format_rate, format_table, interleaved_best
from npsparseattn.exact import attention, attention_backward
from npsparseattn.problems.sparse import sparse_problem
from npsparseattn.sparse import sparse_attention, sparse_attention_backward

COMPARE_CHOICES = ("flex", "none")


@dataclass(frozen=True)
class Case:
    """One sparse configuration: its label, blocks and random lists."""

    name: str
    density: float
    q_block: int
    kv_block: int
    kv_idx: np.ndarray
    kv_cnt: np.ndarray

    @property
    def blocks(self) -> dict[str, int]:
        return {"q_block": self.q_block, "kv_block": self.kv_block}

    @property
    def kv_heads(self) -> int:
        return self.kv_idx.shape[1]

    def pairs(self, seq_q: int, seq_k: int, group: int) -> float:
        """Selected (query, key) pairs over every query head (``group`` query heads per list)."""
        nqb = self.kv_idx.shape[2]
        rows = np.minimum(self.q_block, seq_q - np.arange(nqb) * self.q_block)
        keys = np.minimum(self.kv_block, seq_k - self.kv_idx.astype(np.int64) * self.kv_block)
        keys = np.where(np.arange(self.kv_idx.shape[3]) < self.kv_cnt[..., None], keys, 0).sum(axis=3)
        return float((keys * rows).sum() * group)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bench sparse``."""
    parser.add_argument("--seq", type=int, default=8192, help="sequence length L (default 8192)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4, help="query heads (default 4)")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    parser.add_argument("--dim", type=int, default=64, help="head dimension D")
    parser.add_argument("--block", type=int, default=64, help="q_block and kv_block of the density sweep")
    parser.add_argument(
        "--densities", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5], help="fractions of key blocks per list"
    )
    parser.add_argument("--no-shapes", action="store_true", help="skip the token-mode and per-query cases")
    parser.add_argument("--backward", action="store_true", help="also time the backward")
    parser.add_argument("--compare", choices=COMPARE_CHOICES, default="flex", help="FlexAttention beside (default)")
    devices.add_arguments(parser, "sparse_attention", dtypes=("float32", "float64"))
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the best of each call is kept")


def random_lists(rng, n_batch: int, heads: int, nqb: int, nkb: int, density: float) -> tuple[np.ndarray, np.ndarray]:
    """``round(density * nkb)`` (at least 1) distinct random key blocks per list: ``(kv_idx, kv_cnt)`` int32."""
    picks = max(1, min(nkb, round(density * nkb)))
    kv_idx = np.argsort(rng.random((n_batch, heads, nqb, nkb)), axis=-1)[..., :picks]
    return np.sort(kv_idx, axis=-1).astype(np.int32), np.full((n_batch, heads, nqb), picks, np.int32)


def cases(args: argparse.Namespace, kv_heads: int) -> list[Case]:
    """The density sweep, then the token-mode and per-query shapes."""
    rng = np.random.default_rng(0)
    seq, block = args.seq, args.block
    nb = -(-seq // block)
    items = []
    for density in args.densities:
        idx, cnt = random_lists(rng, args.batch, kv_heads, nb, nb, density)
        items.append(Case(f"blocks {block}x{block}", density, block, block, idx, cnt))
    if not args.no_shapes:
        idx, cnt = random_lists(rng, args.batch, kv_heads, nb, seq, 0.1)
        items.append(Case(f"tokens ({block}-query blocks)", 0.1, block, 1, idx, cnt))
        idx, cnt = random_lists(rng, args.batch, kv_heads, seq, nb, 0.1)
        items.append(Case(f"per query, Hk={kv_heads}", 0.1, 1, block, idx, cnt))
        if kv_heads > 1:  # NSA's setting: the lists of a GQA group, its heads stacked
            idx, cnt = random_lists(rng, args.batch, 1, seq, nb, 0.1)
            items.append(Case("per query, Hk=1", 0.1, 1, block, idx, cnt))
    return items


class Flex:
    """PyTorch FlexAttention on the CPU, compiled once per block-list shape, on the benchmark's arrays."""

    def __init__(self, q: np.ndarray, threads: int):
        import torch
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        torch.set_num_threads(threads)
        self.torch, self.block_mask = torch, BlockMask
        self.q = torch.from_numpy(np.ascontiguousarray(q))
        self.kernel = torch.compile(flex_attention)

    def call(self, case: Case | None, k: np.ndarray, v: np.ndarray) -> Callable[[], Any]:
        """The forward on ``case``'s lists (``None``: no mask), compiled and run once before it is returned."""
        torch = self.torch
        tk, tv = torch.from_numpy(k), torch.from_numpy(v)
        gqa = self.q.shape[1] != k.shape[1]
        mask = None
        if case is not None:
            group = self.q.shape[1] // case.kv_idx.shape[1]
            n_key_blocks = -(-k.shape[2] // case.kv_block)
            lists = np.zeros(case.kv_idx.shape[:3] + (n_key_blocks,), np.int32)  # FlexAttention's width: every block
            lists[..., : case.kv_idx.shape[3]] = np.maximum(case.kv_idx, 0)
            cnt = torch.from_numpy(np.repeat(case.kv_cnt, group, axis=1))
            idx = torch.from_numpy(np.repeat(lists, group, axis=1))
            # the lists as partial blocks with no mask_mod: passed as full blocks (kv_num_blocks 0), Inductor's
            # CPU template failed to compile (torch 2.13: "'kv_indices' was not declared in this scope")
            mask = self.block_mask.from_kv_blocks(
                cnt, idx, BLOCK_SIZE=(case.q_block, case.kv_block), seq_lengths=(self.q.shape[2], k.shape[2])
            )

        def forward() -> Any:
            with torch.no_grad():
                return self.kernel(self.q, tk, tv, block_mask=mask, enable_gqa=gqa)

        forward()
        return forward

    def version(self) -> str:
        threads = self.torch.get_num_threads()
        return f"PyTorch {self.torch.__version__} FlexAttention (torch.compile, CPU, {threads} threads)"


def _flex(args: argparse.Namespace, q, kv: dict, items: list[Case], threads: int) -> tuple[dict[str, Callable], str]:
    """FlexAttention's calls by result key and a description, or no calls and the reason it cannot run.

    ``kv`` maps a key-head count to its ``(k, v)``.
    """
    if args.compare != "flex":
        return {}, "not compared (--compare none)"
    start = time.perf_counter()
    try:
        flex = Flex(q, threads)
        calls = {"flex dense": flex.call(None, *kv[max(kv)])}
        for case in items:
            calls[f"flex {case.name} {case.density:.0%}"] = flex.call(case, *kv[case.kv_heads])
    except Exception as exc:  # any failure of the optional comparison is reported in the table, not raised
        return {}, f"FlexAttention could not run here: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return calls, f"{flex.version()}, compiled in {time.perf_counter() - start:.0f} s"


def _refusal(device: devices.Device, case: Case, q: np.ndarray, k: np.ndarray) -> str:
    """Why the benchmark's backend cannot run ``case`` on host arrays ``q``, ``k`` (the registry's reasons), or
    ``""``."""
    kv = k[:, : case.kv_heads]
    problem = sparse_problem(q, kv, kv, case.kv_idx, kv_cnt=case.kv_cnt, **case.blocks)
    return device.refusal("sparse_attention", problem)


def run(args: argparse.Namespace) -> dict:
    """Time dense attention, each sparse case and FlexAttention; print the table; return the records."""
    from numba import get_num_threads

    kv_heads = args.heads if args.kv_heads is None else args.kv_heads
    if kv_heads < 1 or args.heads % kv_heads:
        raise SystemExit(f"npsparseattn bench: --heads {args.heads} must be a multiple of --kv-heads {kv_heads} >= 1")
    if not all(0 < d <= 1 for d in args.densities):
        raise SystemExit(f"npsparseattn bench: --densities must lie in (0, 1], got {args.densities}")
    dtype = devices.numpy_dtype(args.dtype)

    def problem():
        x = np.ones((1, args.heads, 8, args.dim), dtype)
        return sparse_problem(x, x[:, :kv_heads], x[:, :kv_heads], np.zeros((1, kv_heads, 1, 1), np.int32), q_block=8)

    device = devices.device_for("sparse_attention", args.backend, problem)
    be = args.backend
    rng = np.random.default_rng(1)
    host_q = rng.standard_normal((args.batch, args.heads, args.seq, args.dim)).astype(dtype)
    host_kv = [rng.standard_normal((args.batch, kv_heads, args.seq, args.dim)).astype(dtype) for _ in range(2)]
    q, k, v = (device.put(x) for x in (host_q, *host_kv))
    items: list[Case] = []
    refused: list[str] = []  # a GPU backend refuses some list shapes (token mode): said under the table
    for case in cases(args, kv_heads):
        reasons = _refusal(device, case, host_q, host_kv[0])
        if reasons:
            refused.append(f"{case.name}: {reasons}")
        else:
            items.append(case)
    contiguous = device.xp.ascontiguousarray
    kv = {h: (contiguous(k[:, :h]), contiguous(v[:, :h])) for h in {c.kv_heads for c in items}}
    kv[kv_heads] = (k, v)
    calls: dict[str, Callable[[], Any]] = {"dense": partial(attention, q, k, v, backend=be)}
    for case in items:
        kv_idx = device.put(case.kv_idx)
        kw = dict(kv_cnt=device.put(case.kv_cnt), backend=be, **case.blocks)
        key = f"{case.name} {case.density:.0%}"
        ck, cv = kv[case.kv_heads]
        calls[key] = partial(sparse_attention, q, ck, cv, kv_idx, **kw)
        if args.backward:
            out, lse = sparse_attention(q, ck, cv, kv_idx, return_lse=True, **kw)
            calls[key + " backward"] = partial(sparse_attention_backward, out, q, ck, cv, out, lse, kv_idx, **kw)
    if args.backward:
        out, lse = attention(q, k, v, return_lse=True, backend=be)
        calls["dense backward"] = partial(attention_backward, out, q, k, v, out, lse, backend=be)
    calls = {name: device.call(fn) for name, fn in calls.items()}
    for fn in calls.values():  # compile (or load) every kernel before anything is timed
        fn()
    if device.kind == "numpy":
        flex_calls, flex_note = _flex(args, q, kv, items, get_num_threads())
    else:
        flex_calls, flex_note = {}, "not compared (its CPU build is the comparison; this table is a GPU backend's)"
    calls.update(flex_calls)
    gemm, gemm_dtype = device.gemm_rate(dtype)
    best = interleaved_best(calls, args.repeat, settle=0.1)
    dense_flops = 4.0 * args.batch * args.heads * args.seq * args.seq * args.dim
    dense_rate = dense_flops / best["dense"] / 1e9
    records = []
    for case in items:
        key = f"{case.name} {case.density:.0%}"
        flops = 4.0 * case.pairs(args.seq, args.seq, args.heads // case.kv_heads) * args.dim
        row: dict[str, Any] = {
            "case": case.name,
            "kv_heads": case.kv_heads,
            "q_block": case.q_block,
            "kv_block": case.kv_block,
            "density": case.density,
            "forward_s": best[key],
            "forward_gflops": flops / best[key] / 1e9,
            "of_dense": flops / best[key] / 1e9 / dense_rate,
        }
        if "flex " + key in best:
            row["flex_forward_s"] = best["flex " + key]
            row["flex_of_dense"] = flops / best["flex " + key] / 1e9 / dense_rate
        if args.backward:
            backward_rate = BACKWARD_FLOP_RATIO * flops / best[key + " backward"] / 1e9
            row.update(backward_s=best[key + " backward"], backward_gflops=backward_rate)
            row["backward_of_dense"] = backward_rate / (
                BACKWARD_FLOP_RATIO * dense_flops / best["dense backward"] / 1e9
            )
        records.append(row)
    result = {
        "benchmark": "sparse",
        "device": device.describe(),
        "backend": be,
        "batch": args.batch,
        "heads": args.heads,
        "kv_heads": kv_heads,
        "seq": args.seq,
        "dim": args.dim,
        "dtype": args.dtype,
        "threads": get_num_threads(),
        "gemm_gflops": gemm,
        "gemm_dtype": gemm_dtype,
        "dense_forward_s": best["dense"],
        "dense_forward_gflops": dense_rate,
        "flex": flex_note,
        "refused": refused,
        "rows": records,
    }
    if "flex dense" in best:
        result["flex_dense_forward_s"] = best["flex dense"]
    if args.backward:
        result["dense_backward_s"] = best["dense backward"]
    print(render(result))
    return result


def render(result: dict) -> str:
    """The table printed by ``bench sparse``."""
    backward = "dense_backward_s" in result
    headers = ["case", "density", "fwd ms", "fwd rate", "of dense", "flex fwd ms", "flex of dense", "vs flex"]
    if backward:
        headers += ["bwd ms", "bwd rate", "bwd of dense"]
    flex_dense = result.get("flex_dense_forward_s")
    dense = ["dense tiled (attention)", "100%", f"{result['dense_forward_s'] * 1e3:.1f}",
             format_rate(result["dense_forward_gflops"]), "1.00",
             f"{flex_dense * 1e3:.1f}" if flex_dense else "-",
             f"{result['dense_forward_s'] / flex_dense:.2f}" if flex_dense else "-",
             f"{flex_dense / result['dense_forward_s']:.1f}x" if flex_dense else "-"]  # fmt: skip
    if backward:
        dense += [f"{result['dense_backward_s'] * 1e3:.1f}", "-", "1.00"]
    rows = [dense]
    for r in result["rows"]:
        flex = "flex_forward_s" in r
        line = [f"{r['case']} (q {r['q_block']}, kv {r['kv_block']})", f"{r['density']:.0%}",
                f"{r['forward_s'] * 1e3:.1f}", format_rate(r["forward_gflops"]), f"{r['of_dense']:.2f}",
                f"{r['flex_forward_s'] * 1e3:.1f}" if flex else "n/a", f"{r['flex_of_dense']:.2f}" if flex else "n/a",
                f"{r['flex_forward_s'] / r['forward_s']:.1f}x" if flex else "n/a"]  # fmt: skip
        if backward:
            line += [f"{r['backward_s'] * 1e3:.1f}", format_rate(r["backward_gflops"]), f"{r['backward_of_dense']:.2f}"]
        rows.append(line)
    head = (
        f"{result['device']}, {result['threads']} threads; B={result['batch']} H={result['heads']} "
        f"Hk={result['kv_heads']} L={result['seq']} D={result['dim']} {result['dtype']}; same-run GEMM "
        f"({result['gemm_dtype']}): {format_rate(result['gemm_gflops'])}; rates count the selected pairs; "
        f"'of dense' = rate / dense tiled rate"
    )
    foot = f"FlexAttention: {result['flex']}"
    if result.get("refused"):
        foot += "\nnot run on this backend: " + "; ".join(result["refused"])
    return "\n".join([head, format_table(headers, rows), foot])
