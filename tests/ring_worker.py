"""Runs under ``mpiexec -n P``: the MPI side of tests/test_ring.py.

``python ring_worker.py MODE OUT_JSON``; rank 0 writes what the test checks to
``OUT_JSON``.  Modes:

* ``cases``: ring forward/backward on every case of :func:`case_list`; rank 0
  gathers the shards, unshards them and records the errors against the float64
  dense reference and against single-process :func:`npsparseattn.attention`.
  Then :func:`npsparseattn.context_parallel_attention` on every case of
  :func:`cp_case_list` (every mode, causal/window/GQA/packed documents/sparse
  layouts and a ``sparse_attention`` index): errors against a float64 dense oracle with the same mask and
  against the single-process function, each rank's traffic (messages and
  bytes sent) and the rank pairs that need anything, found by brute force on
  the token mask.  One launch per world size runs them all.
* ``errors``: argument mistakes on some ranks; every rank records the
  exception it got (type and message).
* ``fault-exit-before`` / ``fault-exit-mid`` / ``fault-stall``: rank 1 exits
  before the call, exits after its first ring transfer, or sleeps instead of
  calling; the survivors print ``RESULT`` lines with the error and the time
  it took, then re-raise (the job then ends through ``MPI_Abort``).
* ``nccl-bootstrap``: NCCLComm.from_mpi with a fake ``cupy.cuda.nccl``;
  every rank records the unique id it received and the device it chose.
"""

from __future__ import annotations

import json
import os
import sys
import time
import types
import zlib

import numpy as np
from conftest import random_qkv, rel_err

import npsparseattn as nsa
from npsparseattn import layouts, reference
from npsparseattn.distributed import MPIComm, RingError
from npsparseattn.reference import _oracle


def case_list(world: int) -> list[dict]:
    """The numeric cases: every dtype x causal x sharding, plus windows, 2-D inputs, the reference backend, tiny L.

    Ids do not depend on ``world``; lengths do (odd, never a multiple of ``2 * world``).
    """
    odd = 2 * world * 7 + 3
    gqa = dict(batch=(2,), hq=4, hk=2, lq=odd, d=16, dv=8)
    cases = []
    for dtype in ("float64", "float32"):
        for causal in (True, False):
            for sharding in ("zigzag", "contiguous"):
                name = f"{dtype}-{'causal' if causal else 'full'}-{sharding}-gqa-oddL"
                cases.append(dict(id=name, dtype=dtype, causal=causal, sharding=sharding, shape=gqa))
    cases += [
        dict(id="float64-window13,4-zigzag", dtype="float64", window=(13, 4), sharding="zigzag", shape=gqa),
        dict(
            id="float32-causal-window9-contiguous",
            dtype="float32",
            causal=True,
            window=(9, None),
            sharding="contiguous",
            shape=gqa,
        ),
        dict(
            id="float64-causal-zigzag-2d-scale0.3",
            dtype="float64",
            causal=True,
            sharding="zigzag",
            shape=dict(hq=1, lq=odd + 8, d=12),
            two_d=True,
            scale=0.3,
        ),
        dict(
            id="float64-causal-zigzag-backend-reference",
            dtype="float64",
            causal=True,
            sharding="zigzag",
            shape=gqa,
            backend="reference",
        ),
        dict(
            id="float64-causal-zigzag-L5-mqa-empty-shards",
            dtype="float64",
            causal=True,
            sharding="zigzag",
            shape=dict(hq=3, hk=1, lq=5, d=8),
        ),
        dict(
            id="float32-full-zigzag-L300-d64",
            dtype="float32",
            sharding="zigzag",
            shape=dict(batch=(1,), hq=2, lq=300, d=64),
        ),
        dict(
            id="float32-causal-zigzag-L300-d64",
            dtype="float32",
            causal=True,
            sharding="zigzag",
            shape=dict(hq=2, lq=300, d=64),
        ),
    ]
    for i, case in enumerate(cases):
        case["seed"] = 1000 + i
    return cases


