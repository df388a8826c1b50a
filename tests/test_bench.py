"""Benchmark plumbing: timing helpers, energy readings, the scaling sweep and plot."""

from __future__ import annotations

import json
import sys
import time
import types

import numpy as np
import pytest

import npsparseattn as nsa
from npsparseattn import _dispatch
from npsparseattn.bench import common, device, energy, plot, torch_sdpa
from npsparseattn.problems import attention_problem

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_adaptive_time_repeats_cheap_calls_and_times_slow_ones_once():
    calls = []
    assert common.adaptive_time(lambda: calls.append(1), budget=1.0, repeat=3) >= 0
    assert len(calls) == 3
    slow = []
    seconds = common.adaptive_time(lambda: (slow.append(1), time.sleep(0.03)), budget=0.05, repeat=3)
    assert len(slow) == 1
    assert seconds >= 0.03


def test_bytes_per_token():
    assert common.bytes_per_token(4096, 1024) == 4.0
    assert common.bytes_per_token(4096, 0) == 0.0


@pytest.mark.parametrize(
    ("joules", "reason", "text"),
    [
        (None, "no GPU", "n/a (no GPU)"),
        (2.5, None, "2.5 J"),
        (2.1e-3, None, "2.1 mJ"),
        (3e-6, None, "3 µJ"),
        (4e-9, None, "4 nJ"),
    ],
)
def test_format_energy_per_token(joules, reason, text):
    assert energy.format_energy_per_token(joules, reason) == text


def test_cpu_runs_are_never_metered():
    assert energy.energy_unavailable("numpy") is not None
    value, reason = energy.energy_per_token(lambda: None, "numpy", 10)
    assert value is None and reason


class FakeNVML:
    """Stands in for pynvml: an energy counter that advances 1500 mJ per reading."""

    def __init__(self):
        self.millijoules = 10_000

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        self.millijoules += 1500
        return self.millijoules


def test_measure_energy_reads_the_counter_around_the_call(monkeypatch):
    monkeypatch.setattr(energy, "_nvml", lambda: (FakeNVML(), None))
    result, joules = energy.measure_energy(lambda: "done")
    assert result == "done" and joules == pytest.approx(1.5)
    assert energy.energy_unavailable("cupy") is None
    assert energy.energy_unavailable("numpy") == "CPU run"
    per_token, reason = energy.energy_per_token(lambda: None, "cupy", 3)
    assert per_token == pytest.approx(0.5) and reason is None


def test_measure_energy_without_nvml_says_why(monkeypatch):
    monkeypatch.setattr(energy, "_nvml", lambda: (None, "no GPU"))
    with pytest.raises(RuntimeError, match="cannot measure GPU energy: no GPU"):
        energy.measure_energy(lambda: None)


def test_this_machine_reports_a_reason_or_a_meter():
    reason = energy.energy_unavailable("cupy")
    if reason is None:
        _, joules = energy.measure_energy(lambda: time.sleep(0.01))
        assert joules >= 0
    else:
        with pytest.raises(RuntimeError, match=reason):
            energy.measure_energy(lambda: None)


def test_sweep_times_every_available_method(monkeypatch):
    result = plot.sweep([128, 256], dim=16)
    labels = {p["method"] for p in result["points"]}
    found, missing = plot.methods()
    assert labels == {m.label for m in found}
    assert len(found) == 4 and not missing
    assert all(p["seconds"] > 0 for p in result["points"])
    assert {p["seq"] for p in result["points"]} == {128, 256}
    assert result["config"] == {"heads": 1, "dim": 16, "dtype": "float32", "causal": True, "batch": 1}


def test_sweep_stops_dense_when_scores_would_not_fit(monkeypatch):
    monkeypatch.setattr(plot, "_total_memory", lambda: 4 * 2 * 4 * 128 * 128)
    result = plot.sweep([128, 256], dim=8)
    dense = next(m.label for m in plot.methods()[0] if m.label.startswith("dense"))
    assert [p["seq"] for p in result["points"] if p["method"] == dense] == [128]
    skip = plot.first_skips(result)[dense]
    assert skip["seq"] == 256
    assert skip["reason"] == "needs 512.0 KiB for scores (machine: 512.0 KiB)"


