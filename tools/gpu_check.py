#!/usr/bin/env python3
"""``make gpu-check``: the first-GPU probes, every ``gpu`` test and the GPU benchmarks, as one command.

    python3 tools/gpu_check.py OUT_DIR [--budget SECONDS] [--dry-run]

Meant for a fresh machine that has CuPy, numba-cuda and PyTorch but no
network: nothing is installed, the package is imported from this checkout
(``PYTHONPATH``), and the machine's ``python3`` runs everything.  The steps
run in order, each under its own time limit and all within ``--budget``
(default 360 s, the design's six minutes; ``--budget 560`` fits one 10-minute
device command): first, within 5 minutes, the
probes of the ``cupy`` backend (``tools/gpu_probes.py``): registers, spills
and occupancy of every hot kernel, small cases of every launch path
(dense, block-sparse, bfloat16 on uint16 buffers, B = 0, misaligned views,
the deterministic dQ), the same under ``compute-sanitizer`` memcheck,
racecheck and synccheck where the tool is (a missing tool is recorded as
such, not a failure), and a windowed case over 2^31 elements with dK/dV
compared run to run; then the ``gpu`` tests and the benchmarks.  A step that
fails, times out or finds an option missing is recorded as such and the next
one runs.  Optional steps (the numba-cuda register report, the numba-cuda
cases of the CPU test files) run only in time left over.  ``--dry-run`` runs
nothing and writes the plan (the tests use it).  Written to ``OUT_DIR`` (at
most 8 files, as the device tool returns):

* ``gpu-check.log``: every command and its whole output;
* ``gpu-check.md``: the steps table, the benchmark tables and the targets
  of issue 11 (met, missed, or not evaluated with the reason);
* ``*.json``: the benchmark results, as ``npsparseattn bench --json`` writes them.

The exit status is 0 only if every required step passed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEQ = ["1024", "2048", "4096", "8192", "16384", "32768"]
SANITIZER_PLACES = ("/usr/local/cuda/bin", "/usr/local/cuda/compute-sanitizer", "/opt/nvidia/compute-sanitizer")
UNAVAILABLE = ("Device not supported", "CUDA_ERROR_NOT_SUPPORTED", "not supported on this platform")


@dataclass
class Step:
    """One command of the check: its name, its argument list, its time limit, whether the check needs it."""

    name: str
    command: list[str]
    limit: float
    required: bool = True
    json: str | None = None  # the benchmark's --json file, relative to OUT_DIR
    status: str = "not run"
    seconds: float = 0.0
    summary: str = ""
    extra: dict = field(default_factory=dict)
    skip_reason: str | None = None  # known before it runs (a tool that is not here): recorded, not a failure


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def bench(operation: str, backend: str, out: str, *options: str) -> list[str]:
    return python("-m", "npsparseattn", "bench", operation, "--backend", backend, *options, "--json", out)


def compute_sanitizer() -> str | None:
    """The ``compute-sanitizer`` executable: on the PATH or in a CUDA toolkit's usual places; ``None`` if absent."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    candidates = [str(Path(place) / "compute-sanitizer") for place in SANITIZER_PLACES]
    candidates += sorted(glob.glob("/usr/local/cuda*/bin/compute-sanitizer"))
    candidates += sorted(glob.glob("/opt/nvidia/*/compute-sanitizer/compute-sanitizer"))
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def probe_steps() -> list[Step]:
    """The cupy backend's first-GPU probes, all within the first 5 minutes (their limits sum to 280 s)."""
    probes = str(ROOT / "tools" / "gpu_probes.py")
    steps = [
        Step("cupy kernels: registers, spills, occupancy", python(probes, "kernels"), 40),
        Step("cupy small cases (every launch path)", python(probes, "tiny"), 45),
    ]
    sanitizer = compute_sanitizer()
    for tool, limit in (("memcheck", 35), ("racecheck", 50), ("synccheck", 35)):
        command = [sanitizer or "compute-sanitizer", "--tool", tool, "--error-exitcode", "3", "--print-limit", "20",
                   *python(probes, "tiny", "--quick")]  # fmt: skip
        step = Step(f"compute-sanitizer {tool} (small cases)", command, limit)
        if sanitizer is None:
            step.skip_reason = "compute-sanitizer not found on this machine"
        steps.append(step)
    steps.append(Step("cupy windowed case over 2^31 elements, dK/dV run to run", python(probes, "large"), 75))
    return steps