def run_case(comm: MPIComm, case: dict) -> dict | None:
    rng = np.random.default_rng(case["seed"])
    dtype = np.dtype(case["dtype"])
    q, k, v = random_qkv(rng, dtype=dtype, **case["shape"])
    if case.get("two_d"):
        q, k, v = q[0], k[0], v[0]
    kw = dict(causal=case.get("causal", False), window=case.get("window"), scale=case.get("scale"))
    sharding = case["sharding"]
    mine = [nsa.shard(x, comm.rank, comm.size, sharding) for x in (q, k, v)]
    out, lse = nsa.ring_attention(
        *mine, comm, sharding=sharding, return_lse=True, backend=case.get("backend", "auto"), **kw
    )
    dout = rng.standard_normal(q.shape[:-1] + (v.shape[-1],)).astype(dtype)
    dout_mine = nsa.shard(dout, comm.rank, comm.size, sharding)
    grads = nsa.ring_attention_backward(
        dout_mine, *mine, out, lse, comm, sharding=sharding, backend=case.get("backend", "auto"), **kw
    )
    local = dict(
        rank=comm.rank,
        shard_length=mine[0].shape[-2],
        dtypes=[str(x.dtype) for x in (out, lse, *grads)],
        shapes_ok=bool(
            out.shape == dout_mine.shape
            and lse.shape == out.shape[:-1]
            and all(g.shape == x.shape for g, x in zip(grads, mine))
        ),
    )
    gathered = comm.comm.gather((local, out, lse, grads), root=0)
    if comm.rank != 0:
        return None
    full_out = nsa.unshard([g[1] for g in gathered], sharding)
    full_lse = nsa.unshard([g[2] for g in gathered], sharding, axis=-1)
    full_grads = [nsa.unshard([g[3][i] for g in gathered], sharding) for i in range(3)]
    ref_out, ref_lse = reference.attention(q, k, v, **kw)
    ref_grads = reference.attention_backward(dout, q, k, v, **kw)
    single_out, single_lse = nsa.attention(q, k, v, return_lse=True, **kw)
    single_grads = nsa.attention_backward(dout, q, k, v, single_out, single_lse, **kw)
    return dict(
        id=case["id"],
        dtype=case["dtype"],
        length=q.shape[-2],
        sharding=sharding,
        ranks=[g[0] for g in gathered],
        out_vs_reference=rel_err(full_out, ref_out),
        lse_vs_reference=float(np.abs(full_lse.astype(np.float64) - ref_lse).max()),
        grads_vs_reference=[rel_err(g, r, floor=1.0) for g, r in zip(full_grads, ref_grads)],
        out_vs_single=rel_err(full_out, single_out),
        lse_vs_single=float(np.abs(full_lse.astype(np.float64) - single_lse.astype(np.float64)).max()),
        grads_vs_single=[rel_err(g, r, floor=1.0) for g, r in zip(full_grads, single_grads)],
        any_nan=bool(any(np.isnan(x).any() for x in (full_out, full_lse, *full_grads))),
    )


