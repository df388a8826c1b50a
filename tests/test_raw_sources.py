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
from npsparseattn.cuda import raw_common, raw_exact, raw_sources

KERNELS_DIR = Path(npsparseattn.__file__).parent / "cuda" / "kernels"
ROOT = Path(__file__).resolve().parent.parent


def test_every_kernel_file_is_found_through_importlib_resources():
    on_disk = sorted(p.name for p in KERNELS_DIR.iterdir() if p.suffix in (".cu", ".cuh"))
    assert on_disk == raw_sources.kernel_files()
    assert set(raw_sources.SOURCES) <= set(on_disk)


def test_every_kernel_file_is_declared_package_data():
    text = (ROOT / "pyproject.toml").read_text()
    section = text[text.index("[tool.setuptools.package-data]") :]
    patterns = re.findall(r'"([^"]+)"', re.search(r'^"npsparseattn" = \[(.*)\]$', section, re.MULTILINE).group(1))
    for name in raw_sources.kernel_files():
        assert any(fnmatch(f"cuda/kernels/{name}", p) for p in patterns), name


def test_translation_unit_inlines_each_header_once_and_names_the_real_files():
    text = raw_sources.translation_unit("attention.cu", "block_sparse.cu")
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
    before = raw_sources.version()
    original = raw_sources.read
    monkeypatch.setattr(raw_sources, "read", lambda name: original(name) + ("\n" if name == "npsa_tile.cuh" else ""))
    raw_sources.version.cache_clear()
    try:
        assert raw_sources.version() != before
    finally:
        monkeypatch.undo()
        raw_sources.version.cache_clear()
    assert raw_sources.version() == before


def test_instances_cover_dtype_head_dim_and_mask():
    names = raw_sources.instances("attention.cu")
    assert "npsa_attn_fwd<npsa::bf16, 128, true>" in names and "npsa_dq_store<npsa::f16>" in names
    assert len(names) == 2 * len(raw_sources.HEAD_DIMS) * (2 + 2 + 1) + 2
    assert raw_sources.module_group("npsa_attn_bwd<npsa::f16, 64, false>") == (
        "npsa_attn_fwd<npsa::f16, 64, false>",
        "npsa_attn_fwd<npsa::f16, 64, true>",
        "npsa_attn_bwd<npsa::f16, 64, false>",
        "npsa_attn_bwd<npsa::f16, 64, true>",
        "npsa_bwd_prep<npsa::f16, 64>",
        "npsa_dq_store<npsa::f16>",
    )
    assert raw_sources.source_of("npsa_bsa_bwd<npsa::f16, 32, true>") == "block_sparse.cu"
    with pytest.raises(KeyError, match="no kernel named 'npsa_nope'"):
        raw_sources.source_of("npsa_nope<1>")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("d", raw_sources.HEAD_DIMS)
def test_python_launch_geometry_matches_the_kernels(request, monkeypatch, mode, d):
    runner = KernelRunner(mode, monkeypatch)
    out = np.zeros(10, np.int32)
    runner.launch(f"npsa_test_shapes<{d}>", (1,), (32,), 0, [out])
    dense_bq, dense_bk, dense_smem, sparse_bq, sparse_bk, sparse_smem, bwd_bk, bwd_bq, bwd_smem, threads = out.tolist()
    assert (dense_bq, sparse_bq) == (raw_common.fwd_rows(d), raw_common.fwd_rows(d, sparse=True))
    assert dense_bk == sparse_bk == 64 and threads == raw_common.NTHREADS
    assert dense_smem == sparse_smem == raw_common.fwd_shared_bytes(d)
    assert (bwd_bk, bwd_bq) == (raw_exact.BK, raw_common.bwd_query_tile(d))
    assert bwd_smem == raw_common.bwd_shared_bytes(d)
