"""Draw the pictures of ``docs/inspect.md`` into ``docs/images/inspect/``.

Run from the repository root (needs matplotlib, the ``plot`` extra)::

    python docs/make_inspect_figures.py              # writes docs/images/inspect/*.png
    python docs/make_inspect_figures.py /tmp/inspect  # or anywhere else

All pictures use the shipped sample (:func:`npsparseattn.inspect.load_qk_sample`:
layer 3 of all-MiniLM-L6-v2, 12 heads, 512 tokens) in float64, cut into
16-token blocks (a 32 x 32 grid): the mass maps of every head, the mass
maps of four heads with each layout of the page's table outlined, and
mean coverage against density for each family of layouts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from npsparseattn import layouts
from npsparseattn.inspect import block_mass, coverage, load_qk_sample, lsh_selection, plot_mass_map
from npsparseattn.lsh import lsh_rotations

OUT = Path(__file__).resolve().parent / "images" / "inspect"
BLOCK = 16
HEADS = [0, 3, 7, 11]  # a local head, two heads on [CLS], a diffuse one


def oracle(mass: np.ndarray, per_row: int) -> layouts.BlockLayout:
    """Per head and query block, the ``per_row`` key blocks of largest true mass: the best any router can do."""
    keep = np.zeros(mass.shape, dtype=bool)
    np.put_along_axis(keep, np.argsort(-mass, axis=-1, kind="stable")[..., :per_row], True, axis=-1)
    return layouts.from_block_mask(keep, BLOCK, (512, 512))


def table_layouts(q: np.ndarray, k: np.ndarray, mass: np.ndarray) -> dict[str, layouts.BlockLayout]:
    """The layouts of the page's table, each at about a quarter of the blocks."""
    return {
        "sliding_window": layouts.sliding_window(512, BLOCK, 56),
        "longformer": layouts.longformer(512, BLOCK, 40, global_blocks=[0]),
        "bigbird": layouts.bigbird(512, BLOCK, global_blocks=[0], random_blocks=4, seed=0),
        "topk": layouts.topk(q, k, BLOCK, 8),
        "oracle": oracle(mass, 8),
    }


def curves(q: np.ndarray, k: np.ndarray, mass: np.ndarray, quick: bool) -> dict[str, list[tuple[float, float]]]:
    """(density, mean coverage) of each family as its budget grows."""
    steps = slice(None, None, 6) if quick else slice(None)
    rot = lsh_rotations(q.shape[-1], 16, n_hashes=13, seed=0)  # rounds added one at a time from one draw
    families: dict[str, list[Callable[[], object]]] = {
        "sliding_window": [lambda w=w: layouts.sliding_window(512, BLOCK, w) for w in range(8, 200, 16)],
        "longformer": [lambda w=w: layouts.longformer(512, BLOCK, w, global_blocks=[0]) for w in range(8, 200, 16)],
        "bigbird": [
            lambda r=r: layouts.bigbird(512, BLOCK, global_blocks=[0], random_blocks=r, seed=0) for r in range(0, 13)
        ],
        "topk": [lambda t=t: layouts.topk(q, k, BLOCK, t) for t in range(2, 15)],
        "lsh (16 buckets)": [
            lambda n=n: lsh_selection(q, k, 16, n_hashes=n, seed=None, rotations=np.ascontiguousarray(rot[:, :n]))
            for n in range(1, 14)
        ],
        "oracle": [lambda t=t: oracle(mass, t) for t in range(2, 15)],
    }
    points = {}
    for name, builders in families.items():
        points[name] = []
        for build in builders[steps]:
            selection = build()
            points[name].append((selection.density, float(coverage(q, k, selection).mean())))
    return points


def plot_curves(path: Path, points: dict[str, list[tuple[float, float]]]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 3.6), dpi=90, layout="constrained")
    ax = fig.subplots()
    for name, pts in points.items():
        x, y = zip(*pts)
        ax.plot(x, y, "o-" if name != "oracle" else "k--", ms=3, lw=1.2, label=name)
    ax.axvline(0.25, color="grey", lw=0.6, ls=":")
    ax.set_xlim(0, 0.6)
    ax.set_ylim(0, 1)
    ax.set_xlabel("density (share of pairs computed)", fontsize=8)
    ax.set_ylabel("mean coverage", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("all-MiniLM-L6-v2 layer 3, 512 tokens, 16-token blocks", fontsize=8)
    fig.savefig(path)


def main(out: Path = OUT, quick: bool = False) -> list[Path]:
    """Write the pictures into ``out``; return their paths (``quick``: fewer points on the curves)."""
    out.mkdir(parents=True, exist_ok=True)
    sample = load_qk_sample()
    q, k = sample.q.astype(np.float64), sample.k.astype(np.float64)
    mass = block_mass(q, k, BLOCK)
    paths = [out / "mass_maps.png"]
    plot_mass_map(paths[0], mass, title="mass per 16 x 16 block, every head", size=1.6, columns=6, dpi=80)
    for name, layout in table_layouts(q, k, mass).items():
        paths.append(out / f"{name}.png")
        title = f"{name}: density {layout.density:.1%}"
        plot_mass_map(paths[-1], mass, layout, heads=HEADS, title=title, size=1.8, dpi=80)
    paths.append(out / "coverage_vs_density.png")
    plot_curves(paths[-1], curves(q, k, mass, quick))
    return paths


if __name__ == "__main__":
    for p in main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(p, f"{p.stat().st_size // 1024} KB")
