"""The scaling picture: forward time against sequence length, on log-log axes.

One chart tells the ``N^2`` against ``N`` story: textbook dense NumPy attention
(quadratic time *and* memory, so its line stops where its score matrix would
no longer fit), tiled exact attention (quadratic time, linear memory), and
the two sub-quadratic approximations, block-sparse attention with a sliding
window and Reformer LSH attention (linear time).  Operations that are not
importable in this installation are left out and named.

Used by ``npsparseattn bench <op> --plot out.png``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from npsparseattn.bench.common import (
    adaptive_time,
    dense_numpy_attention,
    dense_numpy_bytes,
    format_bytes,
    format_table,
)
from npsparseattn.exact import attention

DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
WINDOW = 256  # sliding-window width (keys before each query) of the block-sparse series
CHUNK = 64  # LSH chunk size; the number of buckets grows with L so the cost stays linear


@dataclass(frozen=True)
class Method:
    """One line of the chart: how to run it at length ``L``, and its look."""

    label: str
    color: str
    marker: str
    make: Callable[[np.ndarray, np.ndarray, np.ndarray], Callable[[], Any]]
    cannot_run: Callable[[int, int, int], str | None] = lambda heads, seq, itemsize: None


def _dense_too_big(heads: int, seq: int, itemsize: int) -> str | None:
    need = dense_numpy_bytes(heads, seq, seq, itemsize)
    have = _total_memory()
    if need > have // 4:
        return f"needs {format_bytes(need)} for scores (machine: {format_bytes(have)})"
    return None


def _total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _block_sparse_method() -> Method:
    bsa = importlib.import_module("npsparseattn.block_sparse")
    layouts = importlib.import_module("npsparseattn.layouts")
    block = 64

    def make(q, k, v):
        seq = q.shape[-2]
        layout = layouts.sliding_window(seq, block, (WINDOW, 0))
        return lambda: bsa.block_sparse_attention(q, k, v, layout, causal=True, window=(WINDOW, 0))

    return Method(f"block-sparse, sliding window {WINDOW}", "tab:green", "s", make)


def _lsh_method() -> Method:
    lsh = importlib.import_module("npsparseattn.lsh")

    def make(q, k, v):
        seq = q.shape[-2]
        n_buckets = max(2, 2 * (seq // (2 * CHUNK)))
        return lambda: lsh.lsh_attention(q, v, n_buckets=n_buckets, chunk_size=CHUNK, causal=True, seed=0)

    def cannot_run(heads, seq, itemsize):
        return None if seq % CHUNK == 0 else f"L must be a multiple of the chunk size {CHUNK}"

    return Method(f"LSH (Reformer), chunk {CHUNK}, 1 hash", "tab:purple", "^", make, cannot_run)


def methods() -> tuple[list[Method], dict[str, str]]:
    """The chart's series that this installation can run, and ``{name: reason}`` for the others."""
    found = [
        Method("dense NumPy (L x L scores)", "tab:red", "o", _dense_make, _dense_too_big),
        Method("tiled exact attention (numba)", "tab:blue", "D", _tiled_make),
    ]
    missing = {}
    for name, build in (("block-sparse", _block_sparse_method), ("LSH", _lsh_method)):
        try:
            found.append(build())
        except ImportError as exc:
            missing[name] = f"not importable ({exc})"
    return found, missing


def _dense_make(q, k, v):
    return lambda: dense_numpy_attention(q, k, v, causal=True)


def _tiled_make(q, k, v):
    return lambda: attention(q, k, v, causal=True)


def sweep(
    lengths: Iterable[int] = DEFAULT_LENGTHS,
    *,
    heads: int = 1,
    dim: int = 64,
    dtype: str = "float32",
    time_limit: float = 20.0,
    progress: Callable[[list, str], Iterable] | None = None,
) -> dict:
    """Time every available method's causal forward at every length.

    A method skips a length it cannot run (dense NumPy whose scores would not
    fit in a quarter of the memory; LSH at a length that is not a multiple of
    its chunk) and stops after a call slower than ``time_limit`` seconds; each
    skip is recorded with its reason.  Returns ``{"config", "points", "skipped", "missing"}``
    where each point is ``{"method", "seq", "seconds"}``.
    """
    lengths = sorted(int(n) for n in lengths)
    found, missing = methods()
    itemsize = np.dtype(dtype).itemsize
    rng = np.random.default_rng(0)
    warm = tuple(rng.standard_normal((1, heads, 2 * CHUNK * 2, dim)).astype(dtype) for _ in range(3))
    for method in found:
        method.make(*warm)()
    points, skipped = [], []
    stopped: dict[str, str] = {}
    steps = [(seq, method) for seq in lengths for method in found]
    iterator = progress(steps, "scaling") if progress else steps
    inputs: dict[int, tuple[np.ndarray, ...]] = {}
    for seq, method in iterator:
        if seq not in inputs:
            inputs.clear()
            inputs[seq] = tuple(rng.standard_normal((1, heads, seq, dim)).astype(dtype) for _ in range(3))
        reason = stopped.get(method.label) or method.cannot_run(heads, seq, itemsize)
        if reason:
            skipped.append({"method": method.label, "seq": seq, "reason": reason})
            continue
        seconds = adaptive_time(method.make(*inputs[seq]), budget=2.0, repeat=10)
        points.append({"method": method.label, "seq": seq, "seconds": seconds})
        if seconds > time_limit:
            stopped[method.label] = f"stopped after {seconds:.0f} s at L={seq}"
    config = {"heads": heads, "dim": dim, "dtype": dtype, "causal": True, "batch": 1}
    return {"config": config, "points": points, "skipped": skipped, "missing": missing}