def test_sweep_stops_a_method_after_a_slow_call():
    result = plot.sweep([128, 256, 512], dim=8, time_limit=0.0)
    assert {p["seq"] for p in result["points"]} == {128}
    assert all(s["reason"].startswith("stopped after") for s in result["skipped"])
    assert {s["seq"] for s in result["skipped"]} == {256, 512}


def test_missing_operations_are_left_out_and_named(monkeypatch):
    def unavailable():
        raise ImportError("No module named 'npsparseattn.lsh'")

    monkeypatch.setattr(plot, "_lsh_method", unavailable)
    found, missing = plot.methods()
    assert missing["LSH"] == "not importable (No module named 'npsparseattn.lsh')"
    assert not any(m.label.startswith("LSH") for m in found)


def test_render_and_plot(tmp_path):
    result = {
        "config": {"heads": 1, "dim": 64, "dtype": "float32", "causal": True, "batch": 1},
        "points": [
            {"method": "dense NumPy (L x L scores)", "seq": 512, "seconds": 0.003},
            {"method": "dense NumPy (L x L scores)", "seq": 1024, "seconds": 0.012},
            {"method": "tiled exact attention (numba)", "seq": 512, "seconds": 0.001},
            {"method": "tiled exact attention (numba)", "seq": 1024, "seconds": 0.004},
            {"method": "tiled exact attention (numba)", "seq": 2048, "seconds": 0.016},
        ],
        "skipped": [{"method": "dense NumPy (L x L scores)", "seq": 2048, "reason": "needs 32.0 MiB for scores"}],
        "missing": {},
    }
    table = plot.render(result).splitlines()
    assert table[0].split() == ["L", "dense", "NumPy", "(L", "x", "L", "scores)", "ms", "tiled", "exact",
                                "attention", "(numba)", "ms"]  # fmt: skip
    assert table[2].split() == ["512", "3.0", "1.0"]
    assert table[4].split() == ["2048", "-", "16.0"]
    path = plot.plot(result, tmp_path / "scaling.png")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and 10_000 < len(data) < 150_000


def test_dense_numpy_attention_matches_reference(rng):
    from npsparseattn import reference

    q, k, v = (rng.standard_normal((2, 40, 8)) for _ in range(3))
    for causal in (False, True):
        expected, _ = reference.attention(q, k, v, causal=causal)
        np.testing.assert_allclose(common.dense_numpy_attention(q, k, v, causal=causal), expected, rtol=1e-12)


def test_sweep_skips_lengths_a_method_cannot_run():
    result = plot.sweep([96, 128], dim=8)
    lsh = next(m.label for m in plot.methods()[0] if m.label.startswith("LSH"))
    assert [p["seq"] for p in result["points"] if p["method"] == lsh] == [128]
    assert plot.first_skips(result)[lsh] == {
        "method": lsh,
        "seq": 96,
        "reason": "L must be a multiple of the chunk size 64",
    }
    assert {p["seq"] for p in result["points"] if p["method"].startswith("tiled")} == {96, 128}


# --------------------------------------------------------------------------- --backend and --compare torch

TINY = ["--seq", "96", "--heads", "2", "--dim", "16", "--repeat", "2", "--memory-seq", "0", "--causal", "yes"]


def _bench_json(tmp_path, argv):
    from npsparseattn import cli

    path = tmp_path / "result.json"
    assert cli.main([*argv, "--json", str(path)]) == 0
    return json.loads(path.read_text())


@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_bench_attention_runs_the_named_backend(tmp_path, capsys, backend):
    result = _bench_json(tmp_path, ["bench", "attention", *TINY, "--backend", backend])
    out = capsys.readouterr().out
    (row,) = result["rows"]
    assert row["backend"] == backend and row["device"] == "numpy"
    # every CPU table names the machine (model, flags, vector width, BLAS)
    assert result["device"].startswith(f"{backend} on NumPy arrays (CPU: ") and "BLAS: " in result["device"]
    assert result["device"] in out
    assert row["max_rel_error"] < 1e-5
    assert row["forward_gflops"] > 0 and row["backward_gflops"] > 0 and row["gemm_dtype"] == "float32"
    assert row["backward_extra_bytes"] >= 0 and "bwd mem" in out.splitlines()[0]