def cp_case_list(world: int) -> list[dict]:
    """The context-parallel cases: every mode with causal/window/GQA/MQA, packed documents and sparse layouts.

    Ids do not depend on ``world``; lengths (odd) and head counts do (Ulysses
    needs heads divisible by its group).  ``hybrid`` runs groups of 2 where
    ``world`` is even (a real hybrid on 4 ranks), else one group of ``world``.
    """
    p = world
    odd = 2 * p * 5 + 3
    blocked = 4 * 2 * p * 3 + 3  # a partial last block of 4
    group = 2 if p % 2 == 0 else p
    docs = "docs"  # [0, 7, 7, L // 2 + 1, L]: an empty document, odd lengths
    cases = [
        dict(id="ring-contiguous-causal-gqa", mode="ring", sharding="contiguous", causal=True, hq=4, hk=2, L=odd),
        dict(id="ring-zigzag-window-mqa", mode="ring", window=(5, 2), hq=3, hk=1, L=odd),
        dict(
            id="ring-perdoc-causal-gqa", mode="ring", sharding="per_document", cu=docs, causal=True, hq=4, hk=2, L=odd
        ),
        dict(id="ring-zigzag-docs-window", mode="ring", cu=docs, window=(4, 1), hq=2, hk=2, L=odd),
        dict(
            id="ring-contiguous-sparse-window-causal",
            mode="ring",
            sharding="contiguous",
            causal=True,
            layout=("window", 4, (4, 0)),
            hq=4,
            hk=2,
            L=blocked,
        ),
        dict(
            id="ring-contiguous-index-causal-gqa",
            mode="ring",
            sharding="contiguous",
            causal=True,
            index=(4, 2),
            hq=4,
            hk=2,
            L=blocked,
        ),
        dict(id="ring-zigzag-sparse-longformer", mode="ring", layout=("longformer", 4, (4, 4)), hq=2, hk=1, L=blocked),
        dict(
            id="ring-perdoc-sparse-docs",
            mode="ring",
            sharding="per_document",
            cu="aligned",
            layout=("window", 4, (8, 0)),
            causal=True,
            hq=2,
            hk=2,
            L=blocked,
        ),
        dict(id="ulysses-causal-gqa-2chunks", mode="ulysses", causal=True, hq=4 * p, hk=2 * p, L=odd),
        dict(
            id="ulysses-window-mqa-replicated",
            mode="ulysses",
            sharding="contiguous",
            window=(4, 3),
            hq=2 * p,
            hk=1,
            L=odd,
        ),
        dict(
            id="ulysses-perdoc-causal",
            mode="ulysses",
            sharding="per_document",
            cu=docs,
            causal=True,
            hq=2 * p,
            hk=p,
            L=odd,
        ),
        dict(
            id="ulysses-sparse-bigbird-per-head", mode="ulysses", layout=("bigbird-heads", 4), hq=2 * p, hk=p, L=blocked
        ),
        dict(id="ulysses-float32-causal", mode="ulysses", causal=True, hq=p, hk=p, L=odd, dtype="float32"),
        dict(id="hybrid-causal-gqa", mode="hybrid", ulysses_size=group, causal=True, hq=2 * group, hk=group, L=odd),
        dict(
            id="hybrid-docs-sparse-mqa",
            mode="hybrid",
            ulysses_size=group,
            cu="aligned",
            layout=("window", 4, (8, 0)),
            hq=group,
            hk=1,
            L=blocked,
        ),
        dict(id="allgather-zigzag-gqa", mode="allgather", hq=4, hk=1, L=odd),
        dict(id="allgather-contiguous-causal", mode="allgather", sharding="contiguous", causal=True, hq=2, hk=2, L=odd),
        dict(
            id="allgather-perdoc-window",
            mode="allgather",
            sharding="per_document",
            cu=docs,
            window=(3, 1),
            hq=2,
            hk=1,
            L=odd,
        ),
        dict(
            id="allgather-contiguous-sparse-window",
            mode="allgather",
            sharding="contiguous",
            layout=("window", 4, (4, 4)),
            hq=2,
            hk=2,
            L=blocked,
        ),
    ]
    for case in cases:
        case["seed"] = zlib.crc32(case["id"].encode())
        case.setdefault("dtype", "float64")
    return cases


