"""Command line: ``npsparseattn demo | layout <builder> | inspect | bench <operation> | compile``.

The command-line modules live here (``demo``, ``layout``, ``inspect``) and in
:mod:`npsparseattn.bench` (``bench``); the library modules import none of them.
Run ``npsparseattn --help`` or ``npsparseattn <command> --help`` for details.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

from npsparseattn import __version__
from npsparseattn.bench import BENCHMARKS, isa, plot
from npsparseattn.bench.common import progress
from npsparseattn.cli import demo, layout
from npsparseattn.cli import inspect as inspect_command
from npsparseattn.cli._text import plain

# bench options that count something: each value must be at least 1 (or at least 0)
_COUNTS = (
    "seq", "batch", "heads", "kv_heads", "dim", "repeat", "block", "n_hashes", "chunk_size", "plot_seq",
    "cache", "q_heads", "page_size", "rounds", "varlen_max", "varlen_heads", "varlen_dim",
)  # fmt: skip
_ZERO_OR_MORE = ("chunks_before", "chunks_after", "threads", "memory_seq", "varlen_seqs")
PLOT_PACKAGE = "matplotlib"
PLOT_INSTALL = "pip install 'npsparseattn[plot]' (or pip install matplotlib)"


def missing(package: str) -> bool:
    """True if ``package`` cannot be imported here (an optional dependency that is not installed)."""
    try:
        importlib.import_module(package)
    except ImportError:
        return True
    return False


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
        help="every operation on built-in random data: speed, memory and error against the float64 reference",
        description=plain(demo.__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(demo_parser)

    layout_parser = commands.add_parser(
        "layout",
        help="build a block-sparse layout, print it and draw it to a PNG",
        description=plain(layout.__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    layout.add_arguments(layout_parser)

    inspect_parser = commands.add_parser(
        "inspect",
        help="how much of the dense softmax mass a layout keeps, per head, with the mass map drawn",
        description=plain(inspect_command.__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect_command.add_arguments(inspect_parser)

    compile_parser = commands.add_parser(
        "compile",
        help="compile every CPU kernel into numba's on-disk cache ahead of first use, on several cores",
        description=(
            "Compile every numba CPU kernel version (float32 and float64, contiguous and strided inputs) into "
            "numba's on-disk cache, so that no later call compiles: for a container image, a cluster job's "
            "first step or a test run.  Groups of kernels compile in parallel processes."
        ),
    )
    compile_parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="processes at a time (default: the CPU count)"
    )

    bench_parser = commands.add_parser("bench", help="benchmark an operation against the same-run GEMM rate")
    benches = bench_parser.add_subparsers(dest="benchmark", required=True, metavar="OPERATION")
    for name, module in BENCHMARKS.items():
        sub = benches.add_parser(
            name,
            help=plain(module.__doc__).strip().splitlines()[0],
            description=plain(module.__doc__),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.add_argument("--json", type=Path, help="also write the results to this JSON file")
        plot.add_arguments(sub)
    return parser


def check_bench_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any work: counts below 1, values a benchmark cannot combine (``check_arguments`` of its
    module), a ``--json``/``--plot`` file that cannot be written, ``--plot`` without matplotlib."""
    for names, minimum in ((_COUNTS, 1), (_ZERO_OR_MORE, 0)):
        for name in names:
            value = getattr(args, name, None)
            values = value if isinstance(value, list) else [value]
            bad = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v < minimum]
            if bad:
                parser.error(f"bench {args.benchmark}: --{name.replace('_', '-')} must be >= {minimum}, got {bad[0]}")
    check = getattr(BENCHMARKS[args.benchmark], "check_arguments", None)
    problem = check(args) if check is not None else None
    if problem:
        parser.error(f"bench {args.benchmark}: {problem}")
    for option in ("json", "plot"):
        path = getattr(args, option, None)
        if path is None:
            continue
        folder = Path(path).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            parser.error(f"bench {args.benchmark}: cannot write --{option} {path}: {folder} is not a writable folder")
    if getattr(args, "plot", None) is not None and missing(PLOT_PACKAGE):
        parser.error(f"bench {args.benchmark}: --plot needs {PLOT_PACKAGE}, which is not installed: {PLOT_INSTALL}")


def check_layout_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any work, ``-o`` without matplotlib."""
    if args.output is not None and missing(PLOT_PACKAGE):
        parser.error(f"layout {args.builder}: -o/--output needs {PLOT_PACKAGE}, which is not installed: {PLOT_INSTALL}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``npsparseattn`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo.run(args)
        return 0
    if args.command == "layout":
        check_layout_arguments(parser, args)
        layout.run(args)
        return 0
    if args.command == "inspect":
        inspect_command.run(args)
        return 0
    if args.command == "compile":
        if args.jobs < 1:
            parser.error(f"compile: --jobs must be >= 1, got {args.jobs}")
        from npsparseattn.cpu.precompile import precompile

        start = time.perf_counter()
        precompile(args.jobs, report=lambda line: print(f"compiled {line}", flush=True))
        print(f"every CPU kernel is in numba's cache ({time.perf_counter() - start:.1f} s)")
        return 0
    check_bench_arguments(parser, args)
    if isa.wants_rerun(args):
        return isa.rerun(args.isa, sys.argv[1:] if argv is None else list(argv))
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
