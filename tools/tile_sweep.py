"""Rate of the tiled CPU kernel for several tile shapes, side by side with the same-run GEMM rate.

    NUMBA_NUM_THREADS=2 python tools/tile_sweep.py --dim 64 --seq 4096 --pass forward

Each round times every shape in turn (``exact.tile_shape`` replaced for the
pass measured), then a 2048^2 NumPy matrix product; the best of the rounds
is printed.  The numbers behind ``exact.PACKED_TILES`` (docs/design.md).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import npsparseattn as nsa
from npsparseattn.bench.isa import describe_cpu
from npsparseattn.cpu import exact

SHAPES = {
    ("forward", 64): [(32, 384), (64, 256), (128, 256), (256, 256), (256, 512), (128, 512)],
    ("forward", 128): [(32, 192), (128, 128), (128, 256), (256, 256), (256, 128)],
    ("backward", 64): [(96, 128), (128, 128), (128, 256), (256, 256)],
    ("backward", 128): [(112, 64), (128, 128), (128, 256), (256, 128)],
}


def best(fn, n: int = 3) -> float:
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, choices=(64, 128), default=64)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--pass", dest="which", choices=("forward", "backward"), default="forward")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, args.heads, args.seq, args.dim), dtype=np.float32) for _ in range(3))
    out, lse = nsa.attention(q, k, v, return_lse=True)
    dout = rng.standard_normal(out.shape, dtype=np.float32)
    flops = 4 * args.heads * args.seq**2 * args.dim * (2.5 if args.which == "backward" else 1)
    a = rng.standard_normal((2048, 2048), dtype=np.float32)
    original = exact.tile_shape
    rates: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for rows, keys in SHAPES[args.which, args.dim]:

            def shape(width, backward=False, tile=(rows, keys)):
                return tile if backward == (args.which == "backward") else original(width, backward)

            exact.tile_shape = shape
            try:
                if args.which == "forward":
                    seconds = best(lambda: nsa.attention(q, k, v))
                else:
                    seconds = best(lambda: nsa.attention_backward(dout, q, k, v, out, lse))
            finally:
                exact.tile_shape = original
            rates.setdefault(f"{rows} x {keys}", []).append(flops / seconds / 1e9)
        rates.setdefault("GEMM 2048^2", []).append(2 * 2048**3 / best(lambda: a @ a) / 1e9)
    print(describe_cpu())
    print(f"{args.which}, B1 H{args.heads} L{args.seq} D{args.dim} float32: GFLOP/s, best of {args.rounds} rounds")
    for name, values in rates.items():
        print(f"  {name:>12}: {max(values):6.1f}   (rounds: {' '.join(f'{r:.0f}' for r in values)})")


if __name__ == "__main__":
    main()
