"""Ring attention across processes: mpiexec runs (CPU, NumPy) and the communicators.

The ``mpi`` tests start ``mpiexec -n 2/3/4`` (the one from the pip ``mpich``
wheel, next to this interpreter) on tests/ring_worker.py; every subprocess has
a hard time limit and is killed with its whole process group, so a broken ring
fails the test instead of hanging it.  The other tests use fakes in-process:
a one-rank communicator, a fake ``cupy.cuda.nccl``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import TOL, FakeCupyArray, SoloComm, random_qkv
from ring_worker import case_list, cp_case_list

import npsparseattn as nsa
from npsparseattn import ring
from npsparseattn.distributed import (
    TIMEOUT_ENV,
    MPIComm,
    NCCLComm,
    RingTimeoutError,
    Transfer,
    base,
    nccl,
)
from npsparseattn.distributed.agree import RankArgumentError

MPIEXEC = Path(sys.executable).with_name("mpiexec")
WORKER = Path(__file__).with_name("ring_worker.py")
WORLDS = (2, 3, 4)
FAULT_TIMEOUT = 3.0


def mpirun(
    n: int,
    *args: str,
    flags: tuple[str, ...] = (),
    limit: float = 120,
    env: dict | None = None,
    program: tuple[str, ...] = (sys.executable, str(WORKER)),
):
    """Run ``program`` (default: the worker) under ``mpiexec -n n``; kill its process group after ``limit`` s."""
    environment = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    environment.update(env or {})
    cmd = [str(MPIEXEC), *flags, "-n", str(n), *program, *args]
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"mpiexec -n {n} {' '.join(args)} did not finish within {limit} s:\n{output[-3000:]}")
    return proc.returncode, output, time.monotonic() - start


@pytest.fixture(scope="session")
def warm_kernels():
    """Compile (or load) the numba kernels once here, so the ranks load them from the disk cache."""
    for dtype in (np.float32, np.float64):
        q, k, v = random_qkv(np.random.default_rng(0), hq=2, lq=40, d=8, dtype=dtype)
        out, lse = nsa.attention(q, k, v, causal=True, return_lse=True)
        nsa.attention_backward(out, q, k, v, out, lse, causal=True)
    q, k, v = random_qkv(np.random.default_rng(0), batch=(1,), hq=4, hk=2, lq=40, d=8)  # the kv_idx case
    kv_idx = np.zeros((1, 2, 10, 1), np.int32)
    out, lse = nsa.sparse_attention(q, k, v, kv_idx, q_block=4, kv_block=2, causal=True, return_lse=True)
    nsa.sparse_attention_backward(out, q, k, v, out, lse, kv_idx, q_block=4, kv_block=2, causal=True)


@pytest.fixture(scope="module", params=WORLDS, ids=lambda n: f"n{n}")
def ring_results(request, warm_kernels, tmp_path_factory):
    world = request.param
    path = tmp_path_factory.mktemp(f"ring{world}") / "results.json"
    rc, output, _ = mpirun(world, "cases", str(path), limit=240)
    assert rc == 0, output[-3000:]
    return world, {r["id"]: r for r in json.loads(path.read_text())}


CASE_IDS = [case["id"] for case in case_list(2)]


@pytest.mark.mpi
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_ring_matches_single_process(ring_results, case_id):
    world, results = ring_results
    r = results[case_id]
    tol = TOL[np.dtype(r["dtype"])]
    assert not r["any_nan"]
    assert r["out_vs_reference"] < tol, r
    assert r["lse_vs_reference"] < 50 * tol, r
    assert max(r["grads_vs_reference"]) < 4 * tol, r
    assert r["out_vs_single"] < tol, r
    assert r["lse_vs_single"] < 50 * tol, r
    assert max(r["grads_vs_single"]) < 4 * tol, r
    lse_dtype = "float64" if r["dtype"] == "float64" else "float32"
    for rank in r["ranks"]:
        assert rank["shapes_ok"], rank
        assert rank["dtypes"] == [r["dtype"], lse_dtype, r["dtype"], r["dtype"], r["dtype"]], rank
    lengths = [rank["shard_length"] for rank in r["ranks"]]
    assert lengths == ring.shard_lengths(r["length"], world, r["sharding"])
    if "oddL" in case_id:
        assert r["length"] % (2 * world) != 0  # the 2P zigzag chunks are unequal


CP_CASE_IDS = [case["id"] for case in cp_case_list(2)]
D, DV = 8, 6  # head and value dimensions of the context-parallel cases


@pytest.mark.mpi
@pytest.mark.parametrize("case_id", CP_CASE_IDS)
def test_every_mode_equals_single_process_attention(ring_results, case_id):
    """Forward and backward of every mode against the float64 oracle and the single-process function."""
    _, results = ring_results
    r = results[case_id]
    tol = 1e-12 if r["dtype"] == "float64" else TOL[np.dtype(r["dtype"])]
    assert not r["any_nan"], r
    assert r["out_vs_reference"] < tol and r["lse_vs_reference"] < 10 * tol, r
    assert max(r["grads_vs_reference"]) < tol, r
    if "out_vs_single" in r:  # documents and a layout together have no single-process function
        assert r["out_vs_single"] < tol and r["lse_vs_single"] < 10 * tol, r
        assert max(r["grads_vs_single"]) < tol, r
    lse_dtype = "float64" if r["dtype"] == "float64" else "float32"
    for rank in r["ranks"]:
        assert rank["dtypes"] == [r["dtype"], lse_dtype, r["dtype"], r["dtype"], r["dtype"]], rank
        assert rank["repeat_bitwise"], rank  # a second call gives the same bits: a fixed merge order
    assert sum(rank["length"] for rank in r["ranks"]) > 0


def _kv_bytes(r: dict, rank: int) -> int:
    """K and V of one rank's shard, in bytes (batch 1)."""
    item = np.dtype(r["dtype"]).itemsize
    return r["heads"][1] * r["ranks"][rank]["length"] * (D + DV) * item


