"""The vector ISA the CPU kernels are compiled for, and full-width vectors on Intel AVX-512 cores.

numba compiles for the host CPU through LLVM.  LLVM's tuning for Intel's
AVX-512 cores (``skylake-avx512`` through ``sapphirerapids`` and
``graniterapids``) carries the feature ``prefer-256-bit``: its loop
vectoriser then emits 256-bit (``ymm``) code although the cores have
512-bit units, so the exp2, row-maximum and rescale loops of the online
softmax run at half the width PyTorch's CPU flash kernel uses, while the
GEMMs (OpenBLAS, hand-written 512-bit kernels) run at full width.  AMD Zen 4
(``znver4``), whose AVX-512 runs as two 256-bit halves, has no such
preference and already gets ``zmm`` code.  (Checked by compiling the same
float32 loop for each CPU name: ``sapphirerapids`` gives ``ymm`` unless
``-prefer-256-bit`` is among the features; ``znver4`` gives ``zmm``;
``tests/test_isa.py`` compiles a kernel for an Intel AVX-512 target and
looks for ``zmm`` in its machine code, which needs no AVX-512 CPU.)

:func:`configure` runs when :mod:`npsparseattn.cpu` is imported, before any
kernel is compiled: on a host with ``avx512f`` it gives numba the host's
features plus ``-prefer-256-bit``.  It changes nothing when the user set
``NUMBA_CPU_FEATURES`` or ``NUMBA_CPU_NAME`` (their choice wins), when
``NPSPARSEATTN_VECTOR_WIDTH=256`` asks for the default width, or when numba
already compiled code in this process (its code generator is made once per
process; :func:`vector_isa` then reports what it uses).  The features are
part of numba's cache key, so kernels compiled before are compiled again
once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

WIDTH_ENV = "NPSPARSEATTN_VECTOR_WIDTH"
FULL_WIDTH = "-prefer-256-bit"


@dataclass(frozen=True)
class VectorISA:
    """What the CPU kernels are compiled for: ``cpu_name`` (LLVM's), ``isa`` and ``vector_bits``."""

    cpu_name: str
    isa: str  # "avx512", "avx2", "avx", "sse" or the machine's name for other architectures
    vector_bits: int  # the widest vector register the float32 loops use
    note: str  # how the width was chosen


_STATE: dict[str, str] = {"note": "not configured"}


def _feature_set(flat: str) -> dict[str, bool]:
    """``"+avx2,-avx512f,..."`` as ``{"avx2": True, "avx512f": False, ...}``."""
    return {item[1:]: item[0] == "+" for item in flat.split(",") if item[:1] in "+-" and len(item) > 1}


def _codegen_started() -> bool:
    """True once numba has made its CPU code generator (then its features are fixed for the process)."""
    from numba.core.registry import cpu_target

    return "_toplevel_target_context" in vars(cpu_target)


def configure() -> str:
    """Give numba full-width vectors on an AVX-512 host unless the user decided otherwise; say what was done.

    Returns the note also stored for :func:`vector_isa`.
    """
    from numba.core import config
    from numba.core.codegen import get_host_cpu_features

    choice = os.environ.get(WIDTH_ENV, "auto").strip().lower()
    if choice not in ("auto", "512", "256"):
        note = f"{WIDTH_ENV}={choice!r} ignored (expected auto, 512 or 256)"
        choice = "auto"
    else:
        note = ""
    host = get_host_cpu_features()
    if config.CPU_FEATURES is not None or config.CPU_NAME is not None:
        note = note or "NUMBA_CPU_NAME/NUMBA_CPU_FEATURES set by the user"
    elif choice == "256":
        note = f"{WIDTH_ENV}=256: LLVM's default width for this CPU"
    elif not _feature_set(host).get("avx512f", False):
        note = note or "no AVX-512 on this CPU"
    elif _codegen_started():
        note = "numba had compiled code before npsparseattn was imported: its CPU features stand"
    else:
        config.CPU_FEATURES = f"{host},{FULL_WIDTH}"
        note = "AVX-512 host: LLVM told to prefer 512-bit vectors"
    _STATE["note"] = note
    return note


def _probe_bits() -> int:
    """Widest vector register in the machine code of a float32 loop compiled like the kernels."""
    import numpy as np
    from numba import njit, types

    from npsparseattn.cpu._tiles import FASTMATH

    @njit(fastmath=FASTMATH)
    def probe(x, out, c):  # pragma: no cover - compiled, never run
        for i in range(x.shape[0]):
            out[i] = max(x[i] * c, np.float32(0.0))

    arr = types.Array(types.float32, 1, "C")
    probe.compile((arr, arr, types.float32))
    code = "".join(probe.inspect_asm().values())
    return 512 if "zmm" in code else 256 if "ymm" in code else 128


def vector_isa() -> VectorISA:
    """The CPU name, instruction set and vector width the kernels are compiled for in this process."""
    import llvmlite.binding as ll
    from numba.core import config
    from numba.core.codegen import get_host_cpu_features

    name = config.CPU_NAME or ll.get_host_cpu_name()
    features = _feature_set(config.CPU_FEATURES if config.CPU_FEATURES is not None else get_host_cpu_features())
    isa = next((f for f in ("avx512f", "avx2", "avx", "sse2") if features.get(f)), os.uname().machine)
    isa = {"avx512f": "avx512"}.get(isa, isa).replace("sse2", "sse")
    return VectorISA(name, isa, _probe_bits(), _STATE["note"])


def without_wide_vectors(features: str) -> str:
    """A numba/LLVM feature string with every AVX-512, AVX10 and AMX feature turned off."""
    wide = ("avx512", "amx", "evex512", "avx10")
    return ",".join(f"-{item[1:]}" if item[1:].startswith(wide) else item for item in features.split(",") if item)


def avx2_environment() -> dict[str, str]:
    """Environment that makes this process's children compute as on an AVX2-only CPU (Haswell).

    numba: the ``haswell`` CPU with the host's features less every AVX-512
    and AMX one (the CPU name alone would keep the host's features, AVX-512
    included); OpenBLAS: its Haswell kernels; PyTorch: its AVX2 kernels.
    """
    from numba.core.codegen import get_host_cpu_features

    return {
        "NUMBA_CPU_NAME": "haswell",
        "NUMBA_CPU_FEATURES": without_wide_vectors(get_host_cpu_features()),
        "OPENBLAS_CORETYPE": "Haswell",
        "ATEN_CPU_CAPABILITY": "avx2",
        WIDTH_ENV: "256",
    }


NATIVE_UNSET = ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "OPENBLAS_CORETYPE", "ATEN_CPU_CAPABILITY", WIDTH_ENV)
