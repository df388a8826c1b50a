"""The CUDA C++ sources of the ``cupy`` backend: shipped as package data, assembled into translation units,
named instances, and the launch geometry the Python side assumes."""

from __future__ import annotations

import re
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
from raw_support import MODES, KernelRunner

import npsparseattn
from npsparseattn.cuda.cupy_raw import driver, sources

KERNELS_DIR = Path(npsparseattn.__file__).parent / "cuda" / "cupy_raw" / "kernels"
ROOT = Path(__file__).resolve().parent.parent


def test_every_kernel_file_is_found_through_importlib_resources():
    on_disk = sorted(p.name for p in KERNELS_DIR.iterdir() if p.suffix in (".cu", ".cuh"))
    assert on_disk == sources.kernel_files()
    assert set(sources.SOURCES) <= set(on_disk)


def test_every_kernel_and_emulation_file_is_declared_package_data():
    """The wheel ships the .cu/.cuh sources and the emulation headers (a pip-installed package builds both)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text[text.index("[tool.setuptools.package-data]") :]
    listed = re.search(r'^"npsparseattn" = \[(.*?)\]$', section, re.MULTILINE | re.DOTALL).group(1)
    patterns = re.findall(r'"([^"]+)"', listed)
    package = KERNELS_DIR.parent.parent.parent
    shipped = [p.relative_to(package).as_posix() for p in (KERNELS_DIR.parent / "emulate").glob("*.h")]
    shipped += [f"cuda/cupy_raw/kernels/{name}" for name in sources.kernel_files()]
    assert len(shipped) == len(sources.kernel_files()) + 2
    for path in shipped:
        assert any(fnmatch(path, p) for p in patterns), path


def test_translation_unit_inlines_each_header_once_and_names_the_real_files():
    text = sources.translation_unit("attention.cu", "block_sparse.cu")
    assert not re.search(r'^\s*#\s*include\s+"', text, re.MULTILINE)
    lines = text.splitlines()
    for header in ("npsa_ptx.cuh", "npsa_tile.cuh", "npsa_attn.cuh"):
        starts = [i for i, line in enumerate(lines) if line == f'#line 1 "{(KERNELS_DIR / header).as_posix()}"']
        assert len(starts) == 1, header
    # a #line directive points at the file and line the next line comes from
    for i, line in enumerate(lines[:-1]):
        m = re.fullmatch(r'#line (\d+) "(.+)"', line)
        if m and not lines[i + 1].startswith("#line"):
            source = Path(m.group(2)).read_text().splitlines()
            assert source[int(m.group(1)) - 1] == lines[i + 1] or source[int(m.group(1)) - 1] == "#pragma once"


def test_version_follows_every_kernel_file(monkeypatch):
    before = sources.version()
    original = sources.read
    monkeypatch.setattr(sources, "read", lambda name: original(name) + ("\n" if name == "npsa_tile.cuh" else ""))
    sources.version.cache_clear()
    try:
        assert sources.version() != before
    finally:
        monkeypatch.undo()
        sources.version.cache_clear()
    assert sources.version() == before


def test_instances_cover_dtype_head_dim_and_mask():
    names = sources.instances("attention.cu")
    assert "npsa_attn_fwd<npsa::bf16, 128, true>" in names and "npsa_dq_store<npsa::f16>" in names
    assert len(names) == 2 * len(sources.HEAD_DIMS) * (2 + 2 + 2 + 1) + 2
    assert sources.module_group("npsa_attn_bwd<npsa::f16, 64, false>") == (
        "npsa_attn_fwd<npsa::f16, 64, false>",
        "npsa_attn_fwd<npsa::f16, 64, true>",
        "npsa_attn_bwd<npsa::f16, 64, false>",
        "npsa_attn_bwd<npsa::f16, 64, true>",
        "npsa_attn_dq<npsa::f16, 64, false>",
        "npsa_attn_dq<npsa::f16, 64, true>",
        "npsa_bwd_prep<npsa::f16, 64>",
        "npsa_dq_store<npsa::f16>",
    )
    assert sources.source_of("npsa_bsa_bwd<npsa::f16, 32, true>") == "block_sparse.cu"
    with pytest.raises(KeyError, match="no kernel named 'npsa_nope'"):
        sources.source_of("npsa_nope<1>")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("d", sources.HEAD_DIMS)
def test_python_launch_geometry_matches_the_kernels(request, monkeypatch, mode, d):
    runner = KernelRunner(mode, monkeypatch)
    out = np.zeros(12, np.int32)
    runner.launch(f"npsa_test_shapes<{d}>", (1,), (32,), 0, [out])
    dense_bq, dense_bk, dense_smem, sparse_bq, sparse_bk, sparse_smem = out[:6].tolist()
    bwd_bk, bwd_bq, bwd_smem, threads, dq_bq, dq_smem = out[6:].tolist()
    assert (dense_bq, sparse_bq) == (driver.fwd_rows(d), driver.fwd_rows(d, sparse=True))
    assert dense_bk == sparse_bk == 64 and threads == driver.NTHREADS
    assert (dense_smem, sparse_smem) == (driver.fwd_shared_bytes(d), driver.fwd_shared_bytes(d, sparse=True))
    assert (bwd_bk, bwd_bq) == (driver.BWD_KEYS, driver.bwd_query_tile(d))
    assert bwd_smem == driver.bwd_shared_bytes(d)
    assert (dq_bq, dq_smem) == (driver.DQ_ROWS, driver.dq_shared_bytes(d))