def expected_traffic(r: dict) -> list[tuple[list[int], list[int]]]:
    """Per rank, ``([messages, bytes] forward, [messages, bytes] backward)`` of the ring and all-gather modes.

    From the brute-force ``needs`` matrix: when every rank pair needs something
    the ring relays K/V (2 arrays per step; each rank forwards every shard but
    its successor's) and the backward's dk/dv accumulators travel ``P`` steps;
    otherwise each rank sends its own K/V to exactly the ranks that need it and
    gets back a partial dk/dv from each; the all-gather moves the same, in one
    collective each way.
    """
    p, needs = r["world"], np.array(r["needs"])
    kv = [_kv_bytes(r, i) for i in range(p)]
    found = []
    for i in range(p):
        readers = [j for j in range(p) if j != i and needs[j, i]]  # ranks that need shard i
        sources = [j for j in range(p) if j != i and needs[i, j]]  # shards rank i needs
        if r["mode"] == "allgather":
            fwd = [len(readers), len(readers) * kv[i]] if not needs.all() else [p - 1, (p - 1) * kv[i]]
            back = [len(sources), sum(kv[j] for j in sources)]
        elif needs.all():
            fwd = [2 * (p - 1), sum(kv) - kv[(i + 1) % p]]
            back = [2 * p, sum(kv)]
        else:
            fwd = [2 * len(readers), len(readers) * kv[i]]
            back = [2 * len(sources), sum(kv[j] for j in sources)]
        found.append((fwd, [fwd[0] + back[0], fwd[1] + back[1]]))
    return found


RING_AND_GATHER = [i for i in CP_CASE_IDS if i.startswith(("ring-", "allgather-"))]


@pytest.mark.mpi
@pytest.mark.parametrize("case_id", RING_AND_GATHER)
def test_messages_and_bytes_follow_the_needed_rank_pairs(ring_results, case_id):
    _, results = ring_results
    r = results[case_id]
    for rank, (fwd, bwd) in zip(r["ranks"], expected_traffic(r)):
        assert (rank["forward"], rank["backward"]) == (fwd, bwd), (rank, fwd, bwd, r["needs"])


