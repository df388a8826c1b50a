"""Ring attention (``npsparseattn.ring_attention``) in one process, its merge/shard path, and the block plan.

asv runs every benchmark in a single process, so the ring here has one rank
(``MPIComm()`` on ``MPI.COMM_WORLD`` outside ``mpiexec``): that times the
ring's own machinery (argument agreement across ranks, the block schedule,
the exact ``lse`` merge) around the tiled kernels, and
``track_*_overhead`` divides it by plain :func:`npsparseattn.attention` on the
same inputs.  Multi-rank scaling needs ``mpiexec`` and is measured by
``mpiexec -n P npsparseattn bench ring``.  Without mpi4py the ring benchmarks
are skipped with the reason.  :class:`ContextParallelPlan` times the
planning every rank does before it moves data (the calls of every rank pair
and which pairs need anything), which grows with the ranks, the documents
and the layout's blocks, not with the head dimension.
"""

# ruff: noqa: RUF012  (asv reads params and param_names from class attributes)
from __future__ import annotations

import numpy as np
from asv_runner.benchmarks.mark import SkipNotImplemented

import npsparseattn as nsa
from npsparseattn import layouts
from npsparseattn.bench.common import best_time
from npsparseattn.context_parallel.plan import Plan
from npsparseattn.context_parallel.selection import LayoutSelection

from .common import Backend, backends, sizes

HEADS = 4
DIM = 64


def single_rank_comm():
    """A one-rank ring (``MPI.COMM_WORLD`` of this process), or skip the benchmark saying why."""
    from npsparseattn.distributed import MPIComm

    try:
        comm = MPIComm()
    except ImportError as exc:
        raise SkipNotImplemented(f"ring attention needs MPI: {exc}") from exc
    if comm.size != 1:
        raise SkipNotImplemented(f"asv times a one-rank ring; this process is one of {comm.size} MPI ranks")
    return comm


class RingSingleRank:
    params = [
        sizes([2048, 8192], [512]),
        sizes([False, True], [True]),
        sizes(["zigzag", "contiguous"], ["zigzag"]),
        backends("ring_attention"),
    ]
    param_names = ["seq", "causal", "sharding", "backend"]
    timeout = 600

    def setup(self, seq, causal, sharding, backend):
        self.backend = Backend(backend, "ring_attention", label="ring_attention (per-block attention kernels)")
        self.comm = single_rank_comm()
        rng = np.random.default_rng(seq)
        shape = (1, HEADS, seq, DIM)
        self.q, self.k, self.v = (self.backend.random(rng, shape) for _ in range(3))
        self.dout = self.backend.random(rng, shape)
        self.causal = causal
        self.kwargs = {"causal": causal, "sharding": sharding, "backend": backend}
        small = [self.backend.random(rng, (1, HEADS, 128, DIM)) for _ in range(4)]
        out, lse = nsa.ring_attention(*small[:3], self.comm, return_lse=True, **self.kwargs)
        nsa.ring_attention_backward(small[3], *small[:3], out, lse, self.comm, **self.kwargs)
        self.out, self.lse = nsa.ring_attention(self.q, self.k, self.v, self.comm, return_lse=True, **self.kwargs)
        self.backend.sync()

    def forward(self):
        return nsa.ring_attention(self.q, self.k, self.v, self.comm, **self.kwargs)

    def backward(self):
        return nsa.ring_attention_backward(
            self.dout, self.q, self.k, self.v, self.out, self.lse, self.comm, **self.kwargs
        )

    def time_forward(self, *params):
        self.backend.timed(self.forward)()

    def time_backward(self, *params):
        self.backend.timed(self.backward)()

    def peakmem_forward(self, *params):
        self.backend.timed(self.forward)()

    def track_forward_overhead(self, *params):
        ring = best_time(self.backend.timed(self.forward), repeat=3)
        plain = best_time(self.backend.timed(lambda: nsa.attention(self.q, self.k, self.v, causal=self.causal)))
        return ring / plain

    track_forward_overhead.unit = "ring time / attention time"


class MergeStates:
    """The exact ``(out, lse)`` merge every ring step performs, in float32."""

    params = [sizes([4096, 32768], [1024]), sizes([64, 128], [64])]
    param_names = ["seq", "dim"]

    def setup(self, seq, dim):
        rng = np.random.default_rng(0)
        self.out = rng.standard_normal((HEADS, seq, dim)).astype(np.float32)
        self.lse = rng.standard_normal((HEADS, seq)).astype(np.float32)
        self.block_out = rng.standard_normal((HEADS, seq, dim)).astype(np.float32)
        self.block_lse = rng.standard_normal((HEADS, seq)).astype(np.float32)

    def time_merge(self, seq, dim):
        nsa.merge.merge_into(self.out, self.lse, self.block_out, self.block_lse)


class Shard:
    """Cutting a sequence into zigzag/contiguous shards and putting it back together."""

    params = [sizes([32768], [1024]), [2, 8], ["zigzag", "contiguous"]]
    param_names = ["seq", "world", "sharding"]

    def setup(self, seq, world, sharding):
        self.x = np.random.default_rng(0).standard_normal((HEADS, seq, DIM)).astype(np.float32)
        self.shards = [nsa.shard(self.x, r, world, sharding) for r in range(world)]

    def time_shard(self, seq, world, sharding):
        for rank in range(world):
            nsa.shard(self.x, rank, world, sharding)

    def time_unshard(self, seq, world, sharding):
        nsa.unshard(self.shards, sharding)


class ContextParallelPlan:
    """Planning one context-parallel call on ``world`` ranks: per-document shards, optionally a sparse layout."""

    params = [[8, 32], [1, 256], ["dense", "sliding-window"]]
    param_names = ["world", "documents", "layout"]

    def setup(self, world, documents, layout):
        length = 1 << 16
        bounds = np.random.default_rng(0).choice(np.arange(64, length, 64), documents - 1, replace=False)
        self.offsets = np.concatenate([[0], np.sort(bounds), [length]])
        self.pieces = [
            nsa.context_parallel.shard_pieces(length, world, r, "per_document", cu_seqlens=self.offsets, block=64)
            for r in range(world)
        ]
        window = layouts.sliding_window(length, 64, (1024, 0))
        self.selection = LayoutSelection(window) if layout == "sliding-window" else None

    def time_needs(self, world, documents, layout):
        assert Plan(self.pieces, None, 0, self.offsets, self.selection, range(1)).needs.any()

    def time_calls_of_one_rank(self, world, documents, layout):
        plan = Plan(self.pieces, None, 0, self.offsets, self.selection, range(1))
        for source in range(world):
            plan.calls(0, source)
