"""The GPU environment reasons: what a GPU backend says when the machine lacks something."""

from __future__ import annotations

import pytest

from npsparseattn.cuda import _env


def test_missing_package_names_the_install_command():
    assert _env.missing_package("numpy", "NumPy") is None
    reason = _env.missing_package("no_such_module_xyz", "CuPy (cupy-cuda13x)")
    assert reason == "CuPy (cupy-cuda13x) is not installed (pip install 'npsparseattn[cuda]')"


@pytest.mark.parametrize(
    ("device", "reasons"),
    [
        (("no CUDA GPU found", None), ["no CUDA GPU found"]),
        ((None, (7, 5)), ["the GPU has compute capability 7.5; 8.0 or newer is needed"]),
        ((None, (9, 0)), []),
    ],
)
def test_device_reasons(monkeypatch, device, reasons):
    monkeypatch.setattr(_env, "_device", lambda: device)
    assert _env.device_reasons() == reasons


def test_host_modes_follow_the_environment(monkeypatch):
    monkeypatch.setenv("NPSPARSEATTN_CUDA_EMULATE", "1")
    assert _env.emulation()
    monkeypatch.setenv("NPSPARSEATTN_CUDA_EMULATE", "0")
    assert not _env.emulation()
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    assert _env.simulator()
