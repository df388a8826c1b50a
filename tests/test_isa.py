"""The vector width of the CPU kernels (``cpu/_isa.py``): full 512-bit vectors on Intel AVX-512 cores.

No AVX-512 CPU is needed: a subprocess pretends its host is a Sapphire
Rapids core (numba asks LLVM for the host's name and features through two
functions, patched before ``npsparseattn.cpu`` is imported), compiles the
online-softmax tile step and reads its machine code.  Nothing compiled for
that target is run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from npsparseattn.cpu import _isa

SPR_FEATURES = ",".join(
    "+" + f
    for f in (
        "64bit avx avx2 fma f16c bmi bmi2 popcnt sse4.2 avx512f avx512bw avx512vl avx512dq avx512cd avx512vnni "
        "avx512bf16 avx512fp16 amx-tile amx-bf16 evex512"
    ).split()
)

PROBE = """
import json, sys
import llvmlite.binding as ll
import numba.core.codegen as codegen
codegen.get_host_cpu_features = lambda: {features!r}
ll.get_host_cpu_name = lambda: {name!r}
import numpy as np
from numba import njit, types
import npsparseattn.cpu as cpu
from npsparseattn.cpu._isa import vector_isa
from npsparseattn.cpu._tiles import online_softmax_tile

@njit
def step(s, row_max, row_sum, acc):
    online_softmax_tile(s, s.shape[0], s.shape[1], 0, 0, 0, 1 << 40, 1 << 40, s.shape[1], row_max, row_sum, acc)

f2, f1 = types.Array(types.float32, 2, "C"), types.Array(types.float32, 1, "C")
step.compile((f2, f1, f1, f2))
code = "".join(step.inspect_asm().values())
isa = vector_isa()
print(json.dumps({{"note": cpu.VECTOR_WIDTH_NOTE, "bits": isa.vector_bits, "isa": isa.isa,
                  "zmm": code.count("zmm"), "ymm": code.count("ymm")}}))
"""


def _compile_as(name: str, features: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in _isa.NATIVE_UNSET}
    environ.update(env)
    code = PROBE.format(features=features, name=name)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_intel_avx512_host_gets_512_bit_softmax_loops():
    result = _compile_as("sapphirerapids", SPR_FEATURES)
    assert result["note"].startswith("AVX-512 host"), result
    assert result["isa"] == "avx512" and result["bits"] == 512, result
    assert result["zmm"] > 0, result


@pytest.mark.slow
def test_width_256_keeps_llvm_default_on_intel():
    """The control: without the preference LLVM's Intel tuning gives 256-bit loops (so the test above can fail)."""
    result = _compile_as("sapphirerapids", SPR_FEATURES, NPSPARSEATTN_VECTOR_WIDTH="256")
    assert result["note"].startswith("NPSPARSEATTN_VECTOR_WIDTH=256"), result
    assert result["bits"] == 256 and result["zmm"] == 0 and result["ymm"] > 0, result


@pytest.mark.slow
def test_avx2_mode_on_an_avx512_host_compiles_no_avx512_code():
    """``bench --isa avx2``'s numba settings (they are the user's: npsparseattn leaves them alone).

    The features matter: ``NUMBA_CPU_NAME=haswell`` alone keeps the host's
    features, AVX-512 included, and LLVM emits ``zmm`` code for it.
    """
    env = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": _isa.without_wide_vectors(SPR_FEATURES)}
    result = _compile_as("sapphirerapids", SPR_FEATURES, **env)
    assert result["note"] == "NUMBA_CPU_NAME/NUMBA_CPU_FEATURES set by the user", result
    assert result["isa"] == "avx2" and result["zmm"] == 0 and result["ymm"] > 0, result


def test_avx2_environment_turns_off_every_wide_feature():
    narrowed = _isa.without_wide_vectors("+avx2,+avx512f,-avx512bw,+amx-tile,+fma")
    assert narrowed == "+avx2,-avx512f,-avx512bw,-amx-tile,+fma"
    env = _isa.avx2_environment()
    assert env["NUMBA_CPU_NAME"] == "haswell" and env["OPENBLAS_CORETYPE"] == "Haswell"
    assert env["ATEN_CPU_CAPABILITY"] == "avx2"
    on = [f[1:] for f in env["NUMBA_CPU_FEATURES"].split(",") if f.startswith("+")]
    assert not [f for f in on if f.startswith(("avx512", "amx", "evex512", "avx10"))]


def test_vector_isa_reports_this_process():
    isa = _isa.vector_isa()
    assert isa.vector_bits in (128, 256, 512)
    assert isa.cpu_name and isa.note


def test_bench_isa_reruns_the_command_in_a_child_set_up_for_avx2(monkeypatch):
    from npsparseattn.bench import isa
    from npsparseattn.cli import main

    seen = {}

    def fake_run(cmd, env, check):
        seen.update(cmd=cmd, env=env)
        return subprocess.CompletedProcess(cmd, 7)

    monkeypatch.setattr(isa.subprocess, "run", fake_run)
    monkeypatch.setenv("OPENBLAS_CORETYPE", "SkylakeX")
    monkeypatch.delenv(isa.MARK, raising=False)
    argv = ["bench", "attention", "--isa", "avx2", "--seq", "64", "--repeat", "1", "--memory-seq", "0"]
    assert main(argv) == 7
    assert seen["cmd"][1:] == ["-m", "npsparseattn", *argv]
    env = seen["env"]
    assert env[isa.MARK] == "avx2" and env["OPENBLAS_CORETYPE"] == "Haswell" and env["NUMBA_CPU_NAME"] == "haswell"
    assert env["ATEN_CPU_CAPABILITY"] == "avx2"

    monkeypatch.setenv("NUMBA_CPU_NAME", "haswell")
    assert main([*argv[:3], "native", *argv[4:]]) == 7
    env = seen["env"]
    assert env[isa.MARK] == "native" and not set(_isa.NATIVE_UNSET) & set(env)


def test_bench_in_the_child_does_not_rerun_again(monkeypatch):
    import argparse

    from npsparseattn.bench import isa

    monkeypatch.setenv(isa.MARK, "avx2")
    assert not isa.wants_rerun(argparse.Namespace(isa="avx2"))
    assert isa.wants_rerun(argparse.Namespace(isa="native"))
    assert not isa.wants_rerun(argparse.Namespace(isa=None))
