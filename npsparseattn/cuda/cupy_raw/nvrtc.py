"""Compile the ``cupy`` backend's CUDA C++ with NVRTC to a cubin, without a GPU, and read the ptxas report.

This is the compile check of CI: every template instance of every source
(:func:`npsparseattn.cuda.cupy_raw.sources.instances`) is compiled for ``sm_80`` and
``sm_90`` by NVRTC from the ``nvidia-cuda-nvrtc`` wheel (through
``cuda.bindings.nvrtc``), with ``--ptxas-options=-v`` so that the log gives,
per kernel, its registers, spill stores/loads, stack frame and shared memory.
No compile cache is involved: each call compiles.

A GPU run compiles the same translation unit through ``cupy.RawModule``
(:mod:`npsparseattn.cuda.cupy_raw.loader`) with :func:`options`, to which CuPy
appends ``-arch=sm_XX``, ``--device-as-default-execution-space`` and
``-ftz=true``; :func:`compile_source` passes the same (:data:`CUPY_APPENDS`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from npsparseattn.cuda.cupy_raw import sources

ARCHS = ("sm_80", "sm_90")
CUPY_APPENDS = ("--device-as-default-execution-space", "-ftz=true")


def options(arch: str | None = None) -> list[str]:
    """NVRTC options of every build of the kernels (``-arch`` when ``arch`` is given)."""
    opts = ["--std=c++17", f"-DNPSA_SOURCE_VERSION=0x{sources.version()}"]
    if arch is not None:
        opts.insert(0, f"-arch={arch}")
    return opts


class NVRTCError(RuntimeError):
    """NVRTC is missing, or rejected the sources (the message holds its log)."""


@dataclass(frozen=True)
class KernelReport:
    """What ptxas said about one compiled kernel."""

    name: str  # the name expression, e.g. "npsa_attn_fwd<npsa::f16, 64, true>"
    mangled: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


@dataclass(frozen=True)
class Build:
    """A compiled source: its cubin, the NVRTC log and one report per instance."""

    source: str
    arch: str
    cubin: bytes
    log: str
    kernels: dict[str, KernelReport]


_FUNCTION = re.compile(r"ptxas info\s*: Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\d+a?)'")
_FRAME = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads"
)
_USED = re.compile(r"Used (?P<regs>\d+) registers")
_SMEM = re.compile(r"(?P<smem>\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, dict[str, int]]:
    """Per mangled kernel name: ``registers``, ``spill_stores``, ``spill_loads``, ``stack``, ``shared`` (bytes)."""
    found: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = _FUNCTION.search(line)
        if m:
            current = found.setdefault(
                m.group("name"), {"registers": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0, "shared": 0}
            )
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            current.update(stack=int(m["stack"]), spill_stores=int(m["stores"]), spill_loads=int(m["loads"]))
        m = _USED.search(line)
        if m:
            current["registers"] = int(m["regs"])
            m = _SMEM.search(line)
            current["shared"] = int(m["smem"]) if m else 0
    return found


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as err:
        raise NVRTCError(f"NVRTC is not available (cuda-bindings and nvidia-cuda-nvrtc): {err}") from err
    return nvrtc


def _check(result, what: str):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise NVRTCError(f"{what} failed: {err}")
    return rest[0] if len(rest) == 1 else rest


def compile_source(source: str, arch: str, names: tuple[str, ...] | None = None) -> Build:
    """Compile ``source`` (one of :data:`~npsparseattn.cuda.cupy_raw.sources.SOURCES`) for ``arch`` to a cubin.

    ``names`` are the instances to build (default: all of the source's).
    Raises :class:`NVRTCError` with NVRTC's log on a compile error.
    """
    nvrtc = _nvrtc()
    names = sources.instances(source) if names is None else names
    text = sources.translation_unit(source).encode()
    prog = _check(nvrtc.nvrtcCreateProgram(text, source.encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        for name in names:
            _check(nvrtc.nvrtcAddNameExpression(prog, name.encode()), f"nvrtcAddNameExpression({name})")
        opts = [o.encode() for o in [*options(arch), *CUPY_APPENDS, "--ptxas-options=-v"]]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        buf = b" " * size
        _check(nvrtc.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
        log = buf.decode(errors="replace").rstrip("\x00")
        if int(err) != 0:
            raise NVRTCError(f"NVRTC could not compile {source} for {arch}:\n{log}")
        size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        lowered = {name: _check(nvrtc.nvrtcGetLoweredName(prog, name.encode()), "nvrtcGetLoweredName").decode()
                   for name in names}  # fmt: skip
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    stats = parse_ptxas_log(log)
    kernels = {}
    for name, mangled in lowered.items():
        if mangled not in stats:
            raise NVRTCError(f"the ptxas log of {source} ({arch}) has no report for {name} ({mangled}):\n{log}")
        kernels[name] = KernelReport(name, mangled, **stats[mangled])
    return Build(source, arch, cubin, log, kernels)
