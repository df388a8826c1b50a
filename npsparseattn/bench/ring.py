"""``npsparseattn bench ring``: ring attention over MPI against single-process attention.

Launch it under MPI, one rank per core share, e.g. on a 2-core machine::

    mpiexec -n 2 npsparseattn bench ring                 # L = 16384, H = 4, D = 64, float32

For each causal setting and sharding (zigzag, contiguous) it reports, measured
side by side in one run: the ring's forward (and backward) time, the time of
single-process tiled attention on the whole sequence with all the cores the
ranks share (the same total work), their ratio, each rank's compute time and
the time it spent blocked waiting for K/V (communication not hidden behind
compute), the time the K/V transfers alone take, the compute imbalance
between ranks (max/min over ranks, in total and at the worst step) and the
error of the gathered output against the single-process one.  numba threads
per rank default to the cores of the node divided by the ranks on it.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

from npsparseattn.bench.common import attention_flops, format_table
from npsparseattn.distributed.base import Communicator, Transfer
from npsparseattn.exact import attention, attention_backward
from npsparseattn.ring import ring_attention, ring_attention_backward, shard, unshard


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bench ring``."""
    parser.add_argument("--seq", type=int, default=16384, help="total sequence length L (all ranks together)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="head dimension D")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--causal", choices=["no", "yes", "both"], default="both")
    parser.add_argument("--sharding", choices=["zigzag", "contiguous", "both"], default="both")
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds of interleaved measurements (the best of each series is kept)"
    )
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    parser.add_argument("--threads", type=int, default=0, help="numba threads per rank (0: cores / ranks per node)")


class TimedComm(Communicator):
    """Wraps a communicator and records when each step's transfer was posted and waited for."""

    def __init__(self, inner: Communicator):
        self.inner = inner
        self.rank, self.size, self.timeout, self.kinds = inner.rank, inner.size, inner.timeout, inner.kinds
        self.synced = 0.0
        self.waits: list[tuple[float, float]] = []

    def reset(self) -> None:
        self.synced, self.waits = 0.0, []

    def exchange(self, send, dest, recv, source, *, tag=0) -> Transfer:
        return self.inner.exchange(send, dest, recv, source, tag=tag)

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
    """One call of ``fn()`` after a barrier: wall time and this rank's compute/wait split."""
    comm.barrier()
    comm.reset()
    start = time.perf_counter()
    result = fn()
    end = time.perf_counter()
    steps = comm.step_compute(end)
    wait = sum(b - a for a, b in comm.waits)
    return dict(wall=end - start, wait=wait, compute=sum(steps), steps=steps, result=result)


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


