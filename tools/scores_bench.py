"""Cost of the score modifications in the CPU kernels, relative to plain attention measured side by side.

    NUMBA_NUM_THREADS=2 python tools/scores_bench.py --seq 2048 --dim 64

Each round times, in turn, plain attention and the same call with each
modification (ALiBi + softcap, a (B, 1, 1, Lk) padding bias, a numba
``score_mod`` with its derivative, a ``mask_mod``), forward and backward;
the best of the rounds is printed as time relative to plain.  The table in
``docs/benchmarks/scores.md``.
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np

import npsparseattn as nsa
from npsparseattn.bench.isa import describe_cpu


@numba.njit
def tempered(score, b, h, q_idx, kv_idx):
    return score * (0.75 + 0.125 * h)


@numba.njit
def tempered_grad(score, b, h, q_idx, kv_idx):
    return 0.75 + 0.125 * h


@numba.njit
def every_other_head_local(b, h, q_idx, kv_idx):
    return h % 2 == 0 or q_idx - kv_idx < 512


DOC_LENGTHS = (700, 300, 1100, 500, 900, 250, 346)  # 4096 tokens in 7 packed documents
DOCS = np.repeat(np.arange(len(DOC_LENGTHS)), DOC_LENGTHS)


@numba.njit
def document_causal(b, h, q_idx, kv_idx):
    return DOCS[q_idx] == DOCS[kv_idx] and kv_idx <= q_idx


def best(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=len(DOCS))
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (1, args.heads, args.seq, args.dim)
    q, k, v, dout = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
    pad = np.zeros((1, 1, 1, args.seq), np.float32)
    pad[..., -args.seq // 8 :] = -1e4
    cases = {
        "plain": {},
        "alibi + softcap": {"alibi_slopes": 2.0 ** -np.arange(1, args.heads + 1), "softcap": 30.0},
        "bias (1, 1, 1, Lk)": {"bias": pad},
        "score_mod": {"score_mod": tempered, "score_mod_grad": tempered_grad},
        "mask_mod": {"mask_mod": every_other_head_local},
    }
    print(describe_cpu())
    print(f"B1 H{args.heads} L{args.seq} D{args.dim} float32 causal, best of {args.rounds}, time / plain")
    print("| modification | forward | backward |")
    print("|---|---|---|")
    base = None
    for name, kw in cases.items():
        fwd = {key: val for key, val in kw.items() if key != "score_mod_grad"}
        out, lse = nsa.attention(q, k, v, causal=True, return_lse=True, **fwd)
        times = (
            best(lambda fwd=fwd: nsa.attention(q, k, v, causal=True, **fwd), args.rounds),
            best(
                lambda kw=kw, o=out, s=lse: nsa.attention_backward(dout, q, k, v, o, s, causal=True, **kw), args.rounds
            ),
        )
        base = times if base is None else base
        print(f"| {name} | {times[0] / base[0]:.2f} | {times[1] / base[1]:.2f} |")
    if args.seq == len(DOCS):
        mask_mod_layout(q, k, v, dout, args.rounds)


def mask_mod_layout(q, k, v, dout, rounds: int) -> None:
    """A from_mask_mod layout run with its mask_mod against the same blocks as a plain layout, causal."""
    lay = nsa.layouts.from_mask_mod(document_causal, len(DOCS), 64)
    plain = nsa.layouts.BlockLayout(lay.indptr, lay.indices, lay.block, lay.seq, lay.heads)
    runs = {
        "plain CSR, causal=True": (plain, {"causal": True}),
        "mask_mod layout + mask_mod": (lay, {"mask_mod": document_causal}),
    }
    print(f"\nblock-sparse, {lay!r}, time / plain CSR")
    print("| layout | forward | backward |")
    print("|---|---|---|")
    base = None
    for name, (layout, kw) in runs.items():
        out, lse = nsa.block_sparse_attention(q, k, v, layout, return_lse=True, **kw)
        times = (
            best(lambda la=layout, kw=kw: nsa.block_sparse_attention(q, k, v, la, **kw), rounds),
            best(
                lambda la=layout, kw=kw, o=out, s=lse: nsa.block_sparse_attention_backward(
                    dout, q, k, v, o, s, la, **kw
                ),
                rounds,
            ),
        )
        base = times if base is None else base
        print(f"| {name} | {times[0] / base[0]:.2f} | {times[1] / base[1]:.2f} |")


if __name__ == "__main__":
    main()
