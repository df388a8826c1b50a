"""``npsparseattn inspect``: how much of the dense attention a layout keeps, per head, with a picture.

Computes the mass map of the queries and keys (:func:`~npsparseattn.inspect.block_mass`),
builds a layout, prints per head the recall (the mean share of each query's
softmax mass inside the layout) and the coverage of the worst queries, and
draws the mass maps with the layout outlined.

Examples::

    npsparseattn inspect                                    # random q/k, sliding window
    npsparseattn inspect --sample --block 16 --layout topk --top-k 8 -o topk.png
    npsparseattn inspect --qk qk.npz --layout bigbird --random-blocks 2 --json recall.json
    npsparseattn inspect --seq 2048 --heads 8 --layout longformer --window 128 --causal

Data: seeded standard-normal q/k by default (``--seq``, ``--heads``,
``--dim``, ``--seed``); ``--sample``, real queries and keys of a text
encoder shipped with the package (:func:`~npsparseattn.inspect.load_qk_sample`);
or ``--qk FILE``, a ``.npz`` with arrays ``q`` and ``k`` of one sequence,
(Hq, Lq, D) and (Hk, Lk, D) (or (L, D), or with a leading axis of 1).
"""

from __future__ import annotations

import argparse
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from npsparseattn import inspect, layouts
from npsparseattn.cli._text import non_negative_int, positive_int
from npsparseattn.cli.layout import _side, _window