CONTEXT_PARALLEL_GPU = "tests/test_context_parallel_gpu.py"


def steps(out: Path) -> list[Step]:
    """The check, in the order it runs."""
    pytest = python("-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", "--tb=short")
    sweep = ["--seq", *SEQ, "--causal", "both", "--repeat", "2"]
    half = ["--seq", *SEQ[:-1], "--causal", "both", "--repeat", "2", "--dtype", "float16", "--compare", "torch"]
    half += ["--memory-seq", "0"]
    wide = ["--seq", *SEQ[:-1], "--causal", "both", "--repeat", "2", "--dim", "128"]
    lsh = ["--seq", "4096", "16384", "65536", "--dense-seq", "65536", "--repeat", "2"]
    cpu_files = ["tests/test_attention.py", "tests/test_block_sparse.py", "tests/test_lsh_attention.py"]
    benches = [  # (JSON file, operation, backend, options, time limit); the tensor-core kernels first
        ("attention-cupy-d128.json", "attention", "cupy", [*half, "--dim", "128"], 35),
        ("attention-numba-cuda-d64.json", "attention", "numba-cuda", [*sweep, "--dim", "64"], 45),
        ("block-sparse-cupy.json", "block-sparse", "cupy", ["--backward", "--dtype", "float16", "--seq", "8192"], 25),
        ("lsh-numba-cuda.json", "lsh", "numba-cuda", lsh, 35),
        ("block-sparse-numba-cuda.json", "block-sparse", "numba-cuda", ["--backward"], 30),
        ("attention-cupy-d64.json", "attention", "cupy", [*half, "--dim", "64"], 25),
        ("attention-numba-cuda-d128.json", "attention", "numba-cuda", wide, 30),
    ]
    bench_steps = [
        Step(f"bench {op} --backend {backend} ({name})", bench(op, backend, str(out / name), *opts), limit, json=name)
        for name, op, backend, opts, limit in benches
    ]
    registers = python("-m", "npsparseattn.cuda.numba_cuda.compile", "--device", "--dtypes", "float32")
    return [
        Step("environment", python(str(Path(__file__)), "--environment"), 15),
        *probe_steps(),
        Step("pytest -m gpu", [*pytest, "-m", "gpu", "tests", "--ignore", CONTEXT_PARALLEL_GPU], 130),
        *bench_steps,
        Step("numba-cuda registers and spills on this GPU", registers, 40, required=False),
        # MPI ranks on the GPU(s): each rank compiles its numba-cuda kernels, so it runs when time is left
        Step("context parallel on GPU (MPI ranks)", [*pytest, "-m", "gpu", CONTEXT_PARALLEL_GPU], 150, required=False),
        Step("numba-cuda cases of the CPU test files", [*pytest, *cpu_files, "-k", "numba-cuda"], 90, required=False),
    ]


def run_step(step: Step, log, env: dict, limit: float) -> None:
    """Run ``step`` with its output appended to ``log``; kill its process group at ``limit`` seconds."""
    log.write(f"\n===== {step.name} (limit {limit:.0f} s)\n$ {shlex.join(step.command)}\n")
    log.flush()
    start = time.monotonic()
    process = subprocess.Popen(
        step.command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=limit)
        step.status = "passed" if process.returncode == 0 else f"failed (exit {process.returncode})"
        unavailable = next((line for line in (output or "").splitlines() if any(u in line for u in UNAVAILABLE)), None)
        if process.returncode != 0 and step.name.startswith("compute-sanitizer") and unavailable:
            step.status = f"unavailable on this machine ({unavailable.strip()[:80]})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        step.status = f"timed out ({limit:.0f} s)"
    step.seconds = time.monotonic() - start
    log.write(output or "")
    log.write(f"----- {step.name}: {step.status} in {step.seconds:.1f} s\n")
    log.flush()
    lines = [line for line in (output or "").splitlines() if line.strip()]
    step.summary = lines[-1][:160] if lines else ""
    if "unrecognized arguments" in (output or "") or "invalid choice" in (output or ""):
        step.summary = "OPTION MISSING: " + next(
            line for line in lines if "unrecognized arguments" in line or "invalid choice" in line
        )


