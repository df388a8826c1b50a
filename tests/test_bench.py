"""Benchmark plumbing: timing helpers, energy readings, the scaling sweep and plot."""

from __future__ import annotations

import time

import numpy as np
import pytest

from npsparseattn.bench import common, energy, plot

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
