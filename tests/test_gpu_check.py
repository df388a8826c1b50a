"""``make gpu-check``'s plumbing on the CPU: the plan (``--dry-run``), how steps are recorded, and the cupy
probes run on the host emulation (``tools/gpu_probes.py``), so the first GPU run does not fail on the script."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from raw_support import require_host_compiler

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _run(*args: str, emulate: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("NPSPARSEATTN_CUDA_EMULATE", None)
    if emulate:
        env["NPSPARSEATTN_CUDA_EMULATE"] = "1"
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_dry_run_writes_the_plan_with_the_probes_first(tmp_path):
    done = _run("tools/gpu_check.py", str(tmp_path), "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    report = (tmp_path / "gpu-check.md").read_text()
    log = (tmp_path / "gpu-check.log").read_text()
    gpu_check = _tool("gpu_check")
    names = [step.name for step in gpu_check.steps(tmp_path)]
    for name in names:
        assert f"| {name} |" in report, name
    assert names.index("pytest -m gpu") > names.index("cupy windowed case over 2^31 elements, dK/dV run to run")
    assert "tools/gpu_probes.py tiny --quick" in log or "compute-sanitizer not found" in log
    assert "tools/gpu_probes.py large" in log and "tools/gpu_probes.py kernels" in log


def test_the_probes_fit_in_the_first_five_minutes(tmp_path):
    gpu_check = _tool("gpu_check")
    plan = gpu_check.steps(tmp_path)
    first = plan[: [s.name for s in plan].index("pytest -m gpu")]
    assert sum(step.limit for step in first) <= 300
    assert {"memcheck", "racecheck", "synccheck"} <= {step.command[2] for step in first if "sanitizer" in step.name}


def test_failures_timeouts_and_an_unusable_sanitizer_are_recorded(tmp_path, monkeypatch):
    gpu_check = _tool("gpu_check")
    code = "import sys; print({!r}); sys.exit({})"
    plan = [
        gpu_check.Step("fine", [sys.executable, "-c", code.format("all right", 0)], 20),
        gpu_check.Step("compute-sanitizer memcheck (small cases)",
                       [sys.executable, "-c", code.format("========= Error: Device not supported", 1)], 20),
        gpu_check.Step("broken", [sys.executable, "-c", code.format("wrong", 2)], 20),
        gpu_check.Step("absent", ["no-such-tool"], 20),
        gpu_check.Step("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 6),
    ]  # fmt: skip
    plan[3].skip_reason = "no-such-tool not found on this machine"
    monkeypatch.setattr(gpu_check, "steps", lambda out: plan)
    assert gpu_check.main([str(tmp_path), "--budget", "60"]) == 1
    status = {step.name: step.status for step in plan}
    unusable = "unavailable on this machine (========= Error: Device not supported)"
    assert status == {
        "fine": "passed",
        "compute-sanitizer memcheck (small cases)": unusable,
        "broken": "failed (exit 2)",
        "absent": "skipped (no-such-tool not found on this machine)",
        "slow": "timed out (6 s)",
    }
    report = (tmp_path / "gpu-check.md").read_text()
    assert "| broken | yes | failed (exit 2) |" in report
    plan.pop(2), plan.pop()
    for step in plan:
        step.status = "not run"
    assert gpu_check.main([str(tmp_path), "--budget", "60"]) == 0


def test_probes_pass_on_the_host_emulation():
    require_host_compiler()
    done = _run("tools/gpu_probes.py", "tiny", "--quick", emulate=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "tiny: 7 of 7 cases right"
    done = _run("tools/gpu_probes.py", "large", "--seq", "320", "--heads", "4", "--kv-heads", "2", "--dim", "32",
                "--window", "64", emulate=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "large: 8 of 8 checks right"


def test_large_takes_enough_heads_for_more_than_2_31_elements(monkeypatch):
    probes = _tool("gpu_probes")
    seen = {}
    monkeypatch.setattr(probes, "large", lambda seq, heads, kv_heads, d, window: seen.update(locals()) or 0)
    assert probes.main(["large"]) == 0
    assert seen["heads"] % seen["kv_heads"] == 0 and seen["heads"] * seen["seq"] * seen["d"] > 2**31
    assert (seen["seq"], seen["d"], seen["window"]) == (2**19, 128, 256)