def render(result: dict) -> str:
    """The sweep as a table: one row per length, one column of milliseconds per method."""
    labels = list(dict.fromkeys(p["method"] for p in result["points"]))
    lengths = sorted({p["seq"] for p in result["points"]} | {s["seq"] for s in result["skipped"]})
    times = {(p["method"], p["seq"]): p["seconds"] for p in result["points"]}
    rows = [[str(n)] + [f"{times[m, n] * 1e3:.1f}" if (m, n) in times else "-" for m in labels] for n in lengths]
    return format_table(["L"] + [f"{m} ms" for m in labels], rows)


def first_skips(result: dict) -> dict[str, dict]:
    """For each method that stopped, the first length it skipped and why."""
    firsts: dict[str, dict] = {}
    for skip in sorted(result["skipped"], key=lambda s: s["seq"]):
        firsts.setdefault(skip["method"], skip)
    return firsts


def plot(result: dict, path: str | os.PathLike) -> Path:
    """Draw ``result`` (from :func:`sweep`) as a log-log PNG at ``path``; returns the path.

    Dashed guides show slopes ``L^2`` and ``L``; the dense series ends with a
    note on the memory it would need at the next length.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {m.label: m for m in methods()[0]}
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=100)
    series: dict[str, list[tuple[int, float]]] = {}
    for p in result["points"]:
        series.setdefault(p["method"], []).append((p["seq"], p["seconds"]))
    for label, xy in series.items():
        x, y = zip(*sorted(xy))
        style = styles.get(label)
        ax.loglog(x, y, label=label, marker=style.marker if style else "o",
                  color=style.color if style else None, linewidth=1.8, markersize=5)  # fmt: skip
    _guides(ax, series)
    for label, skip in first_skips(result).items():
        if label in series:
            color = styles[label].color if label in styles else "k"
            text = textwrap.fill(f"L={skip['seq']}: {skip['reason']}", 26)
            ax.annotate(text, max(series[label]), xytext=(-8, 0), textcoords="offset points", fontsize=7.5,
                        color=color, ha="right", va="center",
                        bbox={"fc": "white", "ec": "none", "alpha": 0.85})  # fmt: skip
    cfg = result["config"]
    ax.set_xlabel("sequence length L (tokens)")
    ax.set_ylabel("forward time (s)")
    cores = os.cpu_count()
    ax.set_title(f"Causal attention forward, B=1 H={cfg['heads']} D={cfg['dim']} {cfg['dtype']}, {cores} CPU cores")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def _guides(ax: Any, series: dict[str, list[tuple[int, float]]]) -> None:
    """Dashed ``∝ L^2`` and ``∝ L`` lines through the longest run of the slowest and the fastest series.

    Anchored at the largest length, where timings are least noisy.
    """
    if not series:
        return
    x_all = sorted({x for xy in series.values() for x, _ in xy})
    xs = np.array([x_all[0], x_all[-1]], dtype=float)
    lasts = {label: max(xy) for label, xy in series.items()}
    longest = max(p[0] for p in lasts.values())
    at_longest = [p for p in lasts.values() if p[0] == longest]
    top = max(at_longest, key=lambda p: p[1])
    bottom = min(at_longest, key=lambda p: p[1])
    for (x0, y0), power, text in ((top, 2, "∝ L²"), (bottom, 1, "∝ L")):
        ys = y0 * (xs / x0) ** power
        ax.loglog(xs, ys, linestyle="--", color="0.55", linewidth=0.9)
        ax.annotate(text, (xs[-1], ys[-1]), xytext=(-28, 4), textcoords="offset points", fontsize=8, color="0.4")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--plot`` and ``--plot-seq``, added to every ``bench`` command."""
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="PNG",
        help="also time dense NumPy, tiled, block-sparse and LSH attention over --plot-seq and draw "
        "forward time vs L on log-log axes into this PNG",
    )
    parser.add_argument(
        "--plot-seq",
        type=int,
        nargs="+",
        default=list(DEFAULT_LENGTHS),
        metavar="L",
        help="sequence lengths of the scaling plot (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> dict:
    """The scaling sweep and plot requested by ``--plot``; prints its table and what is missing."""
    result = sweep(
        args.plot_seq, dim=getattr(args, "dim", 64), dtype=getattr(args, "dtype", "float32"), progress=args.progress
    )
    print("\nscaling (causal forward, B=1 H=1):")
    print(render(result))
    for label, skip in first_skips(result).items():
        print(f"  {label}: not run from L={skip['seq']} on: {skip['reason']}")
    for name, reason in result["missing"].items():
        print(f"  {name} left out of the plot: {reason}")
    path = plot(result, args.plot)
    print(f"plot written to {path}")
    return result
