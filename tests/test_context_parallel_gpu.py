"""Every context-parallel mode on CuPy arrays under ``mpiexec -n 2``: MPI host staging on one GPU, NCCL on two.

Carries the ``gpu`` marker (``make gpu-check`` runs ``pytest -m gpu``) and
skips, with the registry's reasons, where the numba-cuda backend cannot run.
The worker computes ring, Ulysses, hybrid (a group of 2: Ulysses on both
ranks through the split path), all-gather, packed documents and a sparse
layout, forward and backward, and rank 0 writes the errors against the
float64 reference; one launch per engine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from npsparseattn.cuda import _env

pytestmark = pytest.mark.gpu

REASONS = _env.numba_cuda_reasons()
if REASONS or _env.simulator():
    pytest.skip("numba-cuda cannot run here: " + "; ".join(REASONS or ["simulator mode"]), allow_module_level=True)

import cupy  # noqa: E402  (only where a GPU is)

ROOT = Path(__file__).resolve().parent.parent

WORKER = textwrap.dedent(
    """
    import json
    import sys

    import cupy
    import numpy as np
    from mpi4py import MPI

    import npsparseattn as nsa
    from npsparseattn import layouts
    from npsparseattn.distributed import MPIComm, NCCLComm
    from npsparseattn.reference import _oracle

    engine, path = sys.argv[1], sys.argv[2]
    comm = MPIComm(host_staging=True, timeout=120) if engine == "mpi" else NCCLComm.from_mpi(timeout=120)
    rank, world = comm.rank, comm.size
    rng = np.random.default_rng(0)
    L = 515
    q = rng.standard_normal((1, 4, L, 64)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, L, 64)).astype(np.float32) for _ in range(2))
    dout = rng.standard_normal(q.shape).astype(np.float32)
    cu = np.array([0, 64, 64, 320, L])
    cases = {
        "ring-zigzag-causal": dict(mode="ring", causal=True),
        "ring-contiguous-window": dict(mode="ring", sharding="contiguous", window=(40, 0)),
        "ulysses-causal": dict(mode="ulysses", causal=True),
        "hybrid-group2": dict(mode="hybrid", ulysses_size=2, causal=True),
        "allgather-causal": dict(mode="allgather", causal=True),
        "ring-perdoc": dict(mode="ring", sharding="per_document", cu_seqlens=cu, causal=True),
        "ring-sparse": dict(mode="ring", sharding="contiguous", layout=layouts.sliding_window(L, 64, (64, 0))),
    }
    errors = {}
    for name, options in cases.items():
        layout = options.get("layout")
        cut = dict(cu_seqlens=options.get("cu_seqlens"), block=64 if layout is not None else 1)
        sharding = options.get("sharding", "zigzag")
        local = [cupy.asarray(nsa.shard(x, rank, world, sharding, **cut)) for x in (q, k, v, dout)]
        kw = dict(options, backend="numba-cuda")
        out, lse = nsa.context_parallel_attention(*local[:3], comm, return_lse=True, **kw)
        grads = nsa.context_parallel_attention_backward(local[3], *local[:3], out, lse, comm, **kw)
        parts = MPI.COMM_WORLD.gather([cupy.asnumpy(x) for x in (out, *grads)], root=0)
        if rank == 0:
            whole = [nsa.unshard([p[i] for p in parts], sharding, **cut) for i in range(4)]
            left, right = options.get("window") or (None, None)
            mask = _oracle.visibility_mask(L, L, offset=0, left=left, right=0 if options.get("causal") else right)
            if options.get("cu_seqlens") is not None:
                doc = np.searchsorted(cu, np.arange(L), side="right") - 1
                mask &= doc[:, None] == doc[None, :]
            if layout is not None:
                mask &= layout.to_token_mask()
            ref_out, ref_lse, _ = _oracle.forward(q, k, v, mask, 1 / 8, np)
            refs = [ref_out, *_oracle.backward(dout, q, k, v, ref_out, ref_lse, mask, 1 / 8, np)]
            errors[name] = [float(np.abs(a - r).max() / max(np.abs(r).max(), 1.0)) for a, r in zip(whole, refs)]
    if rank == 0:
        with open(path, "w") as f:
            json.dump(errors, f)
    """
)


def _mpiexec() -> str:
    beside = Path(sys.executable).with_name("mpiexec")
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None or importlib.util.find_spec("mpi4py") is None:
        pytest.skip("no mpiexec or mpi4py here (pip install 'npsparseattn[mpi]')")
    return found


def _run(engine: str, tmp_path: Path) -> dict:
    worker = tmp_path / "cp_gpu_worker.py"
    worker.write_text(WORKER)
    path = tmp_path / "errors.json"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    command = [_mpiexec(), "-n", "2", sys.executable, str(worker), engine, str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(path.read_text())


def test_every_mode_over_mpi_host_staging_on_one_gpu(tmp_path):
    errors = _run("mpi", tmp_path)
    assert len(errors) == 7
    for case, values in errors.items():
        assert max(values) < 4e-5, (case, values)


def test_every_mode_over_nccl(tmp_path):
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("NCCL needs one GPU per rank: 2 ranks, 1 GPU here")
    errors = _run("nccl", tmp_path)
    assert len(errors) == 7
    for case, values in errors.items():
        assert max(values) < 4e-5, (case, values)
