"""The numba-cuda backend without a GPU: registry, reasons, input checks, tiles, and compile checks for sm_80/sm_90.

The kernels themselves run in the separate simulator run (``tests/cudasim``,
``make test-cudasim``) and on a GPU (``tests/test_numba_cuda_gpu.py``).
Here every kernel instance the backend launches is compiled to PTX for
compute capability 8.0 and 9.0 and its PTX checked: at most 48 KiB of static
shared memory, no local memory (register tiles stay in registers), no
float64 arithmetic outside the float64 hashing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numba
import numpy as np
import pytest
from conftest import FakeCupyArray, random_qkv

import npsparseattn as nsa
from npsparseattn import _dispatch, layouts
from npsparseattn.cuda import _env
from npsparseattn.cuda.numba_cuda import compile as numba_compile
from npsparseattn.cuda.numba_cuda import exact as numba_exact
from npsparseattn.cuda.numba_cuda import runtime as numba_runtime
from npsparseattn.cuda.numba_cuda import tiles as numba_tiles
from npsparseattn.cuda.numba_cuda import user_functions
from npsparseattn.problems import attention_problem
from npsparseattn.problems.scores import with_score_mods

MODULES = {
    "attention": "npsparseattn.cuda.numba_cuda.exact",
    "block_sparse_attention": "npsparseattn.cuda.numba_cuda.block_sparse",
    "lsh_buckets": "npsparseattn.cuda.numba_cuda.lsh_hash",
    "lsh_sort": "npsparseattn.cuda.numba_cuda.lsh_sort",
    "lsh_attention": "npsparseattn.cuda.numba_cuda.lsh",
    "sparse_attention": "npsparseattn.cuda.numba_cuda.sparse",
}
ROOT = Path(__file__).resolve().parent.parent


INFERENCE = (
    "attention_varlen",
    "attention_with_kvcache",
    "sparse_attention_varlen",
)  # CPU kernels only: the registry says so


@pytest.mark.parametrize("op", [op for op in _dispatch.OPERATIONS if op not in INFERENCE])
def test_registered_for_every_operation(op):
    assert "numba-cuda" in nsa.available_backends(op)
    impl = next(i for i in _dispatch.implementations(op) if i.name == "numba-cuda")
    assert impl.row.priority == 30 and impl.row.module == MODULES[_dispatch.ALIASES.get(op, op)]


@pytest.mark.parametrize("op", INFERENCE)
def test_inference_operations_say_they_have_no_numba_cuda_kernels(op):
    assert "numba-cuda" not in nsa.available_backends(op)


def test_modules_import_neither_cupy_nor_numba_cuda():
    """The registry may import a module just to ask its reasons: that must not load CuPy or numba.cuda."""
    code = (
        "import sys, importlib\n"
        f"for name in {sorted(MODULES.values())!r}:\n"
        "    assert importlib.import_module(name).KINDS == ('cupy',), name\n"
        "importlib.import_module('npsparseattn.cuda.numba_cuda.compile')\n"
        "bad = [m for m in ('cupy', 'numba.cuda') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})


def test_numpy_arrays_are_refused_plainly_off_the_simulator(rng):
    q, k, v = random_qkv(rng, hq=2, lq=8, d=4, dtype=np.float32)
    with pytest.raises(nsa.BackendError, match=r"^backend 'numba-cuda' cannot run attention: takes CuPy arrays, got"):
        nsa.attention(q, k, v, backend="numba-cuda")
    with pytest.raises(nsa.BackendError, match=r"backend 'numba-cuda' cannot run lsh_attention: takes CuPy arrays"):
        nsa.lsh_attention(q, v, n_buckets=4, chunk_size=4, seed=0, backend="numba-cuda")


ENVIRONMENTS = [
    pytest.param(
        dict(missing_package=lambda module, package: f"{package} is not installed (pip install 'npsparseattn[cuda]')"),
        "numba-cuda is not installed (pip install 'npsparseattn[cuda]')",
        id="no-numba-cuda",
    ),
    pytest.param(
        dict(missing_package=lambda module, package: None, _device=lambda: ("no CUDA GPU found", None)),
        "no CUDA GPU found",
        id="no-gpu",
    ),
    pytest.param(
        dict(missing_package=lambda module, package: None, _device=lambda: (None, (7, 5))),
        "the GPU has compute capability 7.5; 8.0 or newer is needed",
        id="old-gpu",
    ),
    pytest.param(
        dict(
            missing_package=lambda module, package: None,
            _device=lambda: (None, (9, 0)),
            _numba_gpu_reasons=lambda: ("numba-cuda cannot use the CUDA driver",),
        ),
        "numba-cuda cannot use the CUDA driver",
        id="no-driver-for-numba",
    ),
]


@pytest.mark.parametrize(("patches", "reason"), ENVIRONMENTS)
def test_forcing_the_backend_where_it_cannot_run_names_the_reason(fake_cupy, monkeypatch, rng, patches, reason):
    for name, value in patches.items():
        monkeypatch.setattr(_env, name, value)
    q, k, v = (FakeCupyArray(x) for x in random_qkv(rng, hq=2, lq=8, d=4, dtype=np.float32))
    with pytest.raises(nsa.BackendError) as info:
        nsa.attention(q, k, v, backend="numba-cuda")
    assert str(info.value) == f"backend 'numba-cuda' cannot run attention: {reason}"
    with pytest.raises(nsa.BackendError) as info:
        nsa.lsh_buckets(q, 4, seed=0, backend="numba-cuda")
    assert str(info.value) == f"backend 'numba-cuda' cannot run lsh_buckets: {reason}"
    with pytest.raises(nsa.BackendError) as info:
        nsa.attention(q, k, v)
    assert f"\n  numba-cuda: {reason}" in str(info.value)


def test_head_dimensions_wider_than_the_tiles_are_refused(fake_cupy, monkeypatch, rng):
    monkeypatch.setattr(_env, "numba_cuda_reasons", lambda: [])
    q, k, v = (FakeCupyArray(x) for x in random_qkv(rng, hq=2, lq=8, d=136, dv=8, dtype=np.float32))
    with pytest.raises(nsa.BackendError, match="head dimension 136 is wider than the 128 columns of its shared-memory"):
        nsa.attention(q, k, v, backend="numba-cuda")


BAD_CALLS = [
    pytest.param(lambda q, k, v, be: nsa.attention(q, k[..., :3], v, backend=be), id="d-mismatch"),
    pytest.param(lambda q, k, v, be: nsa.attention(q, k.astype(np.float64), v, backend=be), id="dtype-mismatch"),
    pytest.param(lambda q, k, v, be: nsa.attention(q, k[:1, :1], v, backend=be), id="gqa-heads"),
    pytest.param(lambda q, k, v, be: nsa.attention(q, k, v, window=(-1, 0), backend=be), id="window"),
    pytest.param(lambda q, k, v, be: nsa.attention(q, k, v, causal="yes", backend=be), id="causal-flag"),
    pytest.param(lambda q, k, v, be: nsa.attention_backward(q, q, k, v, q, q, backend=be), id="backward-lse-shape"),
    pytest.param(
        lambda q, k, v, be: nsa.block_sparse_attention(q, k, v, layouts.dense(9, 4), backend=be), id="layout-seq"
    ),
    pytest.param(lambda q, k, v, be: nsa.lsh_attention(q, v, n_buckets=3, seed=0, backend=be), id="odd-buckets"),
    pytest.param(
        lambda q, k, v, be: nsa.lsh_attention(q, v, n_buckets=4, chunk_size=5, seed=0, backend=be), id="lsh-chunk"
    ),
    pytest.param(lambda q, k, v, be: nsa.lsh_buckets(q, 4, rotations=np.ones(3), backend=be), id="rotations"),
    pytest.param(lambda q, k, v, be: nsa.lsh_sort(q, backend=be), id="sort-dtype"),
]


@pytest.mark.parametrize("call", BAD_CALLS)
def test_bad_inputs_get_the_cpu_path_checks_and_messages(rng, call):
    q, k, v = random_qkv(rng, hq=2, lq=8, d=4, dtype=np.float32)
    with pytest.raises((TypeError, ValueError)) as on_cpu:
        call(q, k, v, "numba")
    with pytest.raises(type(on_cpu.value)) as on_gpu:
        call(q, k, v, "numba-cuda")
    assert not isinstance(on_gpu.value, nsa.BackendError)
    assert str(on_gpu.value) == str(on_cpu.value)


def test_mixed_array_kinds_are_a_type_error_naming_both(fake_cupy, rng):
    q, k, v = random_qkv(rng, hq=2, lq=8, d=4, dtype=np.float32)
    with pytest.raises(TypeError, match="q is a NumPy array but v is a CuPy array"):
        nsa.attention(q, k, FakeCupyArray(v), backend="numba-cuda")


def test_tiles_per_head_dimension():
    assert numba_tiles.tiles("forward", 64, False).dp == 64
    assert numba_tiles.tiles("forward", 65, False).dp == 128
    assert numba_tiles.tiles("dq", 1, True) == numba_tiles.Tiles(4, 4, 2, 2, 16)
    forward = numba_tiles.tiles("forward", 40, False)
    assert (forward.rows, forward.cols, forward.threads, forward.dn) == (64, 32, 64, 8)
    with pytest.raises(ValueError, match="head dimension 129 is wider than the widest tiles"):
        numba_tiles.tiles("dkdv", 129, False)


def test_numpy_arrays_are_not_launched_off_the_simulator():
    with pytest.raises(TypeError, match="numba-cuda kernels take CuPy arrays on a GPU"):
        numba_runtime.launch(None, 1, 32, np.zeros(3))


def test_simulator_tests_refuse_to_run_without_the_simulator():
    env = {"PYTHONPATH": str(ROOT), "PATH": "", "NUMBA_ENABLE_CUDASIM": "0"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/cudasim"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "set NUMBA_ENABLE_CUDASIM=1 before starting pytest" in result.stdout + result.stderr


# --------------------------------------------------------------------------- compile checks

LAUNCHES = numba_compile.representative_launches()


def test_launches_cover_every_kernel_and_storage_dtype():
    names = {launch.kernel.py_func.__name__ for launch in LAUNCHES}
    assert names == {
        "forward", "row_dot", "dq_pass", "dkdv_pass", "hash_rows", "sort_rows", "key_scale", "lsh_forward",
        "combine", "row_stats", "lsh_dq", "lsh_dkdv", "gather",
    }  # fmt: skip
    forward = [launch for launch in LAUNCHES if launch.kernel.py_func.__name__ == "forward"]
    storage = {numba_compile.storage_dtype(launch) for launch in forward}
    assert len(forward) == 6 and storage == {"float16", "uint16", "float32"}  # bfloat16 travels as uint16


def launch_id(launch) -> str:
    return f"{launch.kernel.py_func.__name__}-{numba_compile.describe(launch)}"


@pytest.mark.slow
@pytest.mark.parametrize("launch", LAUNCHES, ids=launch_id)
def test_kernel_compiles_for_sm80_and_sm90(launch):
    reports = numba_compile.compile_report(launch)
    assert [r.cc for r in reports] == [(8, 0), (9, 0)]
    for report in reports:
        assert report.problems() == [], report


def test_ptx_reader_finds_what_it_checks():
    ptx = (
        ".shared .align 4 .b8 _cudapy_smem_1[16384];\n.shared .align 4 .b8 _cudapy_smem_2[8448];\n"
        ".local .align 16 .b8 \t__local_depot0[288];\n\tfma.rn.f64 \t%fd3, %fd1, %fd2, %fd3;\n"
        "\tcvt.rn.f32.f64 \t%f1, %fd1;\n\tadd.f32 \t%f2, %f1, %f1;\n"
    )
    assert numba_compile.read_ptx(ptx) == (16384 + 8448, 288, 1)
    report = numba_compile.PTXReport("forward", "float32", (9, 0), 50000, 288, 1, 0.0)
    assert len(report.problems()) == 3


# --------------------------------------------------------------------------- a user's score_mod and mask_mod


@numba.njit
def tempered(score, b, h, q_idx, kv_idx):
    f32 = numba.float32
    return score * (f32(0.75) + f32(0.125) * f32(h)) - f32(0.01) * f32(q_idx - kv_idx)


@numba.njit
def tempered_grad(score, b, h, q_idx, kv_idx):
    return numba.float32(0.75) + numba.float32(0.125) * numba.float32(h)


@numba.njit
def striped(b, h, q_idx, kv_idx):
    return (q_idx + kv_idx + h) % 3 != 0


@numba.njit
def listed(score, b, h, q_idx, kv_idx):
    """Runs on the CPU, not on the GPU: a list needs numba's runtime, which device code lacks."""
    return [score][0]


