"""``npsparseattn bench lsh``: the sweep runs, prints its table and verdicts, and writes JSON."""

from __future__ import annotations

import json

from npsparseattn import cli
from npsparseattn.bench import lsh as bench


def test_bench_lsh_table_verdicts_and_json(tmp_path, capsys):
    path = tmp_path / "lsh.json"
    argv = ["bench", "lsh", "--seq", "128", "256", "--heads", "1", "--dim", "8", "--chunk-size", "32"]
    assert cli.main([*argv, "--repeat", "1", "--dense-seq", "256", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["L", "buckets", "hash", "ms"]
    assert "time growth per doubling of L: at most" in out
    assert "L=256: dense tiled attention forward" in out
    result = json.loads(path.read_text())
    rows = result["rows"]
    assert [r["seq"] for r in rows] == [128, 256]
    assert rows[0]["n_buckets"] == "8" and rows[1]["n_buckets"] == "16"
    for r in rows:
        assert r["forward_s"] > 0 and r["backward_s"] > 0 and r["hash_s"] > 0
        assert r["forward_extra_bytes"] >= 0 and r["backward_extra_bytes"] >= 0
    assert rows[1]["forward_growth"] == rows[1]["forward_s"] / rows[0]["forward_s"]
    assert result["max_rel_error"] < 1e-5
    assert result["dense"]["speedup"] == result["dense"]["dense_forward_s"] / result["dense"]["lsh_forward_s"]


def test_auto_buckets_follow_reformer_rule():
    assert bench.auto_buckets(1024, 64) == 32
    assert bench.auto_buckets(4096, 64) == (8, 16)  # 128 buckets, factorized from 64 on
    assert bench.auto_buckets(65536, 64) == (32, 64)
    assert bench.parse_buckets("16x32", 4096, 64) == (16, 32)
    assert bench.parse_buckets("24", 4096, 64) == 24
