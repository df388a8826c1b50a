"""The numba-cuda backend on a GPU: CuPy arrays through the public API, against the float64 reference.

Every test carries the ``gpu`` marker and the module skips, with the
registry's reasons, where the backend cannot run (no CuPy, no GPU, one older
than compute capability 8.0).  ``make gpu-check`` runs them (``pytest -m gpu``).
Sizes are those of real use (hundreds to a few thousand rows, head
dimensions 64 and 128) but small enough that the whole file runs in about a
minute on an H100, most of it compiling the kernels.  Ring attention runs
under ``mpiexec -n 2``: over MPI with host staging (both ranks on one GPU)
and, where there are two GPUs, over NCCL.
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

import ml_dtypes
import numba
import numpy as np
import pytest
from conftest import random_array, random_qkv, rel_err

import npsparseattn as nsa
from npsparseattn import layouts, reference
from npsparseattn.cuda import _env

pytestmark = pytest.mark.gpu

REASONS = _env.numba_cuda_reasons()
if REASONS or _env.simulator():
    pytest.skip("numba-cuda cannot run here: " + "; ".join(REASONS or ["simulator mode"]), allow_module_level=True)

import cupy  # noqa: E402  (only where a GPU is)

ROOT = Path(__file__).resolve().parent.parent
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 8e-3}
DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]
DTYPE_IDS = ["float32", "float16", "bfloat16"]


def on_gpu(*arrays):
    return tuple(cupy.asarray(x) for x in arrays)


def on_host(*arrays):
    return tuple(cupy.asnumpy(x) for x in arrays)


def check_attention(q, k, v, kw, dtype, *, layout=None):
    """Forward and backward of numba-cuda on CuPy copies of ``q, k, v`` against the float64 reference."""
    tol = TOL[np.dtype(dtype).name]
    args = (layout,) if layout is not None else ()
    forward = nsa.block_sparse_attention if layout is not None else nsa.attention
    backward = nsa.block_sparse_attention_backward if layout is not None else nsa.attention_backward
    ref_forward = reference.block_sparse_attention if layout is not None else reference.attention
    ref_backward = reference.block_sparse_attention_backward if layout is not None else reference.attention_backward
    out, lse = forward(*on_gpu(q, k, v), *args, return_lse=True, backend="numba-cuda", **kw)
    assert isinstance(out, cupy.ndarray) and out.dtype == q.dtype and lse.dtype == np.float32
    out_h, lse_h = on_host(out, lse)
    ref_out, ref_lse = ref_forward(q, k, v, *args, **kw)
    assert rel_err(out_h, ref_out) < tol
    empty = ~np.isfinite(ref_lse)
    assert np.array_equal(np.isneginf(lse_h), empty) and np.all(out_h[empty] == 0)
    np.testing.assert_allclose(lse_h[~empty], ref_lse[~empty], rtol=0, atol=50 * tol)
    dout = random_array(np.random.default_rng(1), out.shape, dtype)
    grads = backward(*on_gpu(dout, q, k, v), out, lse, *args, backend="numba-cuda", **kw)
    for name, g, r, x in zip("qkv", on_host(*grads), ref_backward(dout, q, k, v, *args, **kw), (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert rel_err(g, r, floor=1.0) < 4 * tol, name


SHAPES = [
    pytest.param(dict(batch=(2,), hq=8, hk=2, lq=1000, lk=1000, d=64), dict(causal=True), id="gqa-causal-d64"),
    pytest.param(dict(hq=4, lq=777, lk=1201, d=128, dv=96), dict(), id="lq<lk-d128-dv96"),
    pytest.param(dict(hq=4, hk=1, lq=900, lk=333, d=64), dict(causal=True), id="lq>lk-empty-rows"),
    pytest.param(dict(hq=4, lq=1500, lk=1500, d=32), dict(window=(200, 50)), id="window"),
    pytest.param(dict(hq=8, hk=2, lq=1, lk=4099, d=128), dict(causal=True), id="decode"),
]


@pytest.mark.parametrize(("shape", "mask"), SHAPES)
def test_attention_matches_reference(rng, shape, mask):
    q, k, v = random_qkv(rng, dtype=np.float32, **shape)
    check_attention(q, k, v, mask, np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
def test_attention_with_alibi_softcap_and_bias(rng, dtype):
    """ALiBi, softcap and a bias broadcast over the batch, forward and backward (dbias too), against the reference."""
    q, k, v = random_qkv(rng, batch=(2,), hq=4, hk=2, lq=500, lk=600, d=64, dtype=dtype)
    mods = dict(alibi_slopes=rng.uniform(0.01, 0.2, 4), softcap=20.0, bias=random_array(rng, (1, 4, 500, 600), dtype))
    kw = dict(causal=True, window=(300, None))
    tol = TOL[np.dtype(dtype).name]
    wide = {name: x.astype(np.float64) if isinstance(x, np.ndarray) else x for name, x in mods.items()}
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    on = {name: cupy.asarray(x) if isinstance(x, np.ndarray) else x for name, x in mods.items()}
    out, lse = nsa.attention(*on_gpu(q, k, v), return_lse=True, backend="numba-cuda", **kw, **on)
    ref_out, ref_lse = nsa.attention(q64, k64, v64, return_lse=True, backend="reference", **kw, **wide)
    assert rel_err(cupy.asnumpy(out), ref_out) < tol
    dout = random_array(np.random.default_rng(1), out.shape, dtype)
    grads = nsa.attention_backward(*on_gpu(dout, q, k, v), out, lse, backend="numba-cuda", **kw, **on)
    ref = nsa.attention_backward(dout.astype(np.float64), q64, k64, v64, ref_out, ref_lse, backend="reference",
                                 **kw, **wide)  # fmt: skip
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), on_host(*grads), ref, strict=True):
        assert rel_err(g, r, floor=1.0) < 4 * tol, name


@numba.njit
def tempered(score, b, h, q_idx, kv_idx):
    """A score_mod of every argument (float32 arithmetic): per-head temperature, batch and relative-position terms."""
    f32 = numba.float32
    return score * (f32(0.75) + f32(0.125) * f32(h)) + f32(0.25) * f32(b) - f32(0.01) * f32(q_idx - kv_idx)


@numba.njit
def tempered_grad(score, b, h, q_idx, kv_idx):
    return numba.float32(0.75) + numba.float32(0.125) * numba.float32(h)


@numba.njit
def striped(b, h, q_idx, kv_idx):
    """A mask_mod that empties query 5's row in batch 1 and cuts every third pair."""
    return not (b == 1 and q_idx == 5) and (q_idx + kv_idx + h) % 3 != 0