@numba.njit
def halves(b, h, q_idx, kv_idx):
    return 0.5


def _user_problem(q, **user):
    return with_score_mods(attention_problem(q, q, q, causal=True), **user)


def test_user_functions_the_gpu_cannot_compile_are_refused_with_numbas_reason():
    q = np.zeros((1, 2, 8, 16), np.float32)
    found = user_functions.reasons(_user_problem(q, score_mod=listed, mask_mod=halves).mods)
    assert len(found) == 2
    assert "score_mod" in found[0] and "cannot be compiled for the GPU" in found[0] and "NRT" in found[0]
    assert "mask_mod" in found[1] and "must return a bool" in found[1]
    fine = _user_problem(q, score_mod=tempered, score_mod_grad=tempered_grad, mask_mod=striped).mods
    assert user_functions.reasons(fine) == []


@pytest.mark.slow
def test_kernels_with_user_functions_compile_without_local_memory(rng):
    """The kernels built for a score_mod/mask_mod keep their register tiles in registers (sm_80).

    Head dimension 40 (the 64-column tiles): with that capacity's usual
    register tiles these kernels spilled; they take smaller ones (tiles.tiles(user=True)).
    """
    q = rng.standard_normal((1, 2, 64, 40)).astype(np.float16)
    p = _user_problem(q, score_mod=tempered, score_mod_grad=tempered_grad, mask_mod=striped, softcap=2.0)
    lse = np.zeros(q.shape[:3], np.float32)
    with numba_runtime.record_launches() as launches:
        numba_exact.forward(q, q, q, **p.visibility())
        numba_exact.backward(q, q, q, q, q, lse, **p.visibility())
    kernels = [launch for launch in launches if launch.kernel.py_func.__name__ != "row_dot"]
    assert [launch.kernel.py_func.__name__ for launch in kernels] == ["forward", "dq_pass", "dkdv_pass"]
    for launch in kernels:
        (report,) = numba_compile.compile_report(launch, ((8, 0),))
        assert report.problems() == [], report


