"""Command line: ``npsparseattn demo | layout <builder> | bench <operation>``.

The command-line modules live here (``demo``, ``layout``) and in
:mod:`npsparseattn.bench` (``bench``); the library modules import none of them.
Run ``npsparseattn --help`` or ``npsparseattn <command> --help`` for details.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from npsparseattn import __version__
from npsparseattn.bench import BENCHMARKS, plot
from npsparseattn.bench.common import progress
from npsparseattn.cli import demo, layout


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``npsparseattn`` command."""
    parser = argparse.ArgumentParser(
        prog="npsparseattn",
        description="Exact and sparse attention kernels for NumPy/CuPy arrays: demo and benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"npsparseattn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo_parser = commands.add_parser(
        "demo",
        help="dense vs tiled attention on random data: time, memory, error, and a length dense cannot fit",
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(demo_parser)

    layout_parser = commands.add_parser(
        "layout",
        help="build a block-sparse layout, print it and draw it to a PNG",
        description=layout.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    layout.add_arguments(layout_parser)

    bench_parser = commands.add_parser("bench", help="benchmark an operation against the same-run GEMM rate")
    benches = bench_parser.add_subparsers(dest="benchmark", required=True, metavar="OPERATION")
    for name, module in BENCHMARKS.items():
        sub = benches.add_parser(
            name,
            help=module.__doc__.strip().splitlines()[0],
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.add_argument("--json", type=Path, help="also write the results to this JSON file")
        plot.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``npsparseattn`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        demo.run(args)
        return 0
    if args.command == "layout":
        layout.run(args)
        return 0
    args.progress = progress
    result = BENCHMARKS[args.benchmark].run(args)
    if args.plot:
        result["scaling"] = plot.run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