@pytest.mark.parametrize("operation", ["attention", "sparse"])
def test_score_mod_and_mask_mod_compiled_into_the_kernels(rng, operation):
    """A user's score_mod (with its derivative) and mask_mod, with ALiBi and a bias, forward and backward."""
    q, k, v = random_qkv(rng, batch=(2,), hq=4, hk=2, lq=300, lk=400, d=64, dtype=np.float32)
    mods = dict(alibi_slopes=rng.uniform(0.01, 0.2, 4), bias=random_array(rng, (2, 1, 300, 400), np.float32))
    user = dict(score_mod=tempered, mask_mod=striped)
    kw, index = dict(causal=True), ()
    forward, backward = nsa.attention, nsa.attention_backward
    if operation == "sparse":
        forward, backward = nsa.sparse_attention, nsa.sparse_attention_backward
        index = (np.argsort(rng.random((2, 2, 5, 7)), axis=-1)[..., :4].astype(np.int32),)  # 64-blocks, 4 of 7
        kw.update(q_block=64, kv_block=64)
    wide = {name: x.astype(np.float64) for name, x in mods.items()}
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    on = {name: cupy.asarray(x) for name, x in mods.items()}
    out, lse = forward(*on_gpu(q, k, v), *on_gpu(*index), return_lse=True, backend="numba-cuda", **kw, **on, **user)
    ref_out, ref_lse = forward(q64, k64, v64, *index, return_lse=True, backend="reference", **kw, **wide, **user)
    out_h, lse_h = on_host(out, lse)
    empty = ~np.isfinite(ref_lse)
    assert empty[1, :, 5].all() and np.array_equal(np.isneginf(lse_h), empty) and np.all(out_h[empty] == 0)
    assert rel_err(out_h, ref_out) < 1e-5
    np.testing.assert_allclose(lse_h[~empty], ref_lse[~empty], rtol=0, atol=5e-4)
    dout = random_array(np.random.default_rng(1), out.shape, np.float32)
    user["score_mod_grad"] = tempered_grad
    grads = backward(*on_gpu(dout, q, k, v), out, lse, *on_gpu(*index), backend="numba-cuda", **kw, **on, **user)
    ref = backward(dout.astype(np.float64), q64, k64, v64, ref_out, ref_lse, *index, backend="reference", **kw,
                   **wide, **user)  # fmt: skip
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), on_host(*grads), ref, strict=True):
        assert rel_err(g, r, floor=1.0) < 4e-5, name


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=DTYPE_IDS[1:])
def test_attention_half_precision(rng, dtype):
    q, k, v = random_qkv(rng, hq=4, hk=2, lq=600, lk=700, d=64, dtype=dtype)
    check_attention(q, k, v, dict(causal=True), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_block_sparse_matches_reference(rng, dtype):
    q, k, v = random_qkv(rng, hq=4, hk=2, lq=1000, lk=1000, d=64, dtype=dtype)
    layout = layouts.bigbird(1000, 64, window=(1, 1), random_blocks=2, seed=0, heads=4)
    check_attention(q, k, v, dict(causal=True), dtype, layout=layout)


def test_block_sparse_blocks_of_other_sizes(rng):
    q, k, v = random_qkv(rng, hq=2, lq=700, lk=650, d=128, dtype=np.float32)
    layout = layouts.from_block_mask(rng.random((2, 18, 28)) < 0.3, block=(40, 24), seq=(700, 650))
    check_attention(q, k, v, dict(window=(300, 100)), np.float32, layout=layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_lsh_hash_and_sort_equal_the_cpu_path(rng, dtype):
    x = random_array(rng, (4, 4096, 64), dtype)
    rotations = random_array(rng, (64, 2, 12))
    rotations[:, :, 1] = rotations[:, :, 0] * (1 + 1e-9)  # near ties, decided by the float64 product
    gpu = nsa.lsh_buckets(cupy.asarray(x), (8, 16), n_hashes=2, rotations=rotations, backend="numba-cuda")
    cpu = nsa.lsh_buckets(x, (8, 16), n_hashes=2, rotations=rotations, backend="reference")
    np.testing.assert_array_equal(cupy.asnumpy(gpu), cpu)
    order, inverse = nsa.lsh_sort(gpu, backend="numba-cuda")
    cpu_order, cpu_inverse = nsa.lsh_sort(cpu, backend="reference")
    np.testing.assert_array_equal(cupy.asnumpy(order), cpu_order)
    np.testing.assert_array_equal(cupy.asnumpy(inverse), cpu_inverse)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_lsh_attention_matches_reference(rng, dtype):
    qk, v = random_array(rng, (2, 512, 64), dtype), random_array(rng, (2, 512, 64), dtype)
    kw = dict(n_buckets=8, n_hashes=2, chunk_size=64, causal=True, seed=3)
    tol = TOL[np.dtype(dtype).name]
    out, lse = nsa.lsh_attention(*on_gpu(qk, v), return_lse=True, backend="numba-cuda", **kw)
    ref_out, ref_lse = reference.lsh_attention(qk, v, **kw)
    out_h, lse_h = on_host(out, lse)
    assert out_h.dtype == qk.dtype and rel_err(out_h, ref_out) < tol
    assert np.all(np.abs(lse_h - ref_lse) <= 10 * tol * np.maximum(np.abs(ref_lse), 1.0))
    dout = random_array(rng, out.shape, dtype)
    grads = nsa.lsh_attention_backward(*on_gpu(dout, qk, v), out, lse, backend="numba-cuda", **kw)
    for g, r in zip(on_host(*grads), reference.lsh_attention_backward(dout, qk, v, **kw)):
        assert rel_err(g, r, floor=1.0) < 4 * tol


def test_every_output_element_is_written(rng):
    """Buffers poisoned with NaN come back fully written, for every kernel family."""
    from npsparseattn.cuda.numba_cuda import exact as numba_exact
    from npsparseattn.cuda.numba_cuda import lsh as numba_lsh

    q, k, v = on_gpu(*random_qkv(rng, batch=(2,), hq=4, hk=2, lq=300, lk=517, d=64, dv=40, dtype=np.float32))
    mask = dict(scale=0.125, offset=217, left=150, right=0)
    out, lse = cupy.full((2, 4, 300, 40), np.nan, np.float32), cupy.full((2, 4, 300), np.nan, np.float32)
    numba_exact.forward(q, k, v, out=out, lse=lse, **mask)
    grads = tuple(cupy.full(x.shape, np.nan, np.float32) for x in (q, k, v))
    dout = cupy.asarray(random_array(rng, out.shape, np.float32))
    numba_exact.backward(dout, q, k, v, out, lse, grads=grads, **mask)
    assert not any(bool(cupy.isnan(x).any()) for x in (out, lse, *grads))
    qk, v = on_gpu(random_array(rng, (2, 3, 256, 64), np.float32), random_array(rng, (2, 3, 256, 32), np.float32))
    plan = nsa.lsh_sort(nsa.lsh_buckets(qk, 8, n_hashes=2, seed=0, backend="numba-cuda"), backend="numba-cuda")
    options = dict(chunk_size=32, chunks_before=1, chunks_after=1, causal=True, exclude_self=True)
    out, lse = cupy.full((2, 3, 256, 32), np.nan, np.float32), cupy.full((2, 3, 256), np.nan, np.float32)
    numba_lsh.forward(qk, v, *plan, out=out, lse=lse, **options)
    grads = (cupy.full(qk.shape, np.nan, np.float32), cupy.full(v.shape, np.nan, np.float32))
    dout = cupy.asarray(random_array(rng, out.shape, np.float32))
    numba_lsh.backward(dout, qk, v, out, lse, *plan, grads=grads, **options)
    assert not any(bool(cupy.isnan(x).any()) for x in (out, lse, *grads))


def test_runs_on_the_callers_stream(rng):
    """Inputs made on a non-blocking stream and used at once: the kernels must queue behind them on that stream."""
    q, k, v = random_qkv(rng, hq=8, lq=2048, lk=2048, d=64, dtype=np.float32)
    with cupy.cuda.Stream(non_blocking=True) as stream:
        qd, kd, vd = (cupy.asarray(x) * 1 for x in (q, k, v))  # written by kernels on `stream`
        out = nsa.attention(qd, kd, vd, causal=True, backend="numba-cuda")
        host = cupy.asnumpy(out, stream=stream)
        stream.synchronize()
    assert rel_err(host, reference.attention(q, k, v, causal=True)[0]) < 1e-5


def test_backward_is_deterministic(rng):
    q, k, v = on_gpu(*random_qkv(rng, hq=8, hk=2, lq=1024, lk=1024, d=64, dtype=np.float32))
    out, lse = nsa.attention(q, k, v, causal=True, return_lse=True, backend="numba-cuda")
    dout = cupy.asarray(random_array(rng, out.shape, np.float32))
    first = nsa.attention_backward(dout, q, k, v, out, lse, causal=True, backend="numba-cuda")
    second = nsa.attention_backward(dout, q, k, v, out, lse, causal=True, backend="numba-cuda")
    assert all(bool((a == b).all()) for a, b in zip(first, second))


def test_arrays_on_a_second_gpu(rng):
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("one GPU: the arrays-on-device-1 case needs two")
    q, k, v = random_qkv(rng, hq=2, lq=300, lk=300, d=64, dtype=np.float32)
    with cupy.cuda.Device(1):
        qd, kd, vd = on_gpu(q, k, v)
    out = nsa.attention(qd, kd, vd, causal=True, backend="numba-cuda")
    assert out.device.id == 1
    assert rel_err(cupy.asnumpy(out), reference.attention(q, k, v, causal=True)[0]) < 1e-5


# --------------------------------------------------------------------------- ring attention on GPUs

RING_WORKER = textwrap.dedent(
    '''
    """Ring attention on CuPy arrays under mpiexec; rank 0 writes the errors against the float64 reference."""
    import json
    import sys

    import cupy
    import numpy as np
    from mpi4py import MPI

    import npsparseattn as nsa
    from npsparseattn import reference
    from npsparseattn.distributed import MPIComm, NCCLComm

    engine, path = sys.argv[1], sys.argv[2]
    comm = MPIComm(host_staging=True) if engine == "mpi" else NCCLComm.from_mpi()
    rank, world = comm.rank, comm.size
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal(s).astype(np.float32) for s in [(1, 4, 403, 64), (1, 2, 403, 64),
                                                                        (1, 2, 403, 64), (1, 4, 403, 64)])
    errors = {}
    for causal in (True, False):
        for sharding in ("zigzag", "contiguous"):
            local = [cupy.asarray(nsa.shard(x, rank, world, sharding)) for x in (q, k, v, dout)]
            kw = dict(causal=causal, sharding=sharding, backend="numba-cuda")
            out, lse = nsa.ring_attention(*local[:3], comm, return_lse=True, **kw)
            grads = nsa.ring_attention_backward(local[3], *local[:3], out, lse, comm, **kw)
            parts = MPI.COMM_WORLD.gather([cupy.asnumpy(x) for x in (out, *grads)], root=0)
            if rank == 0:
                whole = [nsa.unshard([p[i] for p in parts], sharding) for i in range(4)]
                ref_out, _ = reference.attention(q, k, v, causal=causal)
                refs = [ref_out, *reference.attention_backward(dout, q, k, v, causal=causal)]
                errors[f"{sharding}-{'causal' if causal else 'full'}"] = [
                    float(np.abs(a - r).max() / max(np.abs(r).max(), 1.0)) for a, r in zip(whole, refs)
                ]
    if rank == 0:
        with open(path, "w") as f:
            json.dump(errors, f)
    '''
)


def mpiexec() -> str:
    """The ``mpiexec`` beside this Python (the mpich wheel's), or one on the PATH; skip without one."""
    beside = Path(sys.executable).with_name("mpiexec")
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.skip("no mpiexec here (pip install 'npsparseattn[mpi]')")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install 'npsparseattn[mpi]')")
    return found


def run_ring(engine: str, tmp_path: Path) -> dict:
    worker = tmp_path / "ring_worker.py"
    worker.write_text(RING_WORKER)
    result_path = tmp_path / "errors.json"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    command = [mpiexec(), "-n", "2", sys.executable, str(worker), engine, str(result_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(result_path.read_text())


def test_ring_over_mpi_with_host_staging_on_one_gpu(tmp_path):
    """Two ranks share one GPU; K/V blocks travel through host memory over MPI."""
    errors = run_ring("mpi", tmp_path)
    assert len(errors) == 4
    for case, values in errors.items():
        assert max(values) < 4e-5, (case, values)


def test_ring_over_nccl(tmp_path):
    """One GPU per rank (NCCL refuses two ranks on one device)."""
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("NCCL ring needs one GPU per rank: 2 ranks, 1 GPU here (NCCL refuses two ranks on one device)")
    errors = run_ring("nccl", tmp_path)
    assert len(errors) == 4
    for case, values in errors.items():
        assert max(values) < 4e-5, (case, values)