# --------------------------------------------------------------------------- MPI host staging (ring on GPUs)


class StagedArray:
    """A device array stand-in: what MPIComm's host staging touches (shape, dtype, flags, ``set``)."""

    def __init__(self, x: np.ndarray):
        self.host = np.ascontiguousarray(x)
        self.shape, self.dtype, self.flags = self.host.shape, self.host.dtype, self.host.flags

    def set(self, values: np.ndarray) -> None:
        self.host[...] = values


def test_mpi_host_staging_moves_device_arrays_through_host_buffers(monkeypatch):
    """A ring of one over MPI.COMM_SELF: sends copied out as bytes (bfloat16 too), received at the wait."""
    mpi = pytest.importorskip("mpi4py.MPI")
    from npsparseattn.distributed import MPIComm

    fake = type(sys)("cupy")
    fake.asnumpy = lambda x: x.host.copy()
    fake.ndarray = StagedArray
    monkeypatch.setitem(sys.modules, "cupy", fake)
    comm = MPIComm(mpi.COMM_SELF, timeout=5, host_staging=True)
    assert comm.kinds == ("numpy", "cupy")
    assert MPIComm(mpi.COMM_SELF, timeout=5).kinds == ("numpy",)
    send = [StagedArray(np.arange(6.0).reshape(2, 3)), StagedArray(np.arange(4).astype(ml_dtypes.bfloat16))]
    recv = [StagedArray(np.zeros((2, 3))), StagedArray(np.zeros(4, ml_dtypes.bfloat16))]
    transfer = comm.shift(send, recv, tag=2)
    assert np.all(recv[0].host == 0)  # nothing reaches the device array before the wait
    comm.wait(transfer)
    np.testing.assert_array_equal(recv[0].host, send[0].host)
    assert recv[1].host.dtype == send[1].host.dtype and np.array_equal(recv[1].host, send[1].host)
