"""``npsparseattn bench inference`` at tiny sizes: every contender runs, agrees with the reference, is reported."""

from __future__ import annotations

import json

import numpy as np

from npsparseattn import cli
from npsparseattn.bench import inference
from npsparseattn.reference.kvcache import gather


def test_paged_copy_holds_the_same_keys(rng):
    cache = rng.standard_normal((2, 3, 50, 4))
    pages, table = inference.paged_copy(cache, 16, rng)
    assert pages.shape == (8, 3, 16, 4) and table.shape == (2, 4)
    for b in range(2):
        np.testing.assert_array_equal(gather(pages, table[b], 50, np), cache[b])


def test_varlen_lengths_are_mixed_and_include_the_longest(rng):
    lengths = inference.varlen_lengths(16, 2048, rng)
    assert lengths[0] == 2048 and lengths.min() >= 64 and lengths.max() <= 2048 and len(set(lengths)) > 8


def test_tiny_run_reports_every_contender(tmp_path, capsys):
    out = tmp_path / "inference.json"
    argv = ["bench", "inference", "--cache", "300", "--q-heads", "4", "--kv-heads", "2", "--dim", "16",
            "--page-size", "64", "7", "--rounds", "2", "--repeat", "1", "--varlen-seqs", "3", "--varlen-max", "96",
            "--varlen-heads", "2", "--varlen-dim", "8", "--json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    (decode,) = result["decode"]
    names = set(decode["contenders"])
    assert {"contiguous", "paged 64", "paged 7"} <= names
    for name, c in decode["contenders"].items():
        assert c["max_rel_error"] < 1e-5, name
        assert 0 < c["best_s"] <= c["median_s"] and f" {name} " in printed
    varlen = result["varlen"]
    assert varlen["max_abs_difference"] < 1e-5 and varlen["flop_ratio"] > 1 and varlen["token_ratio"] > 1
    assert "measured speed-up" in printed
