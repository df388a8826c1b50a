"""Runs under ``mpiexec -n P``: the MPI side of tests/test_ring.py.

``python ring_worker.py MODE OUT_JSON``; rank 0 writes what the test checks to
``OUT_JSON``.  Modes:

* ``cases``: ring forward/backward on every case of :data:`CASES`; rank 0
  gathers the shards, unshards them and records the errors against the float64
  dense reference and against single-process :func:`npsparseattn.attention`.
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

import numpy as np
from conftest import random_qkv, rel_err

import npsparseattn as nsa
from npsparseattn import reference
from npsparseattn.distributed import MPIComm, RingError


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


def mode_cases(comm: MPIComm, path: str) -> None:
    results = [run_case(comm, case) for case in case_list(comm.size)]
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

    def shift(self, send, recv, *, tag=0):
        transfer = super().shift(send, recv, tag=tag)
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
        Device=lambda i: types.SimpleNamespace(use=lambda: used.append(i)),
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
