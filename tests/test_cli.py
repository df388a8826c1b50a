"""The ``npsparseattn bench`` command line: table, progress, --json and --plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from npsparseattn import cli
from npsparseattn.bench import BENCHMARKS

TINY = ["--seq", "96", "--heads", "1", "--dim", "16", "--repeat", "1", "--memory-seq", "0"]


def test_bench_attention_prints_progress_and_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "attention.json"
    assert cli.main(["bench", "attention", *TINY, "--causal", "both", "--json", str(path)]) == 0
    captured = capsys.readouterr()
    assert "attention: 100%" in captured.err and "2/2" in captured.err
    header = captured.out.splitlines()[0].split()
    for column in ("fwd", "GF/s", "fwd/GEMM", "bwd/GEMM", "B/tok", "tok/s", "J/tok", "err"):
        assert column in header
    rows = json.loads(path.read_text())["rows"]
    assert [(r["seq"], r["causal"]) for r in rows] == [(96, False), (96, True)]
    for r in rows:
        assert r["forward_gflops"] > 0 and r["backward_gflops"] > 0 and r["gemm_gflops"] > 0
        assert r["max_rel_error"] < 1e-5
        assert r["extra_bytes_per_token"] == r["forward_extra_bytes"] / 96
        assert r["energy_j_per_token"] is None and r["energy_note"]
    note = f"n/a ({rows[0]['energy_note']})"
    assert captured.out.count(note) == 1  # said once under the table, not in every row


def test_bench_attention_plot(tmp_path, capsys):
    png, js = tmp_path / "scaling.png", tmp_path / "r.json"
    argv = ["bench", "attention", *TINY, "--causal", "yes", "--no-backward", "--plot", str(png)]
    assert cli.main([*argv, "--plot-seq", "128", "256", "--json", str(js)]) == 0
    out = capsys.readouterr()
    assert "scaling: 100%" in out.err
    assert f"plot written to {png}" in out.out
    assert png.read_bytes().startswith(b"\x89PNG")
    scaling = json.loads(js.read_text())["scaling"]
    methods = {p["method"] for p in scaling["points"]}
    assert any(m.startswith("dense NumPy") for m in methods)
    assert any(m.startswith("tiled") for m in methods)
    assert len(methods) + len(scaling["missing"]) == 4
    for name in scaling["missing"]:
        assert f"{name} left out of the plot" in out.out


def test_every_operation_has_a_bench_command_with_json_and_plot():
    parser = cli.build_parser()
    for name in BENCHMARKS:
        args = parser.parse_args(["bench", name, "--json", "x.json", "--plot", "x.png", "--plot-seq", "512"])
        assert args.benchmark == name and str(args.plot) == "x.png" and args.plot_seq == [512]


def test_bench_requires_an_operation(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench"])
    assert exc.value.code == 2
    assert "OPERATION" in capsys.readouterr().err


def test_module_entry_point_help():
    result = subprocess.run(
        [sys.executable, "-m", "npsparseattn", "bench", "attention", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "--plot PNG" in result.stdout and "--plot-seq" in result.stdout and "--json" in result.stdout