@pytest.mark.mpi
@pytest.mark.parametrize("case_id", ["ring-contiguous-sparse-window-causal", "ring-contiguous-index-causal-gqa"])
def test_the_sparse_ring_sends_nothing_for_skipped_steps(ring_results, case_id):
    """A sliding-window layout or kv_idx on contiguous shards: only neighbours need each other; nothing else moves."""
    world, results = ring_results
    r = results[case_id]
    needs = np.array(r["needs"])
    assert np.array_equal(needs, np.eye(world, dtype=bool) | np.eye(world, k=-1, dtype=bool))  # shard r-1 only
    for i, rank in enumerate(r["ranks"]):
        sends = 2 if i + 1 < world else 0  # own K and V to rank i + 1, nothing for the P - 2 skipped steps
        assert rank["forward"] == [sends, sends // 2 * _kv_bytes(r, i)]
        returns = 2 if i > 0 else 0  # the partial dk/dv of shard i - 1 go back to rank i - 1
        assert rank["backward"] == [sends + returns, sends // 2 * _kv_bytes(r, i) + returns // 2 * _kv_bytes(r, i - 1)]
    relayed = 2 * (world - 1) * world
    assert sum(rank["forward"][0] for rank in r["ranks"]) == 2 * (world - 1) < relayed or world == 2


@pytest.mark.mpi
@pytest.mark.parametrize("case_id", ["ulysses-causal-gqa-2chunks", "ulysses-window-mqa-replicated"])
def test_ulysses_moves_what_the_volume_formula_says(ring_results, case_id):
    """Per rank: (P-1)/P of its q, k, v shard out (K/V replicated to each rank when Hk < P), out and lse back."""
    world, results = ring_results
    r = results[case_id]
    hq, hk = r["heads"]
    chunks = kv_per_rank = max(hk // world, 1)  # one key/value head per chunk (a replicated one when Hk < P)
    lengths = [rank["length"] for rank in r["ranks"]]
    for i, rank in enumerate(r["ranks"]):
        others = [j for j in range(world) if j != i]
        to_others = len(others) * lengths[i] * (hq // world * D + kv_per_rank * (D + DV)) * 8
        back = sum(lengths[j] for j in others) * hq // world * (DV + 1) * 8
        assert rank["forward"] == [2 * chunks * len(others), to_others + back], (rank, to_others, back)
        grads_in = len(others) * lengths[i] * (hq // world * (2 * DV + D + 1) + kv_per_rank * (D + DV)) * 8
        grads_back = sum(lengths[j] for j in others) * (hq // world * D + kv_per_rank * (D + DV)) * 8
        assert rank["backward"] == [2 * chunks * len(others), grads_in + grads_back], rank


@pytest.fixture(scope="module")
def error_reports(warm_kernels, tmp_path_factory):
    path = tmp_path_factory.mktemp("ring-errors") / "errors.json"
    rc, output, _ = mpirun(3, "errors", str(path))
    assert rc == 0, output[-3000:]
    return json.loads(path.read_text())


SAME_ON_EVERY_RANK = {
    "dtype": r"dtype differs across ranks \(from float32 to float64\)",
    "head_dim": r"head dimension D differs across ranks \(from 4 to 8\)",
    "causal": r"causal differs across ranks \(from False to True\)",
    "sharding": r"sharding differs across ranks \(from 'zigzag' to 'contiguous'\)",
    "heads": r"q.shape\[-3\] differs across ranks \(from 1 to 2\); number of key/value heads Hk differs",
    "lengths": r"local sequence lengths \[5, 4, 3\] \(ranks 0..2\) do not match sharding 'zigzag' for the total "
    r"length 12 \(expected \[4, 4, 4\]\); cut the sequence with npsparseattn.shard",
    "mode": r"mode differs across ranks \(from 'ring' to 'allgather'\)",
    "layout": r"layout differs across ranks \(from none to fingerprint [0-9a-f]{8}\)",
    "cu_seqlens": r"cu_seqlens differs across ranks \(from fingerprint [0-9a-f]{8} to fingerprint [0-9a-f]{8}\)",
}


@pytest.mark.mpi
@pytest.mark.parametrize("name", sorted(SAME_ON_EVERY_RANK))
def test_mismatch_raises_the_same_error_on_every_rank(error_reports, name):
    messages = {tuple(report[name]) for report in error_reports}
    assert len(messages) == 1, messages  # identical type and message on all 3 ranks
    kind, message = messages.pop()
    assert kind == "RankArgumentError"
    assert re.search(SAME_ON_EVERY_RANK[name], message), message


@pytest.mark.mpi
@pytest.mark.parametrize(
    ("name", "own_error"),
    [
        ("invalid_on_one_rank", r"ValueError: q and k must have the same last axis D"),
        ("backward_lse_shape", r"ValueError: lse must have shape \(2, 4\), got \(2, 3\)"),
    ],
)
def test_invalid_arguments_on_one_rank_fail_every_rank(error_reports, name, own_error):
    *others, last = [report[name] for report in error_reports]
    assert re.match(own_error, ": ".join(last)), last
    op = "ring_attention_backward" if name.startswith("backward") else "ring_attention"
    for kind, message in others:
        assert kind == "RankArgumentError"
        assert (
            message
            == f"{op}: the arguments on rank(s) 2 of 3 are invalid (see the error raised there); no data was exchanged"
        )


@pytest.mark.mpi
def test_a_rule_every_rank_breaks_raises_the_same_specific_error_everywhere(error_reports):
    messages = {tuple(report["ulysses_heads"]) for report in error_reports}
    assert len(messages) == 1, messages  # every rank fails the same rule and says so itself
    kind, message = messages.pop()
    assert kind == "ValueError"
    assert "the 2 query heads over 3 ranks, so the heads must be a multiple of the group size" in message


def _fault_results(path) -> dict[int, tuple[str, float, str]]:
    """The outcome each surviving rank wrote to ``<path>.<rank>``."""
    found = {}
    for file in path.parent.glob(path.name + ".*"):
        r = json.loads(file.read_text())
        found[r["rank"]] = (r["error"], r.get("elapsed"), r.get("message"))
    return found


@pytest.mark.mpi
@pytest.mark.parametrize(
    ("mode", "flags"),
    [
        # rank 1 exits before the call; the launcher does not clean up, so only our timeout can end the wait
        ("fault-exit-before", ("-disable-auto-cleanup",)),
        # rank 1 exits right after posting its first K/V transfer
        ("fault-exit-mid", ("-disable-auto-cleanup",)),
        # rank 1 is alive but never calls: nothing but the timeout (and MPI_Abort at exit) can end the job
        ("fault-stall", ()),
    ],
)
def test_dead_or_stalled_peer_ends_with_an_error_not_a_hang(warm_kernels, tmp_path, mode, flags):
    limit = 60
    path = tmp_path / "fault"
    env = {"RING_TEST_TIMEOUT": str(FAULT_TIMEOUT)}
    rc, output, wall = mpirun(3, mode, str(path), flags=flags, limit=limit, env=env)
    results = _fault_results(path)
    assert rc != 0, output[-3000:]
    assert set(results) == {0, 2}, output[-3000:]  # both survivors failed with a ring error
    for rank, (kind, elapsed, message) in results.items():
        assert elapsed <= FAULT_TIMEOUT + 2.0, (rank, elapsed)
        if kind == "RingTimeoutError":
            assert elapsed >= FAULT_TIMEOUT - 0.05, (rank, elapsed)
            assert f"rank {rank} of 3:" in message and f"did not complete within {FAULT_TIMEOUT:g} s" in message
            assert "died or stalls" in message and TIMEOUT_ENV in message
        else:
            assert kind == "RingPeerError" and mode == "fault-exit-mid", (kind, message)
            assert "a peer process probably ended" in message
    if mode != "fault-exit-mid":
        assert {kind for kind, _, _ in results.values()} == {"RingTimeoutError"}
    # startup + timeout + the worker's grace period (timeout + 1 s) + abort: far below the hard limit
    assert wall < 3 * FAULT_TIMEOUT + 20, wall


@pytest.mark.mpi
def test_bench_ring_under_mpiexec(warm_kernels, tmp_path):
    path = tmp_path / "ring.json"
    program = (sys.executable, "-m", "npsparseattn", "bench", "ring")
    args = ("--seq", "256", "--heads", "2", "--dim", "16", "--causal", "yes", "--json", str(path))
    rc, output, _ = mpirun(2, *args, program=program, limit=120, env={"NUMBA_NUM_THREADS": "2"})
    assert rc == 0, output[-3000:]
    assert "fwd s" in output and "rank max/min" in output and "2 ranks x 1 numba thread(s)" in output
    assert "not measured: hybrid: needs a Ulysses group size that splits the 2 ranks" in output
    assert output.count("results written to") == 1  # rank 0 writes, the others do not
    result = json.loads(path.read_text())
    assert result["benchmark"] == "ring" and result["ranks"] == 2
    rows = {row["label"]: row for row in result["rows"]}
    assert set(rows) == {"ring/zigzag", "ring/contiguous", "ulysses", "allgather"}
    for row in rows.values():
        assert row["shards"] == [128, 128] and row["max_rel_error"] < 1e-5
        assert len(row["forward_compute_s"]) == len(row["forward_wait_s"]) == 2
        assert row["backward_s"] > 0 and 0 <= row["forward_exposed_wait"] < 1
        assert sum(row["forward_sent_bytes"]) > 0 and sum(row["backward_sent_bytes"]) > 0
    kv_shard = 128 * 2 * 16 * 4 * 2  # L/2 rows x 2 heads x D x float32 x (K and V)
    assert rows["ring/zigzag"]["forward_sent_bytes"] == [kv_shard, kv_shard]  # one step: the own shard, relayed
    assert rows["ring/contiguous"]["forward_sent_bytes"] == [kv_shard, 0]  # causal: rank 0 needs nothing of rank 1
    assert np.array(rows["ring/zigzag"]["forward_step_compute_s"]).shape == (2, 2)
    assert rows["ring/zigzag"]["transfer_only_s"] > 0 and rows["ulysses"]["transfer_only_s"] is None


def test_bench_ring_with_one_rank_says_how_to_launch_it():
    result = subprocess.run(
        [sys.executable, "-m", "npsparseattn", "bench", "ring", "--seq", "64"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "needs at least 2" in result.stderr and "mpiexec -n 2 npsparseattn bench ring" in result.stderr


@pytest.mark.mpi
def test_nccl_unique_id_comes_from_rank_0_over_mpi(tmp_path):
    path = tmp_path / "nccl.json"
    rc, output, _ = mpirun(2, "nccl-bootstrap", str(path), limit=60)
    assert rc == 0, output[-3000:]
    reports = json.loads(path.read_text())
    expected_id = [(37 * i) % 256 - 128 for i in range(128)]
    for rank, report in enumerate(reports):
        assert report["rank"] == rank
        assert report["created"] == {"ndev": 2, "comm_id": expected_id, "rank": rank}
        assert report["device"] == rank and report["used"] == [rank]  # one GPU per rank, from the local rank
        assert report["stream_non_blocking"] is True


# ---------------------------------------------------------------- in-process: a one-rank communicator


@pytest.mark.parametrize("sharding", ["zigzag", "contiguous"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_one_rank_ring_equals_attention(rng, sharding, dtype):
    q, k, v = random_qkv(rng, batch=(2,), hq=4, hk=2, lq=37, d=8, dv=6, dtype=dtype)
    kw = dict(causal=True, window=(11, None))
    out, lse = nsa.ring_attention(q, k, v, SoloComm(), sharding=sharding, return_lse=True, **kw)
    ref_out, ref_lse = nsa.reference.attention(q, k, v, **kw)
    tol = TOL[np.dtype(dtype)]
    assert out.dtype == dtype and np.abs(out - ref_out).max() < tol
    assert np.abs(lse - ref_lse).max() < 50 * tol
    dout = rng.standard_normal(out.shape).astype(dtype)
    grads = nsa.ring_attention_backward(dout, q, k, v, out, lse, SoloComm(), sharding=sharding, **kw)
    for g, r in zip(grads, nsa.reference.attention_backward(dout, q, k, v, **kw)):
        assert g.dtype == dtype and np.abs(g - r).max() < 4 * tol * max(1.0, np.abs(r).max())


def test_float16_is_computed_in_float32(rng):
    q, k, v = random_qkv(rng, hq=2, lq=20, d=8, dtype=np.float16)
    out, lse = nsa.ring_attention(q, k, v, SoloComm(), causal=True, return_lse=True)
    ref_out, _ = nsa.reference.attention(q, k, v, causal=True)
    assert out.dtype == np.float16 and lse.dtype == np.float32
    assert np.abs(out - ref_out).max() < 2e-3


def test_comm_must_be_a_communicator(rng):
    q, k, v = random_qkv(rng, hq=2, lq=8, d=4)
    with pytest.raises(TypeError, match=r"comm must be a npsparseattn.distributed.Communicator .* got str"):
        nsa.ring_attention(q, k, v, "COMM_WORLD")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            dict(sharding="striped"),
            ValueError,
            r"sharding must be 'zigzag', 'contiguous' or 'per_document', got 'striped'",
        ),
        (dict(return_lse=1), TypeError, r"return_lse must be True or False, got 1"),
        (dict(backend="triton"), nsa.BackendError, r"backend must be 'auto' or one of 'numba', .*got 'triton'"),
        (dict(backend=3), TypeError, r"backend must be a string such as 'auto' or 'numba', got 3"),
        (dict(causal="yes"), TypeError, r"causal must be True or False, got 'yes'"),
    ],
)
def test_argument_errors(rng, kwargs, error, message):
    q, k, v = random_qkv(rng, hq=2, lq=8, d=4)
    with pytest.raises(error, match=message):
        nsa.ring_attention(q, k, v, SoloComm(), **kwargs)


def test_q_and_k_lengths_must_match(rng):
    q, k, v = random_qkv(rng, hq=2, lq=8, lk=9, d=4)
    with pytest.raises(ValueError, match=r"q and k must hold the same local sequence length .*q has 8, k has 9"):
        nsa.ring_attention(q, k, v, SoloComm())


def test_cupy_arrays_without_a_gpu_backend_are_refused_with_reasons(fake_cupy, rng):
    q, k, v = (FakeCupyArray(x) for x in random_qkv(rng, hq=2, lq=8, d=4))
    with pytest.raises(nsa.BackendError, match=r"no backend can run ring_attention .*\n  numba: takes NumPy arrays"):
        nsa.ring_attention(q, k, v, SoloComm())
    with pytest.raises(TypeError, match=r"SoloComm moves numpy arrays but q, k, v are cupy arrays"):
        nsa.ring_attention(q, k, v, SoloComm(), backend="reference")


# ---------------------------------------------------------------- communicator basics


def test_timeout_from_environment(monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert base.default_timeout() == 2.5
    monkeypatch.setenv(TIMEOUT_ENV, "")
    assert base.default_timeout() == base.DEFAULT_TIMEOUT == 300.0
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=rf"{TIMEOUT_ENV} must be a positive number of seconds, got 'soon'"):
        base.default_timeout()


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, r"timeout must be a positive, finite number of seconds, got 0.0"),
        (float("inf"), ValueError, r"timeout must be a positive, finite number of seconds, got inf"),
        ("5", TypeError, r"timeout must be a number of seconds, got '5'"),
        (True, TypeError, r"timeout must be a number of seconds, got True"),
    ],
)
def test_timeout_checks(value, error, message):
    with pytest.raises(error, match=message):
        base.check_timeout(value)


def test_wait_raises_after_the_deadline_and_runs_the_timeout_hook():
    comm = SoloComm()
    comm.timeout = 0.05
    called = []
    transfer = Transfer("test transfer", lambda: False, on_timeout=lambda: called.append(True))
    start = time.monotonic()
    with pytest.raises(RingTimeoutError, match=r"rank 0 of 1: test transfer did not complete within 0.05 s"):
        comm.wait(transfer)
    assert 0.05 <= time.monotonic() - start < 1.0
    assert called == [True]


def test_wait_runs_the_done_hook():
    done = []
    SoloComm().wait(Transfer("x", lambda: True, on_done=lambda: done.append(1)))
    assert done == [1]


@pytest.mark.parametrize(
    ("values", "op", "error", "message"),
    [
        (np.zeros(2), "mean", ValueError, r"op must be one of 'sum', 'min', 'max', got 'mean'"),
        (np.zeros((2, 2)), "sum", ValueError, r"values must be a 1-D vector, got shape \(2, 2\)"),
        (np.array(["a"]), "sum", TypeError, r"values must hold integers or floats, got dtype str32"),
    ],
)
def test_reduce_checks(values, op, error, message):
    with pytest.raises(error, match=message):
        base.check_reduce(values, op)


def test_shift_checks():
    with pytest.raises(ValueError, match=r"tag must be an int in \[0, 8\), got 9"):
        base.check_tag(9)
    with pytest.raises(ValueError, match=r"shift needs as many receive buffers as sent arrays, got 2 and 1"):
        base.check_shift_arrays([np.zeros(2), np.zeros(2)], [np.zeros(2)])
    with pytest.raises(ValueError, match=r"recv\[0\] must be C-contiguous \(shape \(2,\)\)"):
        base.check_shift_arrays([np.zeros(2)], [np.zeros(4)[::2]])


def test_mpi_comm_on_comm_self():
    mpi = pytest.importorskip("mpi4py.MPI")
    comm = MPIComm(mpi.COMM_SELF, timeout=5)
    assert (comm.rank, comm.size, comm.next_rank, comm.prev_rank, comm.kinds) == (0, 1, 0, 0, ("numpy",))
    sent, got = np.arange(6.0), np.full(6, np.nan)
    comm.wait(comm.shift([sent], [got], tag=3))
    assert np.array_equal(got, sent)
    assert comm.allreduce(np.array([3, -1]), "max").tolist() == [3, -1]
    assert comm.broadcast(np.array([7, 8])).tolist() == [7, 8]
    comm.barrier()
    assert comm.local_rank() == (0, 1)
    with pytest.raises(TypeError, match=r"values must be a contiguous 1-D NumPy vector, got list of shape \?"):
        comm.broadcast([1, 2])
    with pytest.raises(TypeError, match=r"comm must be an mpi4py.MPI.Intracomm such as MPI.COMM_WORLD, got 'world'"):
        MPIComm("world")


# ---------------------------------------------------------------- NCCL engine with a fake cupy.cuda.nccl


class _Recorder:
    def __init__(self):
        self.calls = []


class _FakeGpuArray:
    def __init__(self, n, ptr):
        self.nbytes = 4 * n
        self.data = types.SimpleNamespace(ptr=ptr)
        self.flags = types.SimpleNamespace(c_contiguous=True)
        self.shape = (n,)


def _fake_gpu(log, *, arrives=True):
    class Event:
        def __init__(self, disable_timing):
            self.done = False

        def record(self, stream):
            log.calls.append(("record", stream.name))
            self.done = arrives

    class Stream:
        def __init__(self, name):
            self.name, self.ptr = name, {"caller": 11, "comm": 22}[name]

        def wait_event(self, event):
            log.calls.append(("wait_event", self.name))

    caller = Stream("caller")
    cupy = types.SimpleNamespace(
        ndarray=_FakeGpuArray,
        cuda=types.SimpleNamespace(Event=Event, get_current_stream=lambda: caller),
    )
    fake_nccl = types.SimpleNamespace(
        NCCL_UINT8=99,
        groupStart=lambda: log.calls.append(("groupStart",)),
        groupEnd=lambda: log.calls.append(("groupEnd",)),
    )
    comm = types.SimpleNamespace(
        send=lambda *a: log.calls.append(("send", *a)),
        recv=lambda *a: log.calls.append(("recv", *a)),
        abort=lambda: log.calls.append(("abort",)),
    )
    mpi = types.SimpleNamespace(rank=1, size=3, timeout=0.05, mark_failed=lambda: log.calls.append(("mark_failed",)))
    return NCCLComm(comm, mpi, 1, Stream("comm"), cupy, fake_nccl)


def test_nccl_shift_groups_send_and_recv_on_the_comm_stream():
    log = _Recorder()
    comm = _fake_gpu(log)
    transfer = comm.shift(
        [_FakeGpuArray(10, 1000), _FakeGpuArray(3, 2000)], [_FakeGpuArray(10, 3000), _FakeGpuArray(3, 4000)]
    )
    assert log.calls == [
        ("record", "caller"),  # the comm stream waits for what the caller queued
        ("wait_event", "comm"),
        ("groupStart",),
        ("send", 1000, 40, 99, 2, 22),  # to rank 2, raw bytes, on the comm stream
        ("send", 2000, 12, 99, 2, 22),
        ("recv", 3000, 40, 99, 0, 22),  # from rank 0
        ("recv", 4000, 12, 99, 0, 22),
        ("groupEnd",),
        ("record", "comm"),
    ]
    comm.wait(transfer)
    assert log.calls[-1] == ("wait_event", "caller")  # later compute is ordered after the arrival


def test_nccl_wait_times_out_and_aborts():
    log = _Recorder()
    comm = _fake_gpu(log, arrives=False)
    transfer = comm.shift([_FakeGpuArray(4, 1)], [_FakeGpuArray(4, 2)])
    with pytest.raises(RingTimeoutError, match=r"rank 1 of 3: NCCL ring shift .* did not complete within 0.05 s"):
        comm.wait(transfer)
    assert log.calls[-2:] == [("abort",), ("mark_failed",)]


def test_nccl_shift_takes_cupy_arrays_only():
    comm = _fake_gpu(_Recorder())
    with pytest.raises(TypeError, match=r"send\[0\] must be a CuPy array for NCCL, got ndarray"):
        comm.shift([np.zeros(3)], [_FakeGpuArray(3, 1)])


def test_nccl_without_cupy_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(
        ImportError, match=r"NCCL communicator needs CuPy built with NCCL: pip install 'npsparseattn\[cuda\]'"
    ):
        NCCLComm.from_mpi()


class _NodeMpi:
    def __init__(self, rank, local, local_size):
        self.rank, self._local = rank, (local, local_size)

    def local_rank(self):
        return self._local


@pytest.mark.parametrize(
    ("mpi", "n_devices", "device", "expected"),
    [
        (_NodeMpi(5, 1, 4), 4, None, 1),
        (_NodeMpi(5, 1, 4), 4, 3, 3),
        (_NodeMpi(5, 1, 4), 1, None, 0),  # CUDA_VISIBLE_DEVICES gives each rank its own GPU: device 0 everywhere
        (_NodeMpi(6, 3, 4), 2, None, 1),  # local rank modulo the visible GPUs (sharing is refused below)
    ],
)
def test_device_from_local_rank(mpi, n_devices, device, expected):
    assert nccl.select_device(mpi, n_devices, device) == expected


class _GatherMpi:
    """Rank ``rank`` of ``size``; ``allreduce(max)`` merges in what the other ranks contribute."""

    def __init__(self, rank, others):
        self.rank, self.size, self.others = rank, len(others) + 1, others

    def allreduce(self, values, op):
        assert op == "max"
        merged = values.copy()
        for r, code in self.others.items():
            merged[r] = code
        return merged


def _code(node, bus):
    import zlib

    return zlib.crc32(f"{node}|{bus}".encode()) + 1


def test_ranks_on_distinct_gpus_pass_the_check():
    others = {1: _code("n0", "0000:1b:00.0"), 2: _code("n1", "0000:1a:00.0")}  # rank 2: same bus id, other node
    nccl.check_distinct_devices(_GatherMpi(0, others), "n0", "0000:1a:00.0")


def test_two_ranks_on_one_gpu_are_refused_by_name():
    others = {1: _code("n0", "0000:1b:00.0"), 2: _code("n0", "0000:1a:00.0")}
    with pytest.raises(RuntimeError, match=r"ranks 0, 2 on node 'n0' would share GPU 0000:1a:00.0; NCCLComm needs"):
        nccl.check_distinct_devices(_GatherMpi(0, others), "n0", "0000:1a:00.0")


@pytest.mark.parametrize(
    ("mpi", "n_devices", "device", "error", "message"),
    [
        (_NodeMpi(0, 0, 1), 0, None, RuntimeError, r"rank 0: no CUDA GPU visible; NCCLComm needs one GPU per rank"),
        (_NodeMpi(0, 0, 1), 2, 2, ValueError, r"device must be in \[0, 2\) \(GPUs visible to rank 0\), got 2"),
        (_NodeMpi(0, 0, 1), 2, "0", TypeError, r"device must be an int or None, got '0'"),
    ],
)
def test_device_errors(mpi, n_devices, device, error, message):
    with pytest.raises(error, match=message):
        nccl.select_device(mpi, n_devices, device)


def test_nccl_unique_id_length_checked():
    mpi = types.SimpleNamespace(rank=0, broadcast=lambda buf, root: buf)
    fake = types.SimpleNamespace(get_unique_id=lambda: (1, 2, 3))
    with pytest.raises(RuntimeError, match=r"NCCL unique id has 3 bytes, expected 128"):
        nccl.share_unique_id(mpi, fake)


def test_rank_argument_error_is_a_value_error():
    assert issubclass(RankArgumentError, ValueError)
