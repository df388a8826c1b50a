"""``npsparseattn bench sparse``: the density sweep runs, prints its table and writes JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from npsparseattn import cli
from npsparseattn.bench import sparse as bench


def test_bench_sparse_table_and_json(tmp_path, capsys):
    path = tmp_path / "sparse.json"
    argv = ["bench", "sparse", "--seq", "256", "--heads", "2", "--kv-heads", "1", "--dim", "16", "--block", "32"]
    assert cli.main([*argv, "--densities", "0.25", "0.5", "--backward", "--compare", "none", "--repeat", "1",
                     "--json", str(path)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "CPU: " in out and "BLAS: " in out and "dense tiled (attention)" in out
    assert "FlexAttention: not compared (--compare none)" in out
    result = json.loads(path.read_text())
    rows = result["rows"]
    assert [(r["q_block"], r["kv_block"], r["density"]) for r in rows] == [
        (32, 32, 0.25), (32, 32, 0.5), (32, 1, 0.1), (1, 32, 0.1)
    ]  # fmt: skip
    for r in rows:
        assert r["forward_s"] > 0 and r["backward_s"] > 0
        assert r["of_dense"] == pytest.approx(r["forward_gflops"] / result["dense_forward_gflops"])


def test_selected_pairs_count_partial_blocks_and_unused_slots():
    kv_idx = np.array([[[[0, 2], [1, -1]]]], np.int32)  # two lists over keys of blocks 0..2 (the last partial)
    case = bench.Case("c", 0.5, 4, 4, kv_idx, np.array([[[2, 1]]], np.int32))
    # query block 0: 4 rows x (4 + 2) keys; query block 1: 3 rows x 4 keys; two query heads per list
    assert case.pairs(seq_q=7, seq_k=10, group=2) == 2 * (4 * 6 + 3 * 4)


def test_bench_sparse_refuses_bad_options():
    with pytest.raises(SystemExit, match="--heads 3 must be a multiple of --kv-heads 2"):
        cli.main(["bench", "sparse", "--seq", "64", "--heads", "3", "--kv-heads", "2", "--compare", "none"])
    with pytest.raises(SystemExit, match=r"--densities must lie in \(0, 1\]"):
        cli.main(["bench", "sparse", "--seq", "64", "--densities", "1.5", "--compare", "none"])


def test_a_case_the_backend_refuses_is_named_with_the_registry_reason():
    q = np.ones((1, 2, 64, 64), np.float16)
    token = bench.Case(
        "tokens", 0.1, 64, 1, np.arange(4, dtype=np.int32).reshape(1, 1, 1, 4), np.ones((1, 1, 1), np.int32)
    )
    blocks = bench.Case("blocks", 0.1, 64, 64, np.zeros((1, 1, 1, 1), np.int32), np.ones((1, 1, 1), np.int32))
    gpu = bench.devices.Device("cupy", "cupy")
    k = q[:, :1]
    assert "kv_block=1 (token mode) is below 16" in bench._refusal(gpu, token, q, k)
    assert "token mode" not in bench._refusal(gpu, blocks, q, k)
    assert bench._refusal(bench.devices.Device("numba", "numpy"), token, q, k) == ""
