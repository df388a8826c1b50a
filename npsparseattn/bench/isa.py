"""The CPU a benchmark ran on, and ``--isa``: the same benchmark as on an AVX2-only CPU, or natively.

Every CPU table carries :func:`describe_cpu` (model, the vector flags that
matter, the width numba's loops are compiled for, the BLAS and its kernels),
because rates and ratios differ between machines: an Intel core with
full-width AVX-512 units multiplies matrices 1.6x faster than an AMD Zen 4
core of the same clock, and the softmax loops gain only if they are
compiled for 512-bit vectors (:mod:`npsparseattn.cpu._isa`).

``--isa avx2`` reruns the command in a child process set up as on an AVX2
CPU: numba compiles for ``haswell`` without AVX-512 features, OpenBLAS uses
its Haswell kernels (``OPENBLAS_CORETYPE``) and PyTorch its AVX2 kernels
(``ATEN_CPU_CAPABILITY``), so both sides of ``--compare torch`` use AVX2.
``--isa native`` reruns it with none of those variables set.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ISA_CHOICES = ("native", "avx2")
MARK = "NPSPARSEATTN_BENCH_ISA"  # set in the child, so it runs the benchmark instead of starting another child
FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16",
         "amx_tile", "amx_bf16")  # fmt: skip


def add_argument(parser: argparse.ArgumentParser) -> None:
    """``--isa native|avx2``."""
    parser.add_argument(
        "--isa",
        choices=ISA_CHOICES,
        help="rerun in a child process set up as on an AVX2-only CPU (numba 'haswell' without AVX-512, "
        "OpenBLAS Haswell kernels, PyTorch AVX2 kernels), or natively with none of those settings "
        "(default: this process as it is)",
    )


def wants_rerun(args: argparse.Namespace) -> bool:
    """True when ``--isa`` asks for a setup this process does not have yet."""
    isa = getattr(args, "isa", None)
    return isa is not None and os.environ.get(MARK) != isa


def rerun(isa: str, argv: list[str]) -> int:
    """Run ``npsparseattn <argv>`` in a child process set up for ``isa``; its exit status."""
    from npsparseattn.cpu import _isa

    env = {key: value for key, value in os.environ.items() if key not in _isa.NATIVE_UNSET}
    if isa == "avx2":
        env.update(_isa.avx2_environment())
    env[MARK] = isa
    return subprocess.run([sys.executable, "-m", "npsparseattn", *argv], env=env, check=False).returncode


def _cpu_model() -> tuple[str, set[str]]:
    """The CPU's model name and flags from ``/proc/cpuinfo`` (Linux), else what ``platform`` knows."""
    info = Path("/proc/cpuinfo")
    model, flags = "", set()
    if info.is_file():
        for line in info.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    if not model:
        import platform

        model = platform.processor() or platform.machine()
    return model, flags


def _blas() -> str:
    """The BLAS the kernels call (SciPy's), its version and the kernels it chose, e.g. ``'openblas 0.3.30 (Zen)'``."""
    import scipy.linalg.cython_blas  # noqa: F401  (the kernels' BLAS: make sure it is loaded)
    from threadpoolctl import threadpool_info

    blas = [pool for pool in threadpool_info() if pool.get("user_api") == "blas"]
    for pool in sorted(blas, key=lambda pool: "scipy.libs" not in str(pool.get("filepath", ""))):
        arch = f" ({pool['architecture']})" if pool.get("architecture") else ""
        return f"{pool.get('internal_api', 'blas')} {pool.get('version') or ''}{arch}".replace("  ", " ")
    return "no BLAS found"


def describe_cpu() -> str:
    """One line: model, vector flags, numba's vector width and why, the BLAS, ``--isa`` when set."""
    from numba import get_num_threads

    from npsparseattn.cpu._isa import vector_isa

    model, flags = _cpu_model()
    isa = vector_isa()
    shown = " ".join(f for f in FLAGS if f in flags) or "flags unknown"
    mode = f"; --isa {os.environ[MARK]}" if MARK in os.environ else ""
    return (
        f"CPU: {model} [{shown}], {get_num_threads()} numba threads; numba: {isa.cpu_name}, "
        f"{isa.vector_bits}-bit vectors ({isa.note}); BLAS: {_blas()}{mode}"
    )
