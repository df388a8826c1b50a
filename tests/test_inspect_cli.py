"""``npsparseattn inspect``: runs on random data, the shipped sample and a .npz; refuses bad values in one line."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import random_array

from npsparseattn import inspect, layouts
from npsparseattn.cli import main


def test_random_data_prints_the_recall_of_each_head(capsys, tmp_path):
    out = tmp_path / "r.json"
    argv = ["inspect", "--seq", "200", "--heads", "2", "--dim", "8", "--block", "32", "--window", "40", "0"]
    assert main([*argv, "--causal", "--json", str(out)]) == 0
    text = capsys.readouterr().out.splitlines()
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 2, 200, 8))
    lay = layouts.sliding_window(200, 32, (40, 0))
    expected = inspect.recall(inspect.block_mass(q, k, 32, causal=True), lay)
    assert text[0] == "random (seed 0): q (2, 200, 8), k (2, 200, 8), causal"
    assert text[1] == repr(lay)
    assert [float(line.split()[1]) for line in text[3:5]] == [round(x, 3) for x in expected]
    result = json.loads(out.read_text())
    assert [h["recall"] for h in result["heads"]] == pytest.approx(expected, abs=1e-6)
    assert result["density"] == lay.density and text[-1] == f"results written to {out}"


def test_npz_with_gqa_and_a_picture(capsys, tmp_path, rng):
    path = tmp_path / "qk.npz"
    q, k = random_array(rng, (1, 4, 130, 16), np.float32), random_array(rng, (1, 2, 130, 16), np.float32)
    np.savez(path, q=q, k=k)
    png = tmp_path / "map.png"
    assert (
        main(["inspect", "--qk", str(path), "--layout", "topk", "--top-k", "2", "--block", "32", "-o", str(png)]) == 0
    )
    text = capsys.readouterr().out
    lay = layouts.topk(q[0], k[0], 32, 2)
    recall = inspect.recall(inspect.block_mass(q[0], k[0], 32), lay)
    assert f"{path}: q (4, 130, 16), k (2, 130, 16)" in text and repr(lay) in text
    assert f"mean recall {recall.mean():.3f} at density {lay.density:.1%}" in text
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_sample_one_head(capsys, tmp_path):
    png = tmp_path / "head.png"
    assert main(["inspect", "--sample", "--layout", "longformer", "--window", "64", "--head", "3", "-o", str(png)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("sentence-transformers/all-MiniLM-L6-v2 layer 3: q (12, 512, 32)")
    assert len([line for line in text.splitlines() if line[:4].strip().isdigit()]) == 12
    assert png.stat().st_size < 100_000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--window", "1", "2", "3"], "npsparseattn inspect: --window takes one or two values, got [1, 2, 3]"),
        (["--head", "4"], "npsparseattn inspect: --head 4 is out of range: the data has 4 heads (0..3)"),
        (["--qk", "/nonexistent/qk.npz"], "npsparseattn inspect: cannot read /nonexistent/qk.npz as a .npz file"),
        (["--json", "/nonexistent/r.json"], "npsparseattn inspect: cannot write --json /nonexistent/r.json"),
        (["-o", "/nonexistent/m.png"], "npsparseattn inspect: cannot write -o /nonexistent/m.png"),
        (["--layout", "bigbird", "--global-blocks", "99"], "npsparseattn inspect: global_blocks entries must lie in"),
        (["--scale", "nan"], "npsparseattn inspect: scale must be"),
    ],
)
def test_refusals_are_one_line(argv, message):
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--seq", "64", "--dim", "8", "--block", "16", *argv])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"q": np.ones((2, 8, 4))}, r"has no array k \(it has: q\)"),
        ({"q": np.ones((2, 8, 4), int), "k": np.ones((2, 8, 4), int)}, "q in .* must be floating point, got int64"),
        ({"q": np.ones((2, 2, 8, 4)), "k": np.ones((2, 2, 8, 4))}, r"must be \(H, L, D\), \(L, D\) or \(1, H, L, D\)"),
        ({"q": np.ones((3, 8, 4)), "k": np.ones((2, 8, 4))}, "query heads .3. must be a multiple of key/value heads"),
    ],
)
def test_bad_npz_files(tmp_path, arrays, message):
    path = tmp_path / "qk.npz"
    np.savez(path, **arrays)
    with pytest.raises(SystemExit, match=f"^npsparseattn inspect: .*{message}"):
        main(["inspect", "--qk", str(path), "--block", "4"])


def test_argparse_refuses_counts_below_one(capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--block", "0"])
    assert info.value.code == 2 and "--block: must be >= 1, got 0" in capsys.readouterr().err


def test_picture_needs_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit, match=r"-o needs matplotlib: pip install 'npsparseattn\[plot\]'"):
        main(["inspect", "--seq", "64", "-o", str(tmp_path / "m.png")])