def _documents(spec, length):
    if spec is None:
        return None
    if spec == "docs":
        return np.array([0, 7, 7, length // 2 + 1, length])
    return np.array([0, 8, 8, 4 * (length // 8), length])  # starts at multiples of the layout's block


def _layout(spec, length, heads):
    if spec is None:
        return None
    kind, block = spec[0], spec[1]
    if kind == "window":
        return layouts.sliding_window(length, block, spec[2])
    if kind == "longformer":
        return layouts.longformer(length, block, spec[2])
    return layouts.stack([layouts.bigbird(length, block, seed=h) for h in range(heads)])


def _index(spec, length, hk):
    """``(kv_idx, kv_cnt, q_block, kv_block)``: each query block of 4 its own 2 key blocks of 2 and the one before.

    Key head 0 lists them in order, key head 1 leaves out the second own block
    and has a ``-1`` slot; the 4th slot of every list holds block 0 past
    ``kv_cnt = 3`` (ignored: were it read, every rank would need rank 0's shard).
    """
    if spec is None:
        return None
    q_block, kv_block = spec
    nqb, nkb = -(-length // q_block), -(-length // kv_block)
    r = np.arange(nqb)
    own, before = 2 * r, np.where(r > 0, 2 * r - 1, -1)
    second = np.where(2 * r + 1 < nkb, 2 * r + 1, -1)
    zero = np.zeros(nqb, dtype=int)
    heads = [np.stack([own, second, before, zero], -1), np.stack([before, -np.ones_like(r), own, zero], -1)]
    kv_idx = np.stack(heads[:hk])[None].astype(np.int32)
    return kv_idx, np.full(kv_idx.shape[:-1], 3, np.int32), q_block, kv_block


def _index_mask(index, length, hq):
    """The token mask (Hq, L, L) of ``_index``'s selection."""
    kv_idx, kv_cnt, q_block, kv_block = index
    group = hq // kv_idx.shape[1]
    mask = np.zeros((hq, length, length), dtype=bool)
    for h in range(hq):
        for qb, row in enumerate(kv_idx[0, h // group]):
            for slot in range(kv_cnt[0, h // group, qb]):
                if row[slot] >= 0:
                    mask[h, qb * q_block : (qb + 1) * q_block, row[slot] * kv_block : (row[slot] + 1) * kv_block] = True
    return mask


def _mask(length, heads, causal, window, offsets, layout):
    """The float64 oracle's mask (1, Hq, L, L): window/causal, same document, layout."""
    left, right = window or (None, None)
    mask = _oracle.visibility_mask(length, length, offset=0, left=left, right=0 if causal else right)
    if offsets is not None:
        doc = np.searchsorted(offsets, np.arange(length), side="right") - 1
        mask &= doc[:, None] == doc[None, :]
    mask = np.broadcast_to(mask, (1, heads, length, length)).copy()
    if layout is not None:
        mask &= layout.to_token_mask().reshape(layout.heads, length, length)[None]
    return mask


def _single_process(case, q, k, v, dout, offsets, layout, kw, index=None):
    """The same call on the whole sequence in one process (the function a user would call there), or None."""
    if index is not None:
        kv_idx, kv_cnt, q_block, kv_block = index
        kw = dict(kw, kv_cnt=kv_cnt, q_block=q_block, kv_block=kv_block)
        out, lse = nsa.sparse_attention(q, k, v, kv_idx, return_lse=True, **kw)
        return out, lse, nsa.sparse_attention_backward(dout, q, k, v, out, lse, kv_idx, **kw)
    if offsets is not None and layout is not None:
        return None
    if offsets is not None:
        cu = offsets.astype(np.int32)
        out, lse = nsa.attention_varlen(q[0], k[0], v[0], cu, cu, return_lse=True, **kw)
        grads = nsa.attention_varlen_backward(dout[0], q[0], k[0], v[0], out, lse, cu, cu, **kw)
        return out[None], lse[None], [g[None] for g in grads]
    if layout is not None:
        out, lse = nsa.block_sparse_attention(q, k, v, layout, return_lse=True, **kw)
        return out, lse, nsa.block_sparse_attention_backward(dout, q, k, v, out, lse, layout, **kw)
    out, lse = nsa.attention(q, k, v, return_lse=True, **kw)
    return out, lse, nsa.attention_backward(dout, q, k, v, out, lse, **kw)


def run_cp_case(comm: MPIComm, case: dict) -> dict | None:
    rng = np.random.default_rng(case["seed"])
    dtype, length, world = np.dtype(case["dtype"]), case["L"], comm.size
    q, k, v = random_qkv(rng, batch=(1,), hq=case["hq"], hk=case["hk"], lq=length, d=8, dv=6, dtype=dtype)
    dout = rng.standard_normal(q.shape[:-1] + (6,)).astype(dtype)
    offsets = _documents(case.get("cu"), length)
    layout = _layout(case.get("layout"), length, case["hq"])
    index = _index(case.get("index"), length, case["hk"])
    sharding = case.get("sharding", "zigzag")
    blocks = layout.block if layout is not None else index[2:] if index is not None else (1,)
    cut = dict(cu_seqlens=offsets, block=int(np.lcm.reduce(blocks)))
    mine = [nsa.shard(x, comm.rank, world, sharding, **cut) for x in (q, k, v, dout)]
    mask_kw = dict(causal=case.get("causal", False), window=case.get("window"))
    kw = dict(mode=case["mode"], ulysses_size=case.get("ulysses_size"), sharding=sharding, cu_seqlens=offsets)
    kw.update(layout=layout, **mask_kw)
    if index is not None:
        kw.update(kv_idx=index[0], kv_cnt=index[1], q_block=index[2], kv_block=index[3])
    comm.traffic.reset()
    out, lse = nsa.context_parallel_attention(*mine[:3], comm, return_lse=True, **kw)
    forward = [comm.traffic.messages, comm.traffic.bytes]
    again = nsa.context_parallel_attention(*mine[:3], comm, **kw)
    comm.traffic.reset()
    grads = nsa.context_parallel_attention_backward(mine[3], *mine[:3], out, lse, comm, **kw)
    backward = [comm.traffic.messages, comm.traffic.bytes]
    local = dict(rank=comm.rank, length=mine[0].shape[-2], forward=forward, backward=backward)
    local["repeat_bitwise"] = bool(np.array_equal(again, out))
    local["dtypes"] = [str(x.dtype) for x in (out, lse, *grads)]
    gathered = comm.comm.gather((local, out, lse, grads), root=0)
    if comm.rank != 0:
        return None
    full_out = nsa.unshard([g[1] for g in gathered], sharding, **cut)
    full_lse = nsa.unshard([g[2] for g in gathered], sharding, axis=-1, **cut)
    full_grads = [nsa.unshard([g[3][i] for g in gathered], sharding, **cut) for i in range(3)]
    mask = _mask(length, case["hq"], case.get("causal", False), case.get("window"), offsets, layout)
    if index is not None:
        mask &= _index_mask(index, length, case["hq"])[None]
    scale = 1 / np.sqrt(8)
    ref_out, ref_lse, _ = _oracle.forward(q, k, v, mask, scale, np)
    ref_grads = _oracle.backward(dout, q, k, v, ref_out, ref_lse, mask, scale, np)

    def lse_err(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        same_empty = bool(np.array_equal(np.isneginf(a), np.isneginf(b)))
        return float(np.abs(np.where(np.isneginf(b), 0, a - b)).max()) if same_empty else float("inf")

    pieces = [nsa.context_parallel.shard_pieces(length, world, r, sharding, **cut) for r in range(world)]
    positions = [np.concatenate([np.arange(a, b) for a, b in ps] or [np.zeros(0, int)]) for ps in pieces]
    seen = mask.any(axis=(0, 1))
    needs = [[bool(seen[np.ix_(positions[r], positions[s])].any()) for s in range(world)] for r in range(world)]
    result = dict(
        id=case["id"],
        dtype=case["dtype"],
        mode=case["mode"],
        world=world,
        heads=[case["hq"], case["hk"]],
        ranks=[g[0] for g in gathered],
        needs=needs,
        out_vs_reference=rel_err(full_out, ref_out),
        lse_vs_reference=lse_err(full_lse, ref_lse),
        grads_vs_reference=[rel_err(g, r, floor=1.0) for g, r in zip(full_grads, ref_grads)],
        any_nan=bool(any(np.isnan(x).any() for x in (full_out, full_lse, *full_grads))),
    )
    single = _single_process(case, q, k, v, dout, offsets, layout, mask_kw, index)
    if single is not None:
        result["out_vs_single"] = rel_err(full_out, single[0])
        result["lse_vs_single"] = lse_err(full_lse, single[1])
        result["grads_vs_single"] = [rel_err(g, r, floor=1.0) for g, r in zip(full_grads, single[2])]
    return result


def mode_cases(comm: MPIComm, path: str) -> None:
    results = [run_case(comm, case) for case in case_list(comm.size)]
    results += [run_cp_case(comm, case) for case in cp_case_list(comm.size)]
    if comm.rank == 0:
        with open(path, "w") as f:
            json.dump(results, f)


def error_calls(comm: MPIComm) -> dict:
    """Each entry: a call that some rank gets wrong; every rank must raise."""
    rng = np.random.default_rng(7)
    r, p = comm.rank, comm.size
    q, k, v = random_qkv(rng, hq=2, lq=4 * p + 1, d=8)
    mine = [nsa.shard(x, r, p) for x in (q, k, v)]
    last = r == p - 1
    return {
        "dtype": lambda: nsa.ring_attention(*[x.astype(np.float32) if last else x for x in mine], comm),
        "head_dim": lambda: nsa.ring_attention(*[x[..., :4] if last else x for x in mine], comm),
        "causal": lambda: nsa.ring_attention(*mine, comm, causal=last),
        "sharding": lambda: nsa.ring_attention(*mine, comm, sharding="contiguous" if last else "zigzag"),
        "lengths": lambda: nsa.ring_attention(*[x[..., :-1, :] if last else x for x in mine], comm),
        "invalid_on_one_rank": lambda: nsa.ring_attention(
            mine[0], mine[1][..., :5] if last else mine[1], mine[2], comm
        ),
        "backward_lse_shape": lambda: nsa.ring_attention_backward(
            mine[0], *mine, mine[0], mine[0][..., 0][..., :-1] if last else mine[0][..., 0], comm
        ),
        "heads": lambda: nsa.ring_attention(*[x[:1] if last else x for x in mine], comm),
        "mode": lambda: nsa.context_parallel_attention(*mine, comm, mode="allgather" if last else "ring"),
        "layout": lambda: nsa.context_parallel_attention(
            *mine, comm, layout=layouts.dense(q.shape[-2], 4) if last else None
        ),
        "cu_seqlens": lambda: nsa.context_parallel_attention(
            *mine, comm, cu_seqlens=np.array([0, 3, q.shape[-2]] if last else [0, q.shape[-2]])
        ),
        "ulysses_heads": lambda: nsa.context_parallel_attention(*mine, comm, mode="ulysses"),
    }


def mode_errors(comm: MPIComm, path: str) -> None:
    report = {}
    for name, call in error_calls(comm).items():
        try:
            call()
            report[name] = None
        except Exception as err:  # the test inspects whatever was raised
            report[name] = [type(err).__name__, str(err)]
    gathered = comm.comm.gather(report, root=0)
    if comm.rank == 0:
        with open(path, "w") as f:
            json.dump(gathered, f)


class DyingComm(MPIComm):
    """Rank 1 exits right after posting its first ring transfer (a peer dying mid-ring)."""

    def exchange(self, send, dest, recv, source, *, tag=0):
        transfer = super().exchange(send, dest, recv, source, tag=tag)
        if self.rank == 1:
            os._exit(0)
        return transfer


def mode_fault(kind: str, path: str) -> None:
    """Rank 1 dies or stalls; each survivor writes its outcome to ``<path>.<rank>``.

    A file per rank, not a line on stdout: the launcher merges the ranks'
    output streams and may cut one rank's line with another's traceback.
    """
    timeout = float(os.environ["RING_TEST_TIMEOUT"])
    comm = (DyingComm if kind == "fault-exit-mid" else MPIComm)(timeout=timeout)
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, hq=2, lq=64 * comm.size, d=16)
    mine = [nsa.shard(x, comm.rank, comm.size) for x in (q, k, v)]
    comm.barrier()
    if comm.rank == 1 and kind == "fault-exit-before":
        os._exit(0)
    if comm.rank == 1 and kind == "fault-stall":
        time.sleep(600)
    start = time.monotonic()
    try:
        nsa.ring_attention(*mine, comm, causal=True)
    except RingError as err:
        elapsed = time.monotonic() - start
        result = dict(rank=comm.rank, error=type(err).__name__, elapsed=elapsed, message=str(err))
        with open(f"{path}.{comm.rank}", "w") as f:
            json.dump(result, f)
        time.sleep(timeout + 1.0)  # let the other survivors fail too before the first abort ends the job
        raise
    with open(f"{path}.{comm.rank}", "w") as f:
        json.dump(dict(rank=comm.rank, error=None), f)


def mode_nccl_bootstrap(path: str) -> None:
    """NCCLComm.from_mpi over real MPI with a fake cupy/nccl: the id must come from rank 0."""
    created = {}
    fake_nccl = types.ModuleType("cupy.cuda.nccl")
    fake_nccl.available = True
    fake_nccl.get_unique_id = lambda: tuple((37 * i) % 256 - 128 for i in range(128))  # signed bytes, as CuPy gives

    class FakeNcclCommunicator:
        def __init__(self, ndev, comm_id, rank):
            created.update(ndev=ndev, comm_id=list(comm_id), rank=rank)

    fake_nccl.NcclCommunicator = FakeNcclCommunicator
    fake_cupy = types.ModuleType("cupy")
    fake_cupy.ndarray = type("ndarray", (), {})
    used = []
    fake_cupy.cuda = types.SimpleNamespace(
        nccl=fake_nccl,
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 8),
        Device=lambda i: types.SimpleNamespace(use=lambda: used.append(i), pci_bus_id=f"0000:{i:02x}:00.0"),
        Stream=lambda non_blocking: types.SimpleNamespace(non_blocking=non_blocking),
    )
    from mpi4py import MPI

    if MPI.COMM_WORLD.rank != 0:
        fake_nccl.get_unique_id = lambda: (_ for _ in ()).throw(AssertionError("only rank 0 may create the id"))
    sys.modules.update({"cupy": fake_cupy, "cupy.cuda": fake_cupy.cuda, "cupy.cuda.nccl": fake_nccl})
    from npsparseattn.distributed import NCCLComm

    comm = NCCLComm.from_mpi(timeout=30)
    report = dict(
        rank=comm.rank, device=comm.device, used=used, created=created, stream_non_blocking=comm.stream.non_blocking
    )
    gathered = comm.mpi.comm.gather(report, root=0)
    if comm.rank == 0:
        with open(path, "w") as f:
            json.dump(gathered, f)


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    if mode.startswith("fault"):
        mode_fault(mode, path)
    elif mode == "nccl-bootstrap":
        mode_nccl_bootstrap(path)
    else:
        comm = MPIComm(timeout=120)
        {"cases": mode_cases, "errors": mode_errors}[mode](comm, path)


if __name__ == "__main__":
    main()