def environment() -> int:
    """Print the machine, the driver and the versions the check runs with."""
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    for name in ("numpy", "scipy", "numba", "numba_cuda", "cupy", "torch", "ml_dtypes", "mpi4py", "pytest"):
        try:
            module = __import__(name)
            print(f"{name} {getattr(module, '__version__', '?')}")
        except Exception as err:
            print(f"{name} missing ({type(err).__name__}: {err})")
    query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw"
    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], check=False)
    else:
        print("nvidia-smi: not found")
    from npsparseattn.cuda import _env

    print("numba-cuda backend reasons:", _env.numba_cuda_reasons() or "none, it can run")
    print("compute-sanitizer:", compute_sanitizer() or "not found")
    beside = Path(sys.executable).with_name("mpiexec")
    print("mpiexec:", beside if beside.exists() else shutil.which("mpiexec") or "none")
    return 0


# --------------------------------------------------------------------------- the Markdown report

COLUMNS = [
    ("seq", "L"), ("causal", "causal"), ("dim", "D"), ("density", "density"), ("pattern", "pattern"),
    ("forward_s", "fwd s"), ("forward_gflops", "fwd GF/s"), ("forward_vs_gemm", "fwd/GEMM"),
    ("backward_s", "bwd s"), ("backward_gflops", "bwd GF/s"), ("backward_vs_gemm", "bwd/GEMM"),
    ("gemm_gflops", "GEMM GF/s"), ("speedup", "speedup"), ("vs_dense", "vs dense"),
    ("energy_j_per_token", "J/token"), ("max_rel_error", "rel err"),
]  # fmt: skip


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def bench_table(result: dict) -> str:
    """A Markdown table of a benchmark's rows: the known columns it has, or every scalar column."""
    rows = [r for r in result.get("rows", []) if isinstance(r, dict)]
    if not rows:
        return "(no rows in the JSON)"
    known = [(key, title) for key, title in COLUMNS if any(key in r for r in rows)]
    if not known:
        keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float, str, bool))]
        known = [(k, k) for k in keys]
    lines = ["| " + " | ".join(t for _, t in known) + " |", "|" + "---|" * len(known)]
    lines += ["| " + " | ".join(_cell(r.get(k, "")) for k, _ in known) + " |" for r in rows]
    return "\n".join(lines)


def targets(results: dict[str, dict]) -> list[str]:
    """Issue 11's targets on an H100/H200, evaluated from the benchmark JSON where the needed fields are there."""
    lines = []
    rows = results.get("attention-numba-cuda-d64.json", {}).get("rows", [])
    hit = [r for r in rows if r.get("seq") == 8192 and not r.get("causal") and "forward_vs_gemm" in r]
    if hit:
        ratio = hit[0]["forward_vs_gemm"]
        verdict = "met" if ratio >= 0.30 else "missed"
        lines.append(f"- float32 forward, L=8192, D=64, not causal: {ratio:.0%} of the same-run CuPy float32 "
                     f"matrix product (target >= 30 %): **{verdict}**")  # fmt: skip
    else:
        lines.append("- float32 forward at L=8192, D=64 vs GEMM: not evaluated (no such row with forward_vs_gemm)")
    rows = results.get("block-sparse-numba-cuda.json", {}).get("rows", [])
    near = [r for r in rows if "speedup" in r and abs(float(r.get("density", 1.0)) - 0.06) <= 0.03]
    if near:
        row = min(near, key=lambda r: abs(float(r["density"]) - 0.06))
        verdict = "met" if row["speedup"] >= 8 else "missed"
        lines.append(f"- block-sparse at {row['density']:.1%} density ({row.get('layout', '?')}): "
                     f"{row['speedup']:.1f}x the dense tiled forward (target >= 8x): **{verdict}**")  # fmt: skip
    else:
        lines.append("- block-sparse at ~6 % density vs dense: not evaluated (no row with density 3-9 % and a speedup)")
    dense = results.get("lsh-numba-cuda.json", {}).get("dense", {})
    if dense.get("seq") == 65536 and "speedup" in dense:
        verdict = "met" if dense["speedup"] >= 10 else "missed"
        lines.append(f"- LSH forward at L=65536: {dense['speedup']:.1f}x the dense tiled forward (target >= 10x): "
                     f"**{verdict}**")  # fmt: skip
    else:
        lines.append("- LSH at L=65536 vs dense: not evaluated (no dense comparison at L=65536 in the JSON)")
    return lines


