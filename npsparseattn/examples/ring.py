"""Context-parallel (ring, Ulysses, hybrid, all-gather) attention across MPI ranks, checked against one process.

Run it with the ``mpiexec`` that ``pip install 'npsparseattn[mpi]'`` puts next
to your Python::

    mpiexec -n 4 python -m npsparseattn.examples.ring
    mpiexec -n 2 python -m npsparseattn.examples.ring --seq 16384 --sharding contiguous
    mpiexec -n 4 python -m npsparseattn.examples.ring --mode hybrid --ulysses-size 2

Every rank builds the same random q, k, v (same seed), keeps its shard
(:func:`npsparseattn.shard`), and runs
:func:`npsparseattn.context_parallel_attention` in the chosen mode and its
backward; rank 0 gathers the shards and prints, per rank, the rows it held,
its times and the bytes it sent, then the largest error of the gathered
output, lse and gradients against :func:`npsparseattn.attention` on the
whole sequence in one process.  Started without mpiexec it runs on one rank.
"""

from __future__ import annotations

import argparse
import os
import time

import numba
import numpy as np

import npsparseattn as nsa
from npsparseattn.distributed import MPIComm
from npsparseattn.ring import shard_pieces


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the example."""
    parser = argparse.ArgumentParser(prog="python -m npsparseattn.examples.ring", description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=4096, help="total sequence length L")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA when < --heads)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--causal", choices=["yes", "no"], default="yes")
    parser.add_argument("--sharding", choices=["zigzag", "contiguous"], default="zigzag")
    parser.add_argument("--mode", choices=list(nsa.context_parallel.MODES), default="ring")
    parser.add_argument("--ulysses-size", type=int, default=None, help="ranks per Ulysses group (--mode hybrid)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the example on this rank (every rank of the job runs it)."""
    args = parse_args(argv)
    comm = MPIComm()
    _, ranks_here = comm.local_rank()
    numba.set_num_threads(max(1, min(numba.get_num_threads(), (os.cpu_count() or 1) // ranks_here)))
    causal, sharding = args.causal == "yes", args.sharding
    rng = np.random.default_rng(0)
    q = rng.standard_normal((args.heads, args.seq, args.dim)).astype(args.dtype)
    k, v, dout = (rng.standard_normal((h, args.seq, args.dim)).astype(args.dtype)
                  for h in (args.kv_heads, args.kv_heads, args.heads))  # fmt: skip
    mine = [nsa.shard(x, comm.rank, comm.size, sharding) for x in (q, k, v, dout)]
    small = [nsa.shard(x[:, : 64 * comm.size], comm.rank, comm.size, sharding) for x in (q, k, v)]
    options = dict(mode=args.mode, ulysses_size=args.ulysses_size, causal=causal, sharding=sharding)
    nsa.context_parallel_attention(*small, comm, **options)  # compile / load the kernels untimed

    comm.barrier()
    comm.traffic.reset()
    start = time.perf_counter()
    out, lse = nsa.context_parallel_attention(*mine[:3], comm, return_lse=True, **options)
    forward = time.perf_counter() - start
    sent = comm.traffic.bytes
    comm.barrier()
    start = time.perf_counter()
    grads = nsa.context_parallel_attention_backward(mine[3], *mine[:3], out, lse, comm, **options)
    backward = time.perf_counter() - start

    report = (comm.rank, mine[0].shape[1], forward, backward, numba.get_num_threads(), sent)
    gathered = comm.comm.gather((report, out, lse, grads), root=0)
    if comm.rank != 0:
        return
    print(f"{args.mode} attention: {comm.size} rank(s), L={args.seq}, heads {args.heads}/{args.kv_heads}, "
          f"D={args.dim}, {args.dtype}, causal={causal}, sharding={sharding}")  # fmt: skip
    for (rank, rows, fwd, bwd, threads, sent), *_ in gathered:
        pieces = " + ".join(f"[{a}, {b})" for a, b in shard_pieces(args.seq, comm.size, rank, sharding))
        print(f"  rank {rank}: {rows} rows {pieces}, forward {fwd:.3f} s ({sent / 2**20:.1f} MiB sent), "
              f"backward {bwd:.3f} s, {threads} thread(s)")  # fmt: skip
    ring_out = nsa.unshard([g[1] for g in gathered], sharding)
    ring_lse = nsa.unshard([g[2] for g in gathered], sharding, axis=-1)
    ring_grads = [nsa.unshard([g[3][i] for g in gathered], sharding) for i in range(3)]
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)  # the other ranks are done: all cores
    start = time.perf_counter()
    ref_out, ref_lse = nsa.attention(q, k, v, causal=causal, return_lse=True)
    single = time.perf_counter() - start
    ref_grads = nsa.attention_backward(dout, q, k, v, ref_out, ref_lse, causal=causal)
    print(f"  single process, {numba.get_num_threads()} thread(s): forward {single:.3f} s")
    errors = {"out": (ring_out, ref_out), "lse": (ring_lse, ref_lse)}
    errors.update({f"d{name}": pair for name, pair in zip("qkv", zip(ring_grads, ref_grads))})
    worst = ", ".join(f"{name} {np.abs(a - b).max() / np.abs(b).max():.1e}" for name, (a, b) in errors.items())
    print(f"  max error vs single-process attention (relative to the largest value): {worst}")
    if comm.size == 1:
        print("  (one rank: start it with `mpiexec -n 4 python -m npsparseattn.examples.ring`)")


if __name__ == "__main__":
    main()