def run(args: argparse.Namespace) -> dict:
    """Run the sweep under MPI; rank 0 prints the table and returns the records (other ranks return them too)."""
    import numba

    comm = _import_comm()
    if comm.size < 2:
        raise SystemExit(
            "bench ring measures ring attention across MPI ranks and needs at least 2: run it as\n"
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
    shape = (args.batch, args.heads, args.seq, args.dim)
    q, k, v = (rng.standard_normal(shape, dtype=np.float64).astype(args.dtype) for _ in range(3))
    dout = rng.standard_normal(shape, dtype=np.float64).astype(args.dtype)
    causal_values = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    shardings = ["zigzag", "contiguous"] if args.sharding == "both" else [args.sharding]
    _warm_up(comm, args.dtype, args.dim)
    # repeats are interleaved (single process, then each sharding, then again) so that every
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
        for sharding in shardings:
            row = _measure_ring(timed, q, k, v, dout, causal, sharding, args, singles[causal])
            rows[causal, sharding] = _best_row(rows.get((causal, sharding)), row)
    records = [_with_baseline(rows[c, sharding], singles[c]) for c in causal_values for sharding in shardings]
    numba.set_num_threads(all_threads)
    result: dict[str, Any] = {
        "benchmark": "ring",
        "ranks": comm.size,
        "threads_per_rank": threads,
        "single_process_threads": all_threads,
        "rows": records,
    }
    if comm.rank == 0:
        print(render(records, comm.size, threads, all_threads))
    return result


def _warm_up(comm, dtype: str, dim: int) -> None:
    """Compile (or load) the kernels before timing; rank 0 first, so the others load its disk cache."""
    small = np.random.default_rng(0).standard_normal((1, 2, 64 * comm.size, dim)).astype(dtype)
    if comm.rank != 0:
        comm.barrier()
    out, lse = attention(small, small, small, causal=True, return_lse=True)
    attention_backward(out, small, small, small, out, lse, causal=True)
    if comm.rank == 0:
        comm.barrier()
    mine = shard(small, comm.rank, comm.size)
    out, lse = ring_attention(mine, mine, mine, comm, causal=True, return_lse=True)
    ring_attention_backward(out, mine, mine, mine, out, lse, comm, causal=True)


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


def _best_row(old: dict | None, new: dict) -> dict:
    """Forward fields of the faster forward, backward fields of the faster backward."""
    if not old:
        return new
    best = dict(old if old["ring_forward_s"] <= new["ring_forward_s"] else new)
    if "ring_backward_s" in new and new["ring_backward_s"] < old["ring_backward_s"]:
        best.update({key: new[key] for key in ("ring_backward_s", "backward_compute_s", "backward_wait_s")})
    return best


def _with_baseline(row: dict, single: dict) -> dict:
    """Add the single-process times and the ring/single ratios (rank 0; other ranks hold no rows)."""
    if not row:
        return row
    row = dict(row, single_forward_s=single["forward_s"], forward_ratio=row["ring_forward_s"] / single["forward_s"])
    if "ring_backward_s" in row:
        row.update(single_backward_s=single["backward_s"], backward_ratio=row["ring_backward_s"] / single["backward_s"])
    return row


def _measure_ring(timed, q, k, v, dout, causal, sharding, args, single) -> dict:
    """One timed ring forward (and backward) call; on rank 0 the row of the table, elsewhere ``{}``."""
    comm = timed.inner
    mine = [shard(x, comm.rank, comm.size, sharding) for x in (q, k, v, dout)]
    fwd = _timed(timed, lambda: ring_attention(*mine[:3], timed, causal=causal, sharding=sharding, return_lse=True))
    out, lse = fwd.pop("result")
    transfer = _transfer_only(comm, [np.ascontiguousarray(mine[1]), np.ascontiguousarray(mine[2])])
    bwd = None
    if not args.no_backward:
        bwd = _timed(
            timed,
            lambda: ring_attention_backward(mine[3], *mine[:3], out, lse, timed, causal=causal, sharding=sharding),
        )
        bwd.pop("result")
    per_rank = comm.comm.gather(dict(rank=comm.rank, shard=mine[0].shape[2], forward=fwd, backward=bwd), root=0)
    outs = comm.comm.gather(out, root=0)
    if comm.rank != 0:
        return {}
    full = unshard(outs, sharding)
    ref = single["out"]
    steps = np.array([r["forward"]["steps"] for r in per_rank])  # (ranks, steps)
    compute = np.array([r["forward"]["compute"] for r in per_rank])
    flops = attention_flops(args.batch, args.heads, args.seq, args.seq, args.dim, causal=causal)
    row: dict[str, Any] = {
        "seq": args.seq,
        "heads": args.heads,
        "dim": args.dim,
        "dtype": args.dtype,
        "causal": causal,
        "sharding": sharding,
        "ranks": comm.size,
        "shards": [r["shard"] for r in per_rank],
        "ring_forward_s": max(r["forward"]["wall"] for r in per_rank),
        "forward_compute_s": [r["forward"]["compute"] for r in per_rank],
        "forward_wait_s": [r["forward"]["wait"] for r in per_rank],
        "forward_step_compute_s": steps.tolist(),
        "transfer_only_s": transfer,
        "rank_imbalance": float(compute.max() / compute.min()),
        "worst_step_imbalance": float((steps.max(axis=0) / steps.min(axis=0)).max()),
        "ring_forward_gflops": flops / max(r["forward"]["wall"] for r in per_rank) / 1e9,
        "max_rel_error": float(np.abs(full - ref).max() / np.abs(ref).max()),
    }
    if bwd is not None:
        row["ring_backward_s"] = max(r["backward"]["wall"] for r in per_rank)
        row["backward_compute_s"] = [r["backward"]["compute"] for r in per_rank]
        row["backward_wait_s"] = [r["backward"]["wait"] for r in per_rank]
    return row


def render(records: list[dict], ranks: int, threads: int, single_threads: int) -> str:
    """The table printed by ``bench ring``."""
    headers = ["L", "causal", "sharding", "ring fwd s", "1-proc fwd s", "ratio", "compute s", "wait s",
               "transfer s", "rank max/min", "step max/min", "ring bwd s", "1-proc bwd s", "bwd ratio",
               "rel err"]  # fmt: skip
    rows = []
    for r in records:
        has_bwd = "ring_backward_s" in r
        rows.append(
            [
                str(r["seq"]),
                "yes" if r["causal"] else "no",
                r["sharding"],
                f"{r['ring_forward_s']:.2f}",
                f"{r['single_forward_s']:.2f}",
                f"{r['forward_ratio']:.2f}",
                "/".join(f"{x:.2f}" for x in r["forward_compute_s"]),
                "/".join(f"{x:.3f}" for x in r["forward_wait_s"]),
                f"{r['transfer_only_s']:.3f}",
                f"{r['rank_imbalance']:.2f}",
                f"{r['worst_step_imbalance']:.2f}",
                f"{r['ring_backward_s']:.2f}" if has_bwd else "-",
                f"{r['single_backward_s']:.2f}" if has_bwd else "-",
                f"{r['backward_ratio']:.2f}" if has_bwd else "-",
                f"{r['max_rel_error']:.1e}",
            ]
        )
    note = (
        f"{ranks} ranks x {threads} numba thread(s) against one process x {single_threads} thread(s); "
        f"compute/wait: forward, per rank (rank 0/1/...); transfer: K/V around the ring alone, no compute"
    )
    return format_table(headers, rows) + "\n" + note
