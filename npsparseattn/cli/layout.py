"""``npsparseattn layout <builder>``: build a block-sparse layout, print it, optionally draw it to a PNG.

Examples::

    npsparseattn layout bigbird --seq 4096 --block 64 -o bigbird.png
    npsparseattn layout sliding_window --seq 4096 --block 64 --window 256 0
    npsparseattn layout strided --seq 2048 --block 32 --stride 8
    npsparseattn layout topk --seq 2048 --block 64 --top-k 4 --causal   # routing on seeded random q, k

Every builder of :mod:`npsparseattn.layouts` that needs no input arrays has a
subcommand with its parameters as options; ``topk`` routes seeded random data.
The layout's summary and a terminal picture are always printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from npsparseattn import layouts
from npsparseattn.cli._text import non_negative_int, positive_int


def _side(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"window bounds are integers or 'none', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"window bounds must be >= 0 or 'none', got {value}")
    return value


def _window(values: list[int | None] | None) -> layouts.Window:
    """``[w]`` -> ``(w, w)``; ``[left, right]`` -> ``(left, right)``; ``None`` -> builder default."""
    if values is None:
        return None
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _add_window(parser: argparse.ArgumentParser, default: list[int | None] | None, what: str) -> None:
    parser.add_argument(
        "--window",
        type=_side,
        nargs="+",
        metavar="TOKENS",
        default=default,
        help=f"{what}: LEFT [RIGHT] in tokens ('none' = unbounded; one value = both sides)",
    )


def _build(args: argparse.Namespace) -> layouts.BlockLayout:
    seq, block = (
        (args.seq[0] if len(args.seq) == 1 else tuple(args.seq)),
        (args.block[0] if len(args.block) == 1 else tuple(args.block)),
    )
    name = args.builder
    if name in ("dense", "causal"):
        return getattr(layouts, name)(seq, block)
    if name == "sliding_window":
        return layouts.sliding_window(seq, block, _window(args.window))
    if name == "strided":
        return layouts.strided(seq, block, args.stride, causal=not args.bidirectional)
    if name == "fixed":
        return layouts.fixed(seq, block, args.stride, summary=args.summary, causal=not args.bidirectional)
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
            heads=args.heads,
        )
    rng = np.random.default_rng(args.seed)
    q = rng.standard_normal((args.heads, args.seq[0], args.dim))
    k = rng.standard_normal((args.heads, args.seq[-1], args.dim))
    return layouts.topk(q, k, block, args.top_k, causal=args.causal)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Subcommands of ``layout``, one per builder, each with its parameters."""
    builders = parser.add_subparsers(dest="builder", required=True, metavar="BUILDER")

    def builder(name: str, text: str) -> argparse.ArgumentParser:
        sub = builders.add_parser(name, help=text, description=text)
        sub.add_argument(
            "--seq", type=non_negative_int, nargs="+", default=[4096], metavar="L", help="Lq [Lk] (default 4096)"
        )
        sub.add_argument(
            "--block", type=positive_int, nargs="+", default=[64], metavar="B", help="bq [bk] (default 64)"
        )
        sub.add_argument("-o", "--output", type=Path, help="write a PNG picture here (needs matplotlib)")
        sub.add_argument("--head", type=non_negative_int, default=0, help="head to draw for per-head layouts")
        sub.add_argument("--width", type=positive_int, default=64, help="characters per row of the terminal picture")
        return sub

    builder("dense", "every block")
    builder("causal", "blocks with a pair j <= i + Lk - Lq")
    sub = builder("sliding_window", "blocks touched by a token window around the diagonal")
    _add_window(sub, [256, 256], "window (default 256 256)")
    for name, text in (
        ("strided", "Sparse Transformer strided: local band plus every stride-th block"),
        ("fixed", "Sparse Transformer fixed: own segment plus the summary blocks of every segment"),
    ):
        sub = builder(name, text)
        sub.add_argument("--stride", type=int, default=8, help="blocks per stride/segment (default 8)")
        if name == "fixed":
            sub.add_argument("--summary", type=int, default=1, help="summary blocks per segment (default 1)")
        sub.add_argument("--bidirectional", action="store_true", help="drop the causal part of the rule")
    sub = builder("longformer", "sliding window plus global blocks (symmetric)")
    _add_window(sub, [256, 256], "window (default 256 256)")
    sub.add_argument("--global-blocks", type=int, nargs="*", default=[0], help="global key blocks (default 0)")
    sub = builder("bigbird", "window plus global plus seeded random blocks")
    _add_window(sub, None, "window (default: one block each side)")
    sub.add_argument("--global-blocks", type=int, nargs="*", default=[0, -1], help="global key blocks (default 0 -1)")
    sub.add_argument("--random-blocks", type=int, default=3, help="random key blocks per query block (default 3)")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--heads", type=int, default=1, help="heads, each with its own random blocks")
    sub = builder("topk", "content routing on seeded random q, k: top-k key blocks by mean-pooled scores")
    sub.add_argument("--top-k", type=int, default=4, help="key blocks kept per query block (default 4)")
    sub.add_argument("--causal", action="store_true", help="never pick key blocks after the query block")
    sub.add_argument("--dim", type=int, default=64, help="head dimension of the random data")
    sub.add_argument("--heads", type=int, default=1)
    sub.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> layouts.BlockLayout:
    """Build the layout, print its summary and picture, write the PNG if asked; return the layout.

    Bad values end the command with a one-line message (exit status 1), never a traceback.
    """
    for name in ("seq", "block", "window"):
        values = getattr(args, name, None)
        if values is not None and len(values) > 2:
            raise SystemExit(f"npsparseattn layout: --{name} takes one or two values, got {values}")
    try:
        layout = _build(args)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"npsparseattn layout {args.builder}: {exc}") from exc
    if args.head >= layout.heads:
        raise SystemExit(
            f"npsparseattn layout {args.builder}: --head {args.head} is out of range: the layout has "
            f"{layout.heads} head{'s' if layout.heads > 1 else ''} (0..{layout.heads - 1})"
        )
    print(layout)
    print(layout.to_ascii(head=args.head, width=args.width))
    if args.output is not None:
        seq = "x".join(map(str, args.seq))
        block = "x".join(map(str, args.block))
        layout.plot(args.output, head=args.head, title=f"{args.builder}  L={seq} block={block}  {layout.density:.1%}")
        print(f"picture written to {args.output}")
    return layout
