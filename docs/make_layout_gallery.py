"""Draw every block-sparse layout builder to ``docs/images/layouts/<name>.png``.

Run from the repository root (needs matplotlib, the ``plot`` extra)::

    python docs/make_layout_gallery.py              # writes docs/images/layouts/*.png
    python docs/make_layout_gallery.py /tmp/gallery  # or anywhere else

Each picture is one head of a layout at L=2048 with 64-token blocks (a 32 x 32
block grid), small enough to stay well under 100 KB.  docs/block_sparse.md
shows them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from npsparseattn import layouts

SEQ, BLOCK = 2048, 64
OUT = Path(__file__).resolve().parent / "images" / "layouts"


def _routed() -> layouts.BlockLayout:
    """topk on seeded random data where each 64-token stretch is about one of 6 topics.

    Query blocks pick the earlier key blocks on their own topic: content
    routing finds far-away blocks that a fixed pattern would not.
    """
    rng = np.random.default_rng(0)
    topics = rng.standard_normal((6, 32))
    per_token = topics[rng.integers(0, 6, SEQ // BLOCK)].repeat(BLOCK, axis=0)
    q = per_token + rng.standard_normal((SEQ, 32))
    k = per_token + rng.standard_normal((SEQ, 32))
    return layouts.topk(q, k, BLOCK, 4, causal=True)


GALLERY: dict[str, tuple[str, Callable[[], layouts.BlockLayout]]] = {
    "dense": ("dense", lambda: layouts.dense(SEQ, BLOCK)),
    "causal": ("causal", lambda: layouts.causal(SEQ, BLOCK)),
    "sliding_window": ("sliding_window, window 256", lambda: layouts.sliding_window(SEQ, BLOCK, 256)),
    "strided": ("strided, stride 6 (causal)", lambda: layouts.strided(SEQ, BLOCK, 6)),
    "fixed": ("fixed, stride 8, summary 2 (causal)", lambda: layouts.fixed(SEQ, BLOCK, 8, summary=2)),
    "longformer": ("longformer, window 128, global 0", lambda: layouts.longformer(SEQ, BLOCK, 128)),
    "bigbird": ("bigbird, 3 window + 2 global + 3 random", lambda: layouts.bigbird(SEQ, BLOCK, seed=0)),
    "topk": ("topk, top 4 (causal, routed)", _routed),
    "union": (
        "union(causal sliding_window, strided)",
        lambda: layouts.union(layouts.sliding_window(SEQ, BLOCK, (128, 0)), layouts.strided(SEQ, BLOCK, 8)),
    ),
}


def main(out: Path = OUT) -> list[Path]:
    """Write one PNG per entry of :data:`GALLERY` into ``out``; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (title, build) in GALLERY.items():
        layout = build()
        path = out / f"{name}.png"
        layout.plot(path, title=f"{title}: {layout.density:.0%}")
        paths.append(path)
        print(f"{path}  {path.stat().st_size / 1024:.0f} KB  {layout!r}")
    return paths


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
