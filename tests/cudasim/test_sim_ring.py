"""Ring attention on the numba-cuda attention kernels in the CUDA simulator: one rank, and two over MPI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import SoloComm, random_array, random_qkv, rel_err

import npsparseattn as nsa
from npsparseattn import reference


@pytest.mark.parametrize("sharding", ["zigzag", "contiguous"])
def test_ring_of_one_matches_reference(rng, sharding):
    """The ring's per-block calls (diagonal offsets, windows) through the numba-cuda attention module."""
    q, k, v = random_qkv(rng, hq=2, hk=1, lq=22, d=8, dtype=np.float32)
    kw = dict(causal=True, sharding=sharding, backend="numba-cuda")
    out, lse = nsa.ring_attention(q, k, v, SoloComm(), return_lse=True, **kw)
    ref_out, ref_lse = reference.attention(q, k, v, causal=True)
    assert rel_err(out, ref_out) < 1e-5
    np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=1e-5)
    dout = random_array(rng, out.shape, np.float32)
    grads = nsa.ring_attention_backward(dout, q, k, v, out, lse, SoloComm(), **kw)
    for g, r in zip(grads, reference.attention_backward(dout, q, k, v, causal=True)):
        assert rel_err(g, r, floor=1.0) < 4e-5


WORKER = textwrap.dedent(
    '''
    """Two ranks over MPI, NumPy arrays, numba-cuda kernels in the simulator; rank 0 writes the errors."""
    import json
    import sys

    import numpy as np
    from mpi4py import MPI

    import npsparseattn as nsa
    from npsparseattn import reference
    from npsparseattn.distributed import MPIComm

    comm = MPIComm(timeout=120)
    rng = np.random.default_rng(0)
    q, dout = (rng.standard_normal((1, 2, 23, 8)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((1, 1, 23, 8)).astype(np.float32) for _ in range(2))
    errors = {}
    for sharding in ("zigzag", "contiguous"):
        local = [nsa.shard(x, comm.rank, comm.size, sharding) for x in (q, k, v, dout)]
        kw = dict(causal=True, sharding=sharding, backend="numba-cuda")
        out, lse = nsa.ring_attention(*local[:3], comm, return_lse=True, **kw)
        grads = nsa.ring_attention_backward(local[3], *local[:3], out, lse, comm, **kw)
        parts = MPI.COMM_WORLD.gather([out, *grads], root=0)
        if comm.rank == 0:
            whole = [nsa.unshard([p[i] for p in parts], sharding) for i in range(4)]
            refs = [reference.attention(q, k, v, causal=True)[0]]
            refs += reference.attention_backward(dout, q, k, v, causal=True)
            errors[sharding] = [float(np.abs(a - r).max() / max(np.abs(r).max(), 1.0)) for a, r in zip(whole, refs)]
    if comm.rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(errors, f)
    '''
)


@pytest.mark.mpi
def test_ring_of_two_over_mpi(tmp_path):
    """``mpiexec -n 2``: every rank's blocks through the numba-cuda kernels, K/V and dK/dV over MPI."""
    mpiexec = Path(sys.executable).with_name("mpiexec")
    if not mpiexec.exists():
        pytest.skip("no mpiexec beside this Python (pip install 'npsparseattn[mpi]')")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    result = tmp_path / "errors.json"
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run(
        [str(mpiexec), "-n", "2", sys.executable, str(worker), str(result)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    errors = json.loads(result.read_text())
    assert sorted(errors) == ["contiguous", "zigzag"]
    for sharding, values in errors.items():
        assert max(values) < 4e-5, (sharding, values)
