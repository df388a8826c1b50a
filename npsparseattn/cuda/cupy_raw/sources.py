"""The CUDA C++ sources of the ``cupy`` backend and their template instances, shared by every way of building them.

The kernels live in ``npsparseattn/cuda/cupy_raw/kernels/*.cu`` (package data, read with
:mod:`importlib.resources`).  A translation unit is one ``.cu`` file with its
``#include "..."`` headers inlined (each ``#pragma once`` header once), and a
``#line`` directive before every piece so compiler messages name the real file
and line.  Three builds read the same text:

* ``cupy.RawModule`` on a GPU (:mod:`npsparseattn.cuda.cupy_raw.loader`);
* NVRTC straight to a cubin for sm_80/sm_90, for the compile and register
  checks of CI (:mod:`npsparseattn.cuda.cupy_raw.nvrtc`);
* the host compiler, with the emulation header (:mod:`npsparseattn.cuda.cupy_raw.emulate`).

Template instances are named once here (:func:`instances`), as the C++
expressions ``RawModule(name_expressions=...)`` takes.
"""

from __future__ import annotations

import hashlib
import re
from functools import cache
from importlib import resources

from npsparseattn._backend_table import entries

HEAD_DIMS = (32, 64, 96, 128)
"""Head dimensions with a kernel instance (``D == Dv``)."""

ELEMENT_TYPES = {"float16": "npsa::f16", "bfloat16": "npsa::bf16"}
"""Input dtype name -> the C++ element tag of the kernels."""

_CUPY = entries(backend="cupy")
SOURCES = (*dict.fromkeys(e.source for e in _CUPY if e.source), "selftest.cu")
"""Every ``.cu`` file with kernels: the sources of the table's ``cupy`` entries, then the self-tests."""

KERNELS = {kernel.name: (e.source, kernel.params) for e in _CUPY for kernel in e.kernels}
"""Kernel name -> (source file, template parameters: T element type, D head dim, M masked), from the table."""

HOT_KERNELS = tuple(dict.fromkeys(kernel.name for e in _CUPY for kernel in e.kernels if kernel.hot))
"""Kernels whose instances must not spill registers (checked from the ptxas log)."""

SELFTEST = (
    "npsa_test_mma<npsa::f16>",
    "npsa_test_mma<npsa::bf16>",
    "npsa_test_ldmatrix<false>",
    "npsa_test_ldmatrix<true>",
    "npsa_test_shfl",
    "npsa_test_pack<npsa::f16>",
    "npsa_test_pack<npsa::bf16>",
    "npsa_test_cp_async",
    *(f"npsa_test_tiles<{t}, {d}>" for t in ELEMENT_TYPES.values() for d in HEAD_DIMS),
    *(f"npsa_test_shapes<{d}>" for d in HEAD_DIMS),
)
FAULTS = tuple(f"npsa_test_fault<{mode}>" for mode in range(10))
"""Programs that break a rule on purpose: built for the host emulation only (tests of its checks)."""

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def instance(kernel: str, dtype: str, head_dim: int | None = None, masked: bool | None = None) -> str:
    """The C++ name expression of one kernel instance, e.g. ``npsa_attn_fwd<npsa::f16, 64, true>``."""
    params = KERNELS[kernel][1]
    args = [ELEMENT_TYPES[dtype]]
    if "D" in params:
        args.append(str(head_dim))
    if "M" in params:
        args.append("true" if masked else "false")
    return f"{kernel}<{', '.join(args)}>"


def instances(source: str) -> tuple[str, ...]:
    """Every instance compiled from ``source`` (one of :data:`SOURCES`) for the GPU."""
    if source == "selftest.cu":
        return SELFTEST
    names = []
    for kernel, (src, params) in KERNELS.items():
        if src != source:
            continue
        for dtype in ELEMENT_TYPES:
            for d in HEAD_DIMS if "D" in params else (None,):
                for masked in (False, True) if "M" in params else (None,):
                    names.append(instance(kernel, dtype, d, masked))
    return tuple(names)


def template_args(name: str) -> list[str]:
    """The template arguments of an instance name, as written: ``["npsa::f16", "64", "true"]``."""
    return name[name.index("<") + 1 : -1].split(", ") if "<" in name else []


def module_group(name: str) -> tuple[str, ...]:
    """The instances compiled in one module with ``name``: those of its source with the same element type
    and head dimension, and the source's instances that have no head dimension.

    A first call on a GPU so compiles the handful of kernels it may use rather than every instance.
    """
    args = template_args(name)
    if name not in instances(source_of(name)) or len(args) < 2 or not args[1].isdigit():
        return (name,)
    group = []
    for other in instances(source_of(name)):
        oargs = template_args(other)
        if oargs and oargs[0] == args[0] and (len(oargs) < 2 or not oargs[1].isdigit() or oargs[1] == args[1]):
            group.append(other)
    return tuple(group)


def source_of(name: str) -> str:
    """The ``.cu`` file that defines the instance ``name``."""
    kernel = name.split("<", 1)[0]
    if kernel in KERNELS:
        return KERNELS[kernel][0]
    if kernel.startswith("npsa_test_"):
        return "selftest.cu"
    raise KeyError(f"no kernel named {kernel!r}")


def _kernels_dir():
    return resources.files("npsparseattn.cuda.cupy_raw") / "kernels"


def kernel_files() -> list[str]:
    """Names of every ``.cu`` and ``.cuh`` file shipped in ``npsparseattn/cuda/cupy_raw/kernels``."""
    return sorted(p.name for p in _kernels_dir().iterdir() if p.name.endswith((".cu", ".cuh")))


@cache
def read(name: str) -> str:
    """The text of ``kernels/<name>``."""
    return (_kernels_dir() / name).read_text(encoding="utf-8")


def _display_path(name: str) -> str:
    return str(_kernels_dir() / name).replace("\\", "/")


def translation_unit(*sources: str) -> str:
    """The ``sources`` one after another, their ``#include "..."`` headers inlined (each header once),
    a ``#line`` directive before every piece."""
    seen: set[str] = set(sources)

    def expand(name: str) -> list[str]:
        lines = [f'#line 1 "{_display_path(name)}"']
        for number, line in enumerate(read(name).splitlines(), start=1):
            match = _INCLUDE.match(line)
            if match is None:
                lines.append("" if line.strip() == "#pragma once" else line)
                continue
            header = match.group(1)
            if header not in seen:
                seen.add(header)
                lines.extend(expand(header))
            lines.append(f'#line {number + 1} "{_display_path(name)}"')
        return lines

    return "".join("\n".join(expand(source)) + "\n" for source in sources)


@cache
def version() -> str:
    """A hash of every kernel file: passed as ``-DNPSA_SOURCE_VERSION=...`` so that an edited header recompiles."""
    digest = hashlib.sha256()
    for name in kernel_files():
        digest.update(name.encode())
        digest.update(read(name).encode())
    return digest.hexdigest()[:16]