LAYOUTS = ("sliding_window", "longformer", "bigbird", "topk", "strided", "fixed", "causal", "dense")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``inspect``."""
    data = parser.add_argument_group("data (default: seeded random q/k)")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--qk", type=Path, metavar="FILE", help=".npz file with arrays q and k of one sequence")
    source.add_argument("--sample", action="store_true", help="the shipped MiniLM layer (12 heads, 512 tokens)")
    data.add_argument("--seq", type=positive_int, default=1024, help="random data: tokens (default 1024)")
    data.add_argument("--heads", type=positive_int, default=4, help="random data: heads (default 4)")
    data.add_argument("--dim", type=positive_int, default=64, help="random data: head dimension (default 64)")
    data.add_argument("--seed", type=non_negative_int, default=0, help="random data and bigbird: seed (default 0)")
    attn = parser.add_argument_group("attention")
    attn.add_argument("--causal", action="store_true", help="causal masking (bottom-right aligned)")
    attn.add_argument("--scale", type=float, help="score scale (default 1/sqrt(D))")
    lay = parser.add_argument_group("layout")
    lay.add_argument("--layout", choices=LAYOUTS, default="sliding_window", help="builder (default sliding_window)")
    lay.add_argument("--block", type=positive_int, default=64, help="block edge in tokens (default 64)")
    lay.add_argument(
        "--window",
        type=_side,
        nargs="+",
        metavar="TOKENS",
        default=[256],
        help="sliding_window, longformer, bigbird: LEFT [RIGHT] tokens (default 256; 'none' = unbounded)",
    )
    lay.add_argument("--global-blocks", type=int, nargs="*", default=[0], help="longformer, bigbird (default 0)")
    lay.add_argument("--random-blocks", type=non_negative_int, default=2, help="bigbird (default 2)")
    lay.add_argument("--top-k", type=positive_int, default=4, help="topk: key blocks per query block (default 4)")
    lay.add_argument("--stride", type=positive_int, default=4, help="strided, fixed: blocks per stride (default 4)")
    out = parser.add_argument_group("output")
    out.add_argument("-o", "--output", type=Path, help="draw the mass maps with the layout to this PNG (matplotlib)")
    out.add_argument("--head", type=non_negative_int, help="draw only this head (default: every head)")
    out.add_argument("--json", type=Path, help="also write the results to this JSON file")


def _fail(message: str) -> SystemExit:
    return SystemExit(f"npsparseattn inspect: {message}")


def _writable(path: Path | None, option: str) -> None:
    if path is not None and not (path.parent.is_dir() and os.access(path.parent, os.W_OK)):
        raise _fail(f"cannot write {option} {path}: {path.parent} is not a writable folder")


def _load(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    """``q``, ``k`` (H, L, D) and a description of where they come from."""
    if args.sample:
        sample = inspect.load_qk_sample()
        return sample.q, sample.k, f"{sample.model} layer {sample.layer}"
    if args.qk is None:
        rng = np.random.default_rng(args.seed)
        q = rng.standard_normal((args.heads, args.seq, args.dim))
        k = rng.standard_normal((args.heads, args.seq, args.dim))
        return q, k, f"random (seed {args.seed})"
    try:
        with np.load(args.qk, allow_pickle=False) as data:
            missing = [name for name in ("q", "k") if name not in data.files]
            if missing:
                raise _fail(f"{args.qk} has no array {' or '.join(missing)} (it has: {', '.join(data.files)})")
            q, k = data["q"], data["k"]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise _fail(f"cannot read {args.qk} as a .npz file: {exc}") from exc
    for name, x in (("q", q), ("k", k)):
        if x.ndim == 4 and x.shape[0] == 1:
            x = x[0]
        if x.ndim not in (2, 3):
            raise _fail(f"{name} in {args.qk} must be (H, L, D), (L, D) or (1, H, L, D); got shape {x.shape}")
        if x.dtype.kind != "f":
            raise _fail(f"{name} in {args.qk} must be floating point, got {x.dtype.name}")
    q, k = (x[0] if x.ndim == 4 else x for x in (q, k))
    q, k = (x[None] if x.ndim == 2 else x for x in (q, k))
    return q.astype(np.float32, copy=False), k.astype(np.float32, copy=False), str(args.qk)


def _layout(args: argparse.Namespace, q: np.ndarray, k: np.ndarray) -> layouts.BlockLayout:
    seq, block, name = (q.shape[1], k.shape[1]), args.block, args.layout
    if name == "sliding_window":
        return layouts.sliding_window(seq, block, _window(args.window))
    if name == "longformer":
        return layouts.longformer(seq, block, _window(args.window), global_blocks=args.global_blocks)
    if name == "bigbird":
        return layouts.bigbird(
            seq,
            block,
            window=_window(args.window),
            global_blocks=args.global_blocks,
            random_blocks=args.random_blocks,
            seed=args.seed,
        )
    if name == "topk":
        return layouts.topk(q, k, block, args.top_k, causal=args.causal)
    if name == "strided":
        return layouts.strided(seq, block, args.stride, causal=args.causal)
    if name == "fixed":
        return layouts.fixed(seq, block, args.stride, causal=args.causal)
    return getattr(layouts, name)(seq, block)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Compute, print, draw and write what was asked; return the results (as written with ``--json``).

    Bad values end the command with a one-line message, never a traceback.
    """
    if len(args.window) > 2:
        raise _fail(f"--window takes one or two values, got {args.window}")
    _writable(args.output, "-o")
    _writable(args.json, "--json")
    if args.output is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise _fail("-o needs matplotlib: pip install 'npsparseattn[plot]' (or pip install matplotlib)") from None
    q, k, source = _load(args)
    if args.head is not None and args.head >= q.shape[0]:
        raise _fail(f"--head {args.head} is out of range: the data has {q.shape[0]} heads (0..{q.shape[0] - 1})")
    try:
        layout = _layout(args, q, k)
        attn = {"causal": args.causal, "scale": args.scale}
        mass = inspect.block_mass(q, k, args.block, **attn)
        per_head = inspect.recall(mass, layout)
        cov = inspect.coverage(q, k, layout, **attn)
    except (TypeError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    result = {
        "source": source,
        "q_shape": list(q.shape),
        "k_shape": list(k.shape),
        "causal": args.causal,
        "layout": repr(layout),
        "density": layout.density,
        "heads": [
            {
                "head": h,
                "recall": float(per_head[h]),
                "coverage_p05": float(np.quantile(cov[h], 0.05)),
                "coverage_min": float(cov[h].min()),
            }
            for h in range(q.shape[0])
        ],
        "recall": float(per_head.mean()),
    }
    print(f"{source}: q {tuple(q.shape)}, k {tuple(k.shape)}{', causal' if args.causal else ''}")
    print(layout)
    print(f"{'head':>4}  {'recall':>6}  {'5% of queries keep less than':>28}  {'worst query':>11}")
    for row in result["heads"]:
        print(f"{row['head']:>4}  {row['recall']:6.3f}  {row['coverage_p05']:28.3f}  {row['coverage_min']:11.3f}")
    print(f"mean recall {result['recall']:.3f} at density {layout.density:.1%}")
    if args.output is not None:
        heads = None if args.head is None else [args.head]
        title = f"{args.layout}, {source}, block {args.block}: density {layout.density:.1%}"
        inspect.plot_mass_map(args.output, mass, layout, heads=heads, title=title)
        print(f"picture written to {args.output}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"results written to {args.json}")
    return result