def test_bench_backend_choices_come_from_the_registry(capsys):
    from npsparseattn import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "attention", "--backend", "nonexistent"])
    assert exc.value.code == 2
    choices = ", ".join(repr(name) for name in ["auto", *nsa.available_backends("attention")])
    assert f"choose from {choices}" in capsys.readouterr().err


def test_bench_refuses_a_dtype_the_backend_cannot_take_with_the_registry_reason(gpu_only_backend):
    from npsparseattn import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "attention", *TINY, "--backend", "gpu-only", "--dtype", "bfloat16"])
    assert str(exc.value) == (
        "npsparseattn bench: backend 'gpu-only' cannot run attention: "
        "dtype bfloat16 not supported (supports float16, float32)"
    )


@pytest.fixture
def gpu_only_backend(monkeypatch):
    """Backend ``"gpu-only"`` of attention: reads CuPy arrays and cannot run here (its reason says why)."""
    monkeypatch.setattr(_dispatch, "_TABLE", list(_dispatch._TABLE))
    module = types.ModuleType("gpu_only_attention")
    module.KINDS, module.DTYPES = ("cupy",), ("float16", "float32")
    module.TOLERANCE, module.STRIDED_ROWS = {"float16": 2e-3, "float32": 1e-5}, False
    module.unsupported = lambda problem: ["no usable CUDA GPU (test stand-in)"]
    module.compute_dtype = np.dtype

    def never(*args, **kwargs):
        raise AssertionError("a backend that cannot run here was called")

    module.forward = module.backward = never
    monkeypatch.setitem(sys.modules, module.__name__, module)
    nsa.register_backend("attention", "gpu-only", module.__name__, priority=200, auto=False)
    return module


def test_bench_backend_that_cannot_run_here_says_why_in_one_line(gpu_only_backend):
    from npsparseattn import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "attention", *TINY, "--backend", "gpu-only", "--dtype", "float16"])
    message = str(exc.value)
    assert message == "npsparseattn bench: backend 'gpu-only' cannot run attention: no usable CUDA GPU (test stand-in)"


def test_auto_backend_reasons_are_joined_into_one_line(gpu_only_backend, monkeypatch):
    numba = next(impl for impl in _dispatch.implementations("attention") if impl.name == "numba").module
    monkeypatch.setattr(numba, "unsupported", lambda problem: ["refused for this test"])

    def problem():
        q = np.ones((1, 1, 4, 8), np.float32)
        return attention_problem(q, q, q)

    with pytest.raises(SystemExit) as exc:
        device.device_for("attention", "auto", problem)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith("npsparseattn bench: no backend can run attention for these inputs: numba: refused")
    assert "; gpu-only: takes CuPy arrays" in message


class _Stream:
    def __init__(self):
        self.synchronised = 0

    def synchronize(self):
        self.synchronised += 1


def test_gpu_device_synchronises_inside_the_timed_call(fake_cupy):
    stream = _Stream()
    fake_cupy.cuda = types.SimpleNamespace(get_current_stream=lambda: stream)
    gpu = device.Device("cupy", "cupy")
    order = []
    timed = gpu.call(lambda: order.append("kernel") or "result")
    assert stream.synchronised == 0
    assert timed() == "result" and order == ["kernel"] and stream.synchronised == 1
    cpu = device.Device("numba", "numpy")
    fn = lambda: None  # noqa: E731
    assert cpu.call(fn) is fn


def test_device_kind_follows_the_backend_kinds(gpu_only_backend):
    def problem():
        return attention_problem(*(np.ones((1, 1, 4, 8), np.float32) for _ in range(3)))

    assert device.device_for("attention", "numba", problem) == device.Device("numba", "numpy")
    assert device.device_for("attention", "auto", problem).kind == "numpy"
    assert device._device_kind("attention", "gpu-only") == "cupy"


def test_format_rate_switches_to_tflops():
    assert common.format_rate(999.94) == "999.9 GF/s"
    assert common.format_rate(1254.0) == "1.25 TF/s"


