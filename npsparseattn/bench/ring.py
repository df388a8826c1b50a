"""``npsparseattn bench ring``: context-parallel attention over MPI, every mode, against one process.

Launch it under MPI, one rank per core share, e.g. on a 2-core machine::

    mpiexec -n 2 npsparseattn bench ring                 # L = 16384, H = 4, D = 64, float32, every mode

For each mode (ring with zigzag and contiguous shards, Ulysses, hybrid where
the ranks split into groups, all-gather) and causal setting it reports,
measured side by side in one run: the forward (and backward) time, the time
of single-process tiled attention on the whole sequence with all the cores
the ranks share (the same total work), their ratio, each rank's compute time
and the time it spent blocked waiting for data (communication not hidden
behind compute: the overlap), the bytes each rank sent, the time the ring's
K/V transfers alone take, the compute imbalance between ranks (max/min over
ranks; for the ring also at the worst step) and the error of the gathered
output against the single-process one.  numba threads per rank default to
the cores of the node divided by the ranks on it.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

from npsparseattn.bench.common import attention_flops, format_table
from npsparseattn.context_parallel import context_parallel_attention, context_parallel_attention_backward
from npsparseattn.distributed.base import Communicator, Transfer
from npsparseattn.exact import attention, attention_backward
from npsparseattn.ring import shard, unshard

MODES = ("ring", "ulysses", "hybrid", "allgather")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bench ring``."""
    parser.add_argument("--seq", type=int, default=16384, help="total sequence length L (all ranks together)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, help="key/value heads (grouped-query attention; default: --heads)")
    parser.add_argument(
        "--mode", nargs="+", choices=[*MODES, "all"], default=["all"], help="context-parallel modes to measure"
    )
    parser.add_argument(
        "--ulysses-size", type=int, default=0, help="ranks per Ulysses group in hybrid mode (0: 2 when that splits)"
    )
    parser.add_argument("--dim", type=int, default=64, help="head dimension D")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--causal", choices=["no", "yes", "both"], default="both")
    parser.add_argument(
        "--sharding", choices=["zigzag", "contiguous", "both"], default="both", help="of the ring mode (others: zigzag)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds of interleaved measurements (the best of each series is kept)"
    )
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    parser.add_argument("--threads", type=int, default=0, help="numba threads per rank (0: cores / ranks per node)")


class TimedComm(Communicator):
    """Wraps a communicator and records when each transfer was waited for (sub-communicators too)."""

    def __init__(self, inner: Communicator, waits: list[tuple[float, float]] | None = None):
        self.inner = inner
        self.rank, self.size, self.timeout, self.kinds = inner.rank, inner.size, inner.timeout, inner.kinds
        self.synced = 0.0
        self.waits: list[tuple[float, float]] = [] if waits is None else waits
        self.share_traffic(inner)

    def reset(self) -> None:
        self.synced = 0.0
        self.waits.clear()
        self.traffic.reset()

    def exchange(self, send, dest, recv, source, *, tag=0) -> Transfer:
        return self.inner.exchange(send, dest, recv, source, tag=tag)

    def alltoallv(self, send, send_counts, send_displs, recv, recv_counts, recv_displs) -> Transfer:
        return self.inner.alltoallv(send, send_counts, send_displs, recv, recv_counts, recv_displs)

    def allgatherv(self, send, recv, counts) -> Transfer:
        return self.inner.allgatherv(send, recv, counts)

    def split(self, color: int, key: int) -> TimedComm:
        return TimedComm(self.inner.split(color, key), self.waits)

    def wait(self, transfer: Transfer) -> None:
        start = time.perf_counter()
        self.inner.wait(transfer)
        self.waits.append((start, time.perf_counter()))

    def allreduce(self, values, op="sum"):
        result = self.inner.allreduce(values, op)
        self.synced = time.perf_counter()
        return result

    def barrier(self) -> None:
        self.inner.barrier()

    def step_compute(self, end: float) -> list[float]:
        """Compute time of each forward step.

        A step runs from the end of the previous wait (or of the argument check) to its own wait.
        """
        starts = [self.synced] + [w[1] for w in self.waits]
        stops = [w[0] for w in self.waits] + [end]
        return [b - a for a, b in zip(starts, stops)]


def _timed(comm: TimedComm, fn) -> dict:
    """One call of ``fn()`` after a barrier: wall time, this rank's compute/wait split, what it sent."""
    comm.barrier()
    comm.reset()
    start = time.perf_counter()
    result = fn()
    end = time.perf_counter()
    steps = comm.step_compute(end)
    wait = sum(b - a for a, b in comm.waits)
    sent = [comm.traffic.messages, comm.traffic.bytes]
    return dict(wall=end - start, wait=wait, compute=sum(steps), steps=steps, sent=sent, result=result)


def _transfer_only(comm: Communicator, arrays: list[np.ndarray]) -> float:
    """Seconds to pass this rank's K/V shard around the ring P-1 times with no compute."""
    comm.barrier()
    current = arrays
    start = time.perf_counter()
    for _ in range(comm.size - 1):
        incoming = [np.empty_like(x) for x in current]
        comm.wait(comm.shift(current, incoming))
        current = incoming
    return time.perf_counter() - start


def _import_comm():
    from npsparseattn.distributed.mpi import INSTALL_HINT, MPIComm

    try:
        return MPIComm()
    except ImportError as err:
        raise SystemExit(f"bench ring runs over MPI: {INSTALL_HINT}") from err


def _threads_per_rank(comm, requested: int) -> int:
    if requested > 0:
        return requested
    _, local_size = comm.local_rank()
    return max(1, (os.cpu_count() or 1) // local_size)


def variants(args: argparse.Namespace, size: int) -> tuple[list[dict], list[str]]:
    """The (mode, sharding, ulysses_size) rows to measure, and why requested modes were left out."""
    from npsparseattn.context_parallel.heads import head_rule_error

    modes = list(MODES) if "all" in args.mode else list(dict.fromkeys(args.mode))
    shardings = ["zigzag", "contiguous"] if args.sharding == "both" else [args.sharding]
    kv_heads = args.kv_heads or args.heads
    found, skipped = [], []
    for mode in modes:
        if mode == "ring":
            found += [dict(mode="ring", sharding=sharding, ulysses_size=None) for sharding in shardings]
            continue
        if mode == "allgather":
            found.append(dict(mode="allgather", sharding="zigzag", ulysses_size=None))
            continue
        group = size if mode == "ulysses" else args.ulysses_size or (2 if size > 2 and size % 2 == 0 else 0)
        if mode == "hybrid" and (group in (0, 1, size) or size % group):
            skipped.append(f"hybrid: needs a Ulysses group size that splits the {size} ranks (--ulysses-size)")
            continue
        reason = head_rule_error(args.heads, kv_heads, group)
        if reason:
            skipped.append(f"{mode}: {reason}")
            continue
        found.append(dict(mode=mode, sharding="zigzag", ulysses_size=group if mode == "hybrid" else None))
    return found, skipped


def label(variant: dict) -> str:
    """``ring/zigzag``, ``ulysses``, ``hybrid U=2``, ``allgather``."""
    if variant["mode"] == "ring":
        return f"ring/{variant['sharding']}"
    if variant["mode"] == "hybrid":
        return f"hybrid U={variant['ulysses_size']}"
    return variant["mode"]


def run(args: argparse.Namespace) -> dict:
    """Run the sweep under MPI; rank 0 prints the table and returns the records (other ranks return them too)."""
    import numba

    comm = _import_comm()
    if comm.size < 2:
        raise SystemExit(
            "bench ring measures context-parallel attention across MPI ranks and needs at least 2: run it as\n"
            "    mpiexec -n 2 npsparseattn bench ring\n"
            "(mpiexec comes with `pip install 'npsparseattn[mpi]'`, next to this Python)"
        )
    if comm.rank != 0:
        args.json = None  # one writer
        if hasattr(args, "plot"):
            args.plot = None
    all_threads = numba.get_num_threads()
    threads = _threads_per_rank(comm, args.threads)
    timed = TimedComm(comm)
    rng = np.random.default_rng(args.seq)
    kv_heads = args.kv_heads or args.heads
    q = rng.standard_normal((args.batch, args.heads, args.seq, args.dim), dtype=np.float64).astype(args.dtype)
    k, v = (rng.standard_normal((args.batch, kv_heads, args.seq, args.dim)).astype(args.dtype) for _ in range(2))
    dout = rng.standard_normal(q.shape, dtype=np.float64).astype(args.dtype)
    causal_values = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    rows_to_run, skipped = variants(args, comm.size)
    _warm_up(timed, args, kv_heads, rows_to_run)
    # repeats are interleaved (single process, then each mode, then again) so that every
    # series sees the same neighbours on a shared machine; the best of each is kept
    configs = [(c, rep) for c in causal_values for rep in range(args.repeat)]
    progress = args.progress if comm.rank == 0 else (lambda items, desc: items)
    rows: dict[tuple[bool, str], dict] = {}
    singles: dict[bool, dict] = {}
    for causal, _ in progress(configs, desc="ring"):
        singles[causal] = _best_single(
            singles.get(causal), _single_process(comm, q, k, v, dout, causal, args, all_threads)
        )
        numba.set_num_threads(min(threads, all_threads))
        for variant in rows_to_run:
            row = _measure(timed, q, k, v, dout, causal, variant, args, singles[causal])
            rows[causal, label(variant)] = _best_row(rows.get((causal, label(variant))), row)
    records = [_with_baseline(rows[c, label(x)], singles[c]) for c in causal_values for x in rows_to_run]
    numba.set_num_threads(all_threads)
    result: dict[str, Any] = {
        "benchmark": "ring",
        "ranks": comm.size,
        "threads_per_rank": threads,
        "single_process_threads": all_threads,
        "skipped": skipped,
        "rows": records,
    }
    if comm.rank == 0:
        print(render(records, comm.size, threads, all_threads, skipped))
    return result


def _warm_up(timed: TimedComm, args: argparse.Namespace, kv_heads: int, rows: list[dict]) -> None:
    """Compile (or load) the kernels and make the sub-communicators before timing; rank 0 compiles first."""
    comm = timed.inner
    size = 64 * comm.size
    small_q = np.random.default_rng(0).standard_normal((1, args.heads, size, args.dim)).astype(args.dtype)
    small_kv = small_q[:, :kv_heads]
    if comm.rank != 0:
        comm.barrier()
    out, lse = attention(small_q, small_kv, small_kv, causal=True, return_lse=True)
    attention_backward(out, small_q, small_kv, small_kv, out, lse, causal=True)
    if comm.rank == 0:
        comm.barrier()
    for variant in rows:
        cut = variant["sharding"]
        mine = [shard(x, comm.rank, comm.size, cut) for x in (small_q, small_kv)]
        options = dict(causal=True, **variant)
        out, lse = context_parallel_attention(mine[0], mine[1], mine[1], timed, return_lse=True, **options)
        context_parallel_attention_backward(out, mine[0], mine[1], mine[1], out, lse, timed, **options)


def _single_process(comm, q, k, v, dout, causal, args, threads) -> dict:
    """Rank 0 runs attention on the whole sequence with all cores; the other ranks sleep in a barrier."""
    import numba

    record: dict[str, Any] = {}
    comm.barrier()
    if comm.rank == 0:
        numba.set_num_threads(threads)
        start = time.perf_counter()
        out, lse = attention(q, k, v, causal=causal, return_lse=True)
        record = dict(forward_s=time.perf_counter() - start, out=out)
        if not args.no_backward:
            start = time.perf_counter()
            attention_backward(dout, q, k, v, out, lse, causal=causal)
            record["backward_s"] = time.perf_counter() - start
    comm.barrier()
    return record


def _best_single(old: dict | None, new: dict) -> dict:
    """The faster forward and the faster backward of two single-process rounds (rank 0; ``{}`` elsewhere)."""
    if not old:
        return new
    best = dict(old)
    for key in ("forward_s", "backward_s"):
        if key in new:
            best[key] = min(old[key], new[key])
    return best


BACKWARD_FIELDS = ("backward_s", "backward_compute_s", "backward_wait_s", "backward_sent_bytes")


def _best_row(old: dict | None, new: dict) -> dict:
    """Forward fields of the faster forward, backward fields of the faster backward."""
    if not old:
        return new
    best = dict(old if old["forward_s"] <= new["forward_s"] else new)
    if "backward_s" in new and new["backward_s"] < old["backward_s"]:
        best.update({key: new[key] for key in BACKWARD_FIELDS})
    return best


def _with_baseline(row: dict, single: dict) -> dict:
    """Add the single-process times and the parallel/single ratios (rank 0; other ranks hold no rows)."""
    if not row:
        return row
    row = dict(row, single_forward_s=single["forward_s"], forward_ratio=row["forward_s"] / single["forward_s"])
    if "backward_s" in row:
        row.update(single_backward_s=single["backward_s"], backward_ratio=row["backward_s"] / single["backward_s"])
    return row


def _measure(timed, q, k, v, dout, causal, variant, args, single) -> dict:
    """One timed forward (and backward) call of one mode; on rank 0 the row of the table, elsewhere ``{}``."""
    comm = timed.inner
    sharding = variant["sharding"]
    mine = [shard(x, comm.rank, comm.size, sharding) for x in (q, k, v, dout)]
    options = dict(causal=causal, **variant)
    fwd = _timed(timed, lambda: context_parallel_attention(*mine[:3], timed, return_lse=True, **options))
    out, lse = fwd.pop("result")
    transfer = None
    if variant["mode"] == "ring":
        transfer = _transfer_only(comm, [np.ascontiguousarray(mine[1]), np.ascontiguousarray(mine[2])])
    bwd = None
    if not args.no_backward:
        bwd = _timed(timed, lambda: context_parallel_attention_backward(mine[3], *mine[:3], out, lse, timed, **options))
        bwd.pop("result")
    per_rank = comm.comm.gather(dict(rank=comm.rank, shard=mine[0].shape[2], forward=fwd, backward=bwd), root=0)
    outs = comm.comm.gather(out, root=0)
    if comm.rank != 0:
        return {}
    full = unshard(outs, sharding)
    ref = single["out"]
    steps = np.array([r["forward"]["steps"] for r in per_rank])  # (ranks, steps): the ring's steps
    compute = np.array([r["forward"]["compute"] for r in per_rank])
    wall = max(r["forward"]["wall"] for r in per_rank)
    flops = attention_flops(args.batch, args.heads, args.seq, args.seq, args.dim, causal=causal)
    row: dict[str, Any] = {
        "seq": args.seq,
        "heads": args.heads,
        "kv_heads": k.shape[1],
        "dim": args.dim,
        "dtype": args.dtype,
        "causal": causal,
        "mode": variant["mode"],
        "label": label(variant),
        "sharding": sharding,
        "ulysses_size": variant["ulysses_size"],
        "ranks": comm.size,
        "shards": [r["shard"] for r in per_rank],
        "forward_s": wall,
        "forward_compute_s": [r["forward"]["compute"] for r in per_rank],
        "forward_wait_s": [r["forward"]["wait"] for r in per_rank],
        "forward_exposed_wait": max(r["forward"]["wait"] / r["forward"]["wall"] for r in per_rank),
        "forward_sent_bytes": [r["forward"]["sent"][1] for r in per_rank],
        "forward_messages": [r["forward"]["sent"][0] for r in per_rank],
        "transfer_only_s": transfer,
        "rank_imbalance": float(compute.max() / compute.min()),
        "forward_gflops": flops / wall / 1e9,
        "max_rel_error": float(np.abs(full - ref).max() / np.abs(ref).max()),
    }
    if variant["mode"] == "ring":
        row["forward_step_compute_s"] = steps.tolist()
        row["worst_step_imbalance"] = float((steps.max(axis=0) / steps.min(axis=0)).max())
    if bwd is not None:
        row["backward_s"] = max(r["backward"]["wall"] for r in per_rank)
        row["backward_compute_s"] = [r["backward"]["compute"] for r in per_rank]
        row["backward_wait_s"] = [r["backward"]["wait"] for r in per_rank]
        row["backward_sent_bytes"] = [r["backward"]["sent"][1] for r in per_rank]
    return row


def render(records: list[dict], ranks: int, threads: int, single_threads: int, skipped: list[str] = ()) -> str:
    """The table printed by ``bench ring``."""
    headers = ["L", "causal", "mode", "fwd s", "1-proc fwd s", "ratio", "compute s", "wait s", "exposed",
               "sent MB", "transfer s", "rank max/min", "step max/min", "bwd s", "1-proc bwd s", "bwd ratio",
               "bwd wait s", "rel err"]  # fmt: skip
    rows = []
    for r in records:
        has_bwd = "backward_s" in r
        rows.append(
            [
                str(r["seq"]),
                "yes" if r["causal"] else "no",
                r["label"],
                f"{r['forward_s']:.2f}",
                f"{r['single_forward_s']:.2f}",
                f"{r['forward_ratio']:.2f}",
                "/".join(f"{x:.2f}" for x in r["forward_compute_s"]),
                "/".join(f"{x:.3f}" for x in r["forward_wait_s"]),
                f"{100 * r['forward_exposed_wait']:.0f}%",
                "/".join(f"{x / 2**20:.1f}" for x in r["forward_sent_bytes"]),
                f"{r['transfer_only_s']:.3f}" if r["transfer_only_s"] is not None else "-",
                f"{r['rank_imbalance']:.2f}",
                f"{r['worst_step_imbalance']:.2f}" if "worst_step_imbalance" in r else "-",
                f"{r['backward_s']:.2f}" if has_bwd else "-",
                f"{r['single_backward_s']:.2f}" if has_bwd else "-",
                f"{r['backward_ratio']:.2f}" if has_bwd else "-",
                "/".join(f"{x:.3f}" for x in r["backward_wait_s"]) if has_bwd else "-",
                f"{r['max_rel_error']:.1e}",
            ]
        )
    note = (
        f"{ranks} ranks x {threads} numba thread(s) against one process x {single_threads} thread(s); "
        f"compute/wait/sent: forward, per rank (rank 0/1/...); exposed: the largest share of a rank's forward "
        f"spent waiting for data; transfer: the ring's K/V around the ring alone, no compute"
    )
    lines = [format_table(headers, rows), note]
    lines += [f"not measured: {reason}" for reason in skipped]
    return "\n".join(lines)