def report(out: Path, all_steps: list[Step], started: float) -> str:
    results = {}
    for step in all_steps:
        if step.json and (out / step.json).exists():
            try:
                results[step.json] = json.loads((out / step.json).read_text())
            except json.JSONDecodeError as err:
                step.summary += f" (JSON unreadable: {err})"
    lines = [
        "# gpu-check",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {time.monotonic() - started:.0f} s in all; "
        "command: `make gpu-check GPU_CHECK_OUT=<dir>`.  Full output: `gpu-check.log`.",
        "",
        "| step | required | status | seconds | last line of output |",
        "|---|---|---|---|---|",
    ]
    for step in all_steps:
        summary = step.summary.replace("|", "\\|")
        required = "yes" if step.required else "if time is left"
        lines.append(f"| {step.name} | {required} | {step.status} | {step.seconds:.1f} | {summary} |")
    lines += ["", "## Targets (issue 11)", "", *targets(results)]
    for name, result in results.items():
        lines += ["", f"## {name}", "", bench_table(result)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, help="folder for gpu-check.log, gpu-check.md and the JSON")
    parser.add_argument("--budget", type=float, default=360.0, help="seconds for the whole check (default 360)")
    parser.add_argument("--dry-run", action="store_true", help="run nothing; write the plan to OUT_DIR")
    parser.add_argument("--environment", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.environment:
        return environment()
    if args.out is None:
        parser.error("give the output folder")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env["PYTHONUNBUFFERED"] = "1"
    started = time.monotonic()
    all_steps = steps(out)
    required_after = sum(s.limit for s in all_steps if s.required)
    with open(out / "gpu-check.log", "w") as log:
        for step in all_steps:
            if step.required:
                required_after -= step.limit
            remaining = args.budget - (time.monotonic() - started)
            # a required step may use all that is left; an optional one only what the required ones leave
            limit = min(step.limit, remaining if step.required else remaining - required_after)
            if step.skip_reason is not None:
                step.status = f"skipped ({step.skip_reason})"
                log.write(f"\n===== {step.name}: skipped, {step.skip_reason}\n")
                continue
            if args.dry_run:
                step.status = "dry run"
                log.write(f"\n===== {step.name} (limit {limit:.0f} s)\n$ {shlex.join(step.command)}\n")
                continue
            if limit < 5:
                step.status = "skipped (out of time)"
                log.write(f"\n===== {step.name}: skipped, {remaining:.0f} s left of the budget\n")
                continue
            run_step(step, log, env, limit)
            print(f"{step.name}: {step.status} in {step.seconds:.1f} s", flush=True)
    (out / "gpu-check.md").write_text(report(out, all_steps, started))
    print(f"wrote {out / 'gpu-check.log'} and {out / 'gpu-check.md'}")
    return 0 if all(passed(s) for s in all_steps if s.required) else 1


def passed(step: Step) -> bool:
    """A required step passed, or could not run for a reason known beforehand (a tool this machine lacks)."""
    return step.status in ("passed", "dry run") or step.skip_reason is not None or step.status.startswith("unavailable")


if __name__ == "__main__":
    raise SystemExit(main())