def test_interleaved_best_times_every_call_in_every_round():
    order = []
    best = common.interleaved_best({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3)
    assert order == ["a", "b"] * 3
    assert set(best) == {"a", "b"} and all(t >= 0 for t in best.values())


def test_bench_block_sparse_and_lsh_take_a_backend(tmp_path, capsys):
    argv = ["bench", "block-sparse", "--seq", "256", "--heads", "1", "--dim", "16", "--block", "64", "--windows", "1"]
    result = _bench_json(tmp_path, [*argv, "--no-patterns", "--backward", "--repeat", "1", "--backend", "numba"])
    assert result["backend"] == "numba" and result["device"].startswith("numba on NumPy arrays (CPU: ")
    assert result["gemm_gflops"] > 0 and result["rows"][0]["forward_gflops"] > 0
    assert result["rows"][0]["backward_gflops"] > 0 and result["max_rel_error"] < 1e-5
    assert "same-run GEMM (float32)" in capsys.readouterr().out
    argv = ["bench", "lsh", "--seq", "128", "--heads", "1", "--dim", "8", "--chunk-size", "32", "--repeat", "1"]
    result = _bench_json(tmp_path, [*argv, "--dense-seq", "0", "--backend", "numba"])
    assert result["device"].startswith("numba on NumPy arrays (CPU: ") and result["max_rel_error"] < 1e-5
    assert result["rows"][0]["forward_gflops"] > 0 and result["gemm_gflops"] > 0


def test_compare_torch_without_torch_says_so(monkeypatch):
    from npsparseattn import cli

    monkeypatch.setitem(sys.modules, "torch", None)
    assert torch_sdpa.torch_missing().startswith("PyTorch is not installed")
    assert torch_sdpa.torch_missing("cupy").startswith("PyTorch is not installed")
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "attention", *TINY, "--compare", "torch"])
    assert str(exc.value).startswith("npsparseattn bench: --compare torch: PyTorch is not installed")


def test_compare_torch_times_sdpa_on_the_same_data(tmp_path, capsys):
    reason = torch_sdpa.torch_missing()
    if reason:
        pytest.skip(reason)
    import torch
    from numba import get_num_threads

    argv = ["bench", "attention", *TINY[:-2], "--causal", "both", "--kv-heads", "1", "--compare", "torch"]
    result = _bench_json(tmp_path, argv)
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert "fwd x torch" in header and "f+b x torch" in header
    assert torch.get_num_threads() == get_num_threads()
    assert f"compared with PyTorch {torch.__version__} (CPU, {get_num_threads()} threads)" in out
    for row in result["rows"]:
        assert row["kv_heads"] == 1
        assert row["forward_vs_torch"] == row["torch_forward_s"] / row["forward_s"]
        assert row["forward_backward_vs_torch"] == row["torch_forward_backward_s"] / row["forward_backward_s"]


def test_compare_torch_on_cupy_arrays_needs_torch_with_cuda(monkeypatch):
    reason = torch_sdpa.torch_missing()
    if reason:
        pytest.skip(reason)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_sdpa.torch_missing("numpy") is None
    assert "cannot use a CUDA device here" in torch_sdpa.torch_missing("cupy")


@pytest.mark.parametrize("causal", [False, True])
def test_torch_sdpa_matches_ours_on_the_same_arrays(rng, causal):
    reason = torch_sdpa.torch_missing()
    if reason:
        pytest.skip(reason)
    q = rng.standard_normal((1, 4, 50, 16)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, 50, 16)).astype(np.float32) for _ in range(2))
    dout = rng.standard_normal(q.shape).astype(np.float32)
    sdpa = torch_sdpa.TorchAttention(device.Device("numba", "numpy"), q, k, v, dout, causal=causal, threads=1)
    out, lse = nsa.attention(q, k, v, causal=causal, return_lse=True)
    np.testing.assert_allclose(sdpa.forward().numpy(), out, rtol=0, atol=1e-5)
    ours = nsa.attention_backward(dout, q, k, v, out, lse, causal=causal)
    for theirs, mine in zip(sdpa.forward_backward(), ours):
        np.testing.assert_allclose(theirs.numpy(), mine, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="top-left"):
        torch_sdpa.TorchAttention(device.Device("numba", "numpy"), q[:, :, :10], k, v, dout, causal=True, threads=1)
