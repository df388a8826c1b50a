"""`npsparseattn layout ...`, the docs' layout gallery, and `npsparseattn bench block-sparse` (smoke)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from npsparseattn import layouts
from npsparseattn.cli import main

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["dense", "--seq", "256", "--block", "64"], layouts.dense(256, 64)),
        (["causal", "--seq", "200", "300", "--block", "32", "48"], layouts.causal((200, 300), (32, 48))),
        (["sliding_window", "--seq", "512", "--window", "64", "0"], layouts.sliding_window(512, 64, (64, 0))),
        (["sliding_window", "--seq", "512", "--window", "none", "64"], layouts.sliding_window(512, 64, (None, 64))),
        (["strided", "--seq", "512", "--block", "32", "--stride", "3"], layouts.strided(512, 32, 3)),
        (
            ["fixed", "--seq", "512", "--block", "32", "--stride", "4", "--summary", "2", "--bidirectional"],
            layouts.fixed(512, 32, 4, summary=2, causal=False),
        ),
        (
            ["longformer", "--seq", "512", "--window", "32", "--global-blocks", "0", "3"],
            layouts.longformer(512, 64, 32, global_blocks=[0, 3]),
        ),
        (
            ["bigbird", "--seq", "1024", "--random-blocks", "2", "--seed", "4", "--heads", "2"],
            layouts.bigbird(1024, 64, random_blocks=2, seed=4, heads=2),
        ),
    ],
)
def test_layout_command_builds_what_the_builder_builds(capsys, argv, expected):
    assert main(["layout", *argv]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == repr(expected)
    assert printed[1:] == expected.to_ascii().splitlines()


def test_layout_command_writes_the_png(tmp_path, capsys):
    path = tmp_path / "bigbird.png"
    assert main(["layout", "bigbird", "--seq", "4096", "--block", "64", "-o", str(path)]) == 0
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size < 100_000
    assert f"picture written to {path}" in capsys.readouterr().out


def test_layout_command_routes_random_data(capsys):
    assert main(["layout", "topk", "--seq", "512", "--top-k", "2", "--causal", "--heads", "2", "--head", "1"]) == 0
    out = capsys.readouterr().out
    assert "heads=2" in out and "head 1 of 2: 8 x 8 blocks of 64 x 64 tokens, 15 stored" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fixed", "--stride", "0"], "npsparseattn layout fixed: stride must be >= 1, got 0"),
        (["dense", "--seq", "1", "2", "3"], "npsparseattn layout: --seq takes one or two values, got [1, 2, 3]"),
        (["bigbird", "--global-blocks", "99"], "npsparseattn layout bigbird: global_blocks entries must lie in"),
    ],
)
def test_layout_command_errors(argv, message):
    with pytest.raises(SystemExit) as info:
        main(["layout", *argv])
    assert str(info.value).startswith(message)


def test_gallery_draws_every_pattern_small(tmp_path):
    """docs/make_layout_gallery.py draws each builder under 100 KB; the committed pictures are the same set."""
    gallery = runpy.run_path(str(DOCS / "make_layout_gallery.py"))
    paths = gallery["main"](tmp_path)
    names = {p.name for p in paths}
    assert {"dense.png", "causal.png", "sliding_window.png", "strided.png", "fixed.png", "longformer.png"} <= names
    assert {"bigbird.png", "topk.png"} <= names
    assert all(p.stat().st_size < 100_000 for p in paths)
    committed = DOCS / "images" / "layouts"
    assert {p.name for p in committed.glob("*.png")} == names
    assert all(p.stat().st_size < 100_000 for p in committed.glob("*.png"))


def test_bench_block_sparse_smoke(tmp_path, capsys):
    out = tmp_path / "bs.json"
    argv = ["bench", "block-sparse", "--seq", "512", "--heads", "1", "--dim", "16", "--windows", "1", "2"]
    assert main([*argv, "--repeat", "1", "--backward", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dense tiled (attention)" in text and "window +-1 blocks" in text and "bigbird" in text
    result = json.loads(out.read_text())
    assert [r["layout"] for r in result["rows"]][:2] == ["window +-1 blocks", "window +-2 blocks"]
    assert result["rows"][0]["density"] == pytest.approx(layouts.sliding_window(512, 64, 64).density)
    assert all(r["forward_s"] > 0 and r["backward_s"] > 0 for r in result["rows"])
    assert result["max_rel_error"] < 1e-5
