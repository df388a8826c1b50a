"""Cost of the score modifications in the CPU kernels, relative to plain attention measured side by side.

    NUMBA_NUM_THREADS=2 python tools/scores_bench.py --seq 2048 --dim 64

Each round times, in turn (interleaved), plain attention and the same call with each
modification (ALiBi + softcap, a (B, 1, 1, Lk) padding bias, a numba
``score_mod`` with its derivative, a ``mask_mod``), forward and backward;
the best of the rounds is printed as time relative to plain.  The table in
``docs/benchmarks/scores.md``.
"""

from __future__ import annotations

import argparse

import numba
import numpy as np

import npsparseattn as nsa
from npsparseattn.bench.common import interleaved_best
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
    shape_line = f"B1 H{args.heads} L{args.seq} D{args.dim} float32 causal"
    print(f"{shape_line}, best of {args.rounds} interleaved rounds, time / plain")
    _table(cases, lambda kw: nsa.attention(q, k, v, causal=True, return_lse=True, **kw),
           lambda kw, o, s: nsa.attention_backward(dout, q, k, v, o, s, causal=True, **kw), args.rounds)  # fmt: skip
    if args.seq == len(DOCS):
        mask_mod_layout(q, k, v, dout, args.rounds)


def mask_mod_layout(q, k, v, dout, rounds: int) -> None:
    """A from_mask_mod layout run with its mask_mod against the same blocks as a plain layout, causal."""
    lay = nsa.layouts.from_mask_mod(document_causal, len(DOCS), 64)
    plain = nsa.layouts.BlockLayout(lay.indptr, lay.indices, lay.block, lay.seq, lay.heads)
    runs = {
        "plain CSR, causal=True": {"layout": plain, "causal": True},
        "mask_mod layout + mask_mod": {"layout": lay, "mask_mod": document_causal},
    }
    print(f"\nblock-sparse, {lay!r}, time / plain CSR")
    _table(runs, lambda kw: nsa.block_sparse_attention(q, k, v, return_lse=True, **kw),
           lambda kw, o, s: nsa.block_sparse_attention_backward(dout, q, k, v, o, s, **kw), rounds)  # fmt: skip


def _table(cases: dict, forward, backward, rounds: int) -> None:
    """Forward and backward of every case (keywords without ``score_mod_grad`` for the forward), interleaved."""
    fwd = {name: {key: val for key, val in kw.items() if key != "score_mod_grad"} for name, kw in cases.items()}
    results = {name: forward(fwd[name]) for name in cases}  # compiles each case's kernels
    t_fwd = interleaved_best({name: (lambda kw=kw: forward(kw)) for name, kw in fwd.items()}, rounds)
    t_bwd = interleaved_best(
        {name: (lambda kw=kw, r=results[name]: backward(kw, *r)) for name, kw in cases.items()}, rounds
    )
    base = next(iter(cases))
    print("| case | forward | backward |")
    print("|---|---|---|")
    for name in cases:
        print(f"| {name} | {t_fwd[name] / t_fwd[base]:.2f} | {t_bwd[name] / t_bwd[base]:.2f} |")
