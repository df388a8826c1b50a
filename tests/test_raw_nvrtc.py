"""NVRTC compiles every kernel instance of the ``cupy`` backend for sm_80 and sm_90, without a GPU.

The compiler is NVRTC from the ``nvidia-cuda-nvrtc`` wheel, called through
``cuda.bindings.nvrtc`` straight to a cubin (no compile cache), with
``--ptxas-options=-v``; registers and spills are read from ptxas's report.  A
compile error, a missing instance or a register spill in a hot kernel fails.
"""

from __future__ import annotations

from functools import cache

import pytest

from npsparseattn.cuda.cupy_raw import driver, limits, nvrtc, sources

pytestmark = pytest.mark.slow  # about a minute for both architectures on two cores


@cache
def build(source: str, arch: str) -> nvrtc.Build:
    try:
        nvrtc._nvrtc()
    except nvrtc.NVRTCError as err:
        pytest.skip(str(err))
    return nvrtc.compile_source(source, arch)


@pytest.mark.parametrize("arch", nvrtc.ARCHS)
@pytest.mark.parametrize("source", sources.SOURCES)
def test_every_instance_compiles_to_a_cubin(source, arch):
    result = build(source, arch)
    assert result.cubin[:4] == b"\x7fELF"
    assert set(result.kernels) == set(sources.instances(source))
    for report in result.kernels.values():
        assert report.registers > 0, report
        # every kernel is launched with NTHREADS threads: its registers must fit a block on this architecture
        problems = limits.launch_problems((1,), (driver.NTHREADS,), 0, registers=report.registers,
                                          limits=limits.ARCHS[arch])  # fmt: skip
        assert not problems, (report, problems)
        assert report.shared == 0, report  # every kernel uses dynamic shared memory only


@pytest.mark.parametrize("arch", nvrtc.ARCHS)
def test_hot_kernels_do_not_spill(arch):
    reports = [r for s in sources.SOURCES for r in build(s, arch).kernels.values()]
    hot = [r for r in reports if r.name.split("<")[0] in sources.HOT_KERNELS]
    assert len(hot) == len(sources.HOT_KERNELS) * len(sources.ELEMENT_TYPES) * len(sources.HEAD_DIMS) * 2
    lines = [f"{r.name:45s} {r.registers:4d} regs  spill {r.spill_stores}/{r.spill_loads} B  stack {r.stack} B"
             for r in hot]  # fmt: skip
    print(f"\nptxas, {arch}:\n" + "\n".join(lines))
    assert not [r.name for r in hot if r.spills or r.stack]


@pytest.mark.parametrize("arch", nvrtc.ARCHS)
@pytest.mark.parametrize("d", sources.HEAD_DIMS)
def test_shared_memory_fits_the_architecture(arch, d):
    assert driver.fwd_shared_bytes(d) <= limits.ARCHS[arch].max_shared
    assert driver.fwd_shared_bytes(d, sparse=True) <= limits.ARCHS[arch].max_shared
    assert driver.bwd_shared_bytes(d) <= limits.ARCHS[arch].max_shared
    assert driver.dq_shared_bytes(d) <= limits.ARCHS[arch].max_shared


def test_compile_errors_name_the_real_file_and_line(monkeypatch):
    original = sources.read

    def planted(name):
        text = original(name)
        if name == "npsa_tile.cuh":
            lines = text.splitlines()
            lines[29] = "#error planted by the test"
            text = "\n".join(lines)
        return text

    monkeypatch.setattr(sources, "read", planted)
    try:
        nvrtc._nvrtc()
    except nvrtc.NVRTCError as err:
        pytest.skip(str(err))
    with pytest.raises(nvrtc.NVRTCError, match=r"npsa_tile\.cuh\(30\): .*error.*planted by the test"):
        nvrtc.compile_source("selftest.cu", "sm_80", names=("npsa_test_shfl",))


def test_ptxas_report_parsing():
    log = (
        "ptxas info    : 0 bytes gmem\n"
        "ptxas info    : Compiling entry function '_Z3fooILi64EEvPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z3fooILi64EEvPf\n"
        "    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 16 bytes smem, 400 bytes cmem[0]\n"
        "ptxas info    : Compiling entry function '_Z3barv' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z3barv\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 32 registers, used 0 barriers, 384 bytes cmem[0]\n"
    )
    assert nvrtc.parse_ptxas_log(log) == {
        "_Z3fooILi64EEvPf": dict(registers=255, spill_stores=8, spill_loads=12, stack=24, shared=16),
        "_Z3barv": dict(registers=32, spill_stores=0, spill_loads=0, stack=0, shared=0),
    }
