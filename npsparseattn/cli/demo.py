"""``npsparseattn demo``: the whole toolkit on built-in random data, every figure measured in the run.

1. Dense NumPy attention versus tiled attention at a moderate length: time,
   peak extra memory, and the error of each against the float64 reference.
2. Causal attention with grouped-query heads, forward and backward, checked
   against the reference.
3. Block-sparse attention: a Longformer layout drawn in the terminal, then a
   causal sliding window at a long length against dense tiled attention:
   speed-up, density, error against the reference.
4. LSH attention (Reformer) against dense tiled attention at the same length:
   speed-up, and its error against its own float64 reference.
5. Ring attention over two MPI ranks (``mpiexec``, from the ``mpich``
   wheel): the one-line launch and what it prints.
6. Inference: a packed batch of sequences of different lengths
   (``attention_varlen``) against padding, a paged KV cache filled by a
   prompt and then decoded token by token (``attention_with_kvcache``), and
   a shared prefix merged with each sequence's own keys (``merge_states``),
   each checked against the float64 reference.
7. A sequence length at which textbook dense NumPy attention would need more
   memory than this machine has, run with tiled attention in O(L) memory.

Everything but the first run's compilation takes about a minute on a 2-core
machine; ``--skip-long`` leaves out part 7.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from npsparseattn import layouts, reference
from npsparseattn.bench.attention import total_memory
from npsparseattn.bench.common import (
    attention_flops,
    best_time,
    dense_numpy_attention,
    dense_numpy_bytes,
    format_bytes,
    format_table,
)
from npsparseattn.bench.memory import measure_peak
from npsparseattn.block_sparse import block_sparse_attention
from npsparseattn.cli._text import positive_int
from npsparseattn.exact import attention, attention_backward
from npsparseattn.kvcache import attention_with_kvcache
from npsparseattn.lsh import lsh_attention
from npsparseattn.merge import merge_states
from npsparseattn.varlen import attention_varlen

SPARSE_UNIT = 64  # the LSH chunk and the block-sparse block of parts 3 and 4
SPARSE_MIN = 256  # their warm-up runs at this length


def sparse_length(text: str) -> int:
    """An argparse type: a length for parts 3 and 4, a multiple of 64 of at least 256."""
    value = positive_int(text)
    if value < SPARSE_MIN or value % SPARSE_UNIT:
        raise argparse.ArgumentTypeError(
            f"must be a multiple of {SPARSE_UNIT} (the LSH chunk) of at least {SPARSE_MIN}, got {value}"
        )
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``demo``."""
    parser.add_argument("--seq", type=positive_int, default=2048, help="length for the dense-vs-tiled comparison")
    parser.add_argument(
        "--sparse-seq",
        type=sparse_length,
        default=16384,
        help="length of the block-sparse and LSH comparisons with dense tiled attention, a multiple of 64 of at "
        "least 256 (default 16384)",
    )
    parser.add_argument(
        "--long-seq",
        type=positive_int,
        default=None,
        help="length of the beyond-memory run (default: smallest power of two where dense NumPy "
        "would exceed this machine's memory)",
    )
    parser.add_argument("--skip-long", action="store_true", help="skip the beyond-memory run")


def _rel(a, b) -> float:
    """max |a - b| / max |b| (0 for empty arrays)."""
    b = np.asarray(b, np.float64)
    if b.size == 0:
        return 0.0
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(float(np.abs(b).max()), 1e-300))


def _section(title: str) -> None:
    print(f"\n== {title} ==")


def compare_dense_and_tiled(seq: int, heads: int = 4, dim: int = 64) -> None:
    """Part 1: the same problem through dense NumPy and through tiled attention."""
    _section(f"1. dense NumPy vs tiled attention: B=1 H={heads} L={seq} D={dim} float32, causal")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, heads, seq, dim)).astype(np.float32) for _ in range(3))
    ref, _ = reference.attention(q, k, v, causal=True)
    rows = []
    for name, fn in (
        ("dense NumPy", lambda: dense_numpy_attention(q, k, v, causal=True)),
        ("tiled (numba)", lambda: attention(q, k, v, causal=True)),
    ):
        out, peak = measure_peak(fn)
        seconds = best_time(fn, repeat=3, warmup=0)
        gflops = attention_flops(1, heads, seq, seq, dim, causal=True) / seconds / 1e9
        rows.append(
            [name, f"{seconds * 1e3:.1f}", f"{gflops:.1f}", format_bytes(peak.extra_bytes), f"{_rel(out, ref):.1e}"]
        )
    print(format_table(["method", "time ms", "GFLOP/s", "peak extra mem", "rel err vs float64"], rows))


def gqa_forward_backward(seq: int = 1000) -> None:
    """Part 2: causal GQA forward and backward against the float64 reference."""
    _section(f"2. causal grouped-query attention (8 query heads, 2 KV heads), L={seq}, float64")
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 8, seq, 64))
    k = rng.standard_normal((2, 2, seq, 64))
    v = rng.standard_normal((2, 2, seq, 48))
    start = time.perf_counter()
    out, lse = attention(q, k, v, causal=True, return_lse=True)
    dout = rng.standard_normal(out.shape)
    grads = attention_backward(dout, q, k, v, out, lse, causal=True)
    elapsed = time.perf_counter() - start
    ref_out, ref_lse = reference.attention(q, k, v, causal=True)
    ref_grads = reference.attention_backward(dout, q, k, v, causal=True)
    errors = [_rel(out, ref_out), _rel(lse, ref_lse)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
    print(f"forward + backward in {elapsed * 1e3:.0f} ms; relative error vs reference:")
    print("  " + ", ".join(f"{n} {e:.1e}" for n, e in zip(["out", "lse", "dq", "dk", "dv"], errors)))


def block_sparse_speedup(seq: int, heads: int = 4, dim: int = 64, window: int = 512, block: int = 64) -> float:
    """Part 3: a layout in the terminal, then a causal sliding window against dense tiled attention at ``seq``.

    Returns the dense tiled time (seconds), which part 4 compares with.
    """
    _section("3. block-sparse attention")
    small = layouts.longformer(1024, 64, 128, global_blocks=[0])
    print("a Longformer layout (window of 128 tokens, global block 0), L=1024, 64-token blocks:")
    print(small.to_ascii(width=16))
    layout = layouts.sliding_window(seq, block, (window, 0))
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, heads, seq, dim), dtype=np.float32) for _ in range(3))
    kw = dict(causal=True, window=(window, 0))
    block_sparse_attention(
        q[..., :256, :], k[..., :256, :], v[..., :256, :], layouts.sliding_window(256, block, (window, 0)), **kw
    )
    dense_s = best_time(lambda: attention(q, k, v, causal=True), repeat=2, warmup=0)
    out = block_sparse_attention(q, k, v, layout, **kw)
    sparse_s = best_time(lambda: block_sparse_attention(q, k, v, layout, **kw), repeat=3, warmup=0)
    rows = 128
    ref, _ = reference.attention(q[..., -rows:, :], k, v, **kw)
    print(
        f"causal sliding window of {window} tokens, B=1 H={heads} L={seq} D={dim} float32, {block}-token blocks: "
        f"{layout.density:.1%} of the blocks stored"
    )
    err = _rel(out[..., -rows:, :], ref)
    print(
        f"  dense tiled attention {dense_s * 1e3:.0f} ms, block-sparse {sparse_s * 1e3:.0f} ms: "
        f"{dense_s / sparse_s:.1f}x faster; rel err of the last {rows} rows vs float64 {err:.1e}"
    )
    return dense_s


def lsh_speedup(seq: int, dense_s: float, heads: int = 4, dim: int = 64, chunk: int = 64) -> None:
    """Part 4: Reformer LSH attention against dense tiled causal attention at ``seq``, and its own error."""
    _section("4. LSH attention (Reformer, shared query/key)")
    rng = np.random.default_rng(5)
    qk, v = (rng.standard_normal((1, heads, seq, dim), dtype=np.float32) for _ in range(2))
    kw = dict(n_buckets=max(2, seq // chunk // 2 * 2), n_hashes=2, chunk_size=chunk, causal=True, seed=0)
    lsh_attention(qk[..., : 4 * chunk, :], v[..., : 4 * chunk, :], **{**kw, "n_buckets": 4})
    lsh_s = best_time(lambda: lsh_attention(qk, v, **kw), repeat=3, warmup=0)
    small = dict(kw, n_buckets=16)
    qk_s, v_s = qk[:, :1, :1024], v[:, :1, :1024]
    err = _rel(lsh_attention(qk_s, v_s, **small), reference.lsh_attention(qk_s, v_s, **small)[0])
    print(
        f"B=1 H={heads} L={seq} D={dim} float32, {kw['n_buckets']} buckets, 2 hashing rounds, {chunk}-item chunks, "
        f"causal: each query attends {2 * chunk} sorted items per round"
    )
    print(
        f"  dense tiled causal attention {dense_s * 1e3:.0f} ms, LSH {lsh_s * 1e3:.0f} ms: {dense_s / lsh_s:.1f}x "
        f"faster; rel err vs its float64 reference (L=1024, one head) {err:.1e}"
    )
    print("  (LSH approximates attention: a query sees the keys hashed near it, not all of them)")


def ring_over_mpi(seq: int = 4096) -> None:
    """Part 5: the ring example over two MPI ranks, launched as a user would."""
    _section("5. ring attention over MPI ranks")
    mpiexec = Path(sys.executable).with_name("mpiexec")
    command = [str(mpiexec), "-n", "2", sys.executable, "-m", "npsparseattn.examples.ring", "--seq", str(seq)]
    print("$ mpiexec -n 2 python -m npsparseattn.examples.ring --seq " + str(seq))
    if not mpiexec.exists() and shutil.which("mpiexec") is None:
        print("  (no mpiexec next to this python: pip install 'npsparseattn[mpi]' brings mpi4py and the mpich wheel)")
        return
    if not mpiexec.exists():
        command[0] = shutil.which("mpiexec")
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        print("  (the ring did not finish within 120 s; run the command above to see why)")
        return
    lines = (result.stdout + result.stderr).strip().splitlines()
    print("\n".join("  " + line for line in lines[-6:]))


def inference(heads: int = 8, kv_heads: int = 2, dim: int = 64) -> None:
    """Part 6: packed varlen batches, a paged KV cache filled and decoded, a shared prefix merged."""
    _section("6. inference: packed sequences, a paged KV cache, merging a shared prefix")
    rng = np.random.default_rng(6)

    def draw(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    lengths = np.array([1024, 37, 512, 1, 300, 0, 777, 64])
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    q, k, v = draw(heads, int(cu[-1]), dim), draw(kv_heads, int(cu[-1]), dim), draw(kv_heads, int(cu[-1]), dim)
    out = attention_varlen(q, k, v, cu, cu, causal=True)
    pad_q, pad_k, pad_v = (np.zeros((len(lengths), x.shape[0], int(lengths.max()), dim), np.float32) for x in (q, k, v))
    for s, (a, b) in enumerate(itertools.pairwise(cu)):  # left-aligned; rows past a sequence's end are padding
        pad_q[s, :, : b - a], pad_k[s, :, : b - a], pad_v[s, :, : b - a] = q[:, a:b], k[:, a:b], v[:, a:b]
    varlen_s = best_time(lambda: attention_varlen(q, k, v, cu, cu, causal=True), repeat=2, warmup=0)
    padded_s = best_time(lambda: attention(pad_q, pad_k, pad_v, causal=True), repeat=2, warmup=0)
    s = 6  # the longest sequence but one, against its own float64 reference
    ref, _ = reference.attention(q[:, cu[s] : cu[s + 1]], k[:, cu[s] : cu[s + 1]], v[:, cu[s] : cu[s + 1]], causal=True)
    print(
        f"varlen: {len(lengths)} causal sequences of {lengths.min()} to {lengths.max()} tokens ({cu[-1]} in all), "
        f"Hq={heads} Hk={kv_heads} D={dim} float32: packed {varlen_s * 1e3:.1f} ms, padded to the longest "
        f"{padded_s * 1e3:.1f} ms ({padded_s / varlen_s:.1f}x); rel err of sequence {s} vs float64 "
        f"{_rel(out[:, cu[s] : cu[s + 1]], ref):.1e}"
    )

    batch, page_size, n_pages, prompt, steps = 4, 64, 64, 300, 32
    k_pages, v_pages = np.zeros((2, n_pages, kv_heads, page_size, dim), np.float32)
    table = rng.permutation(n_pages)[: batch * 8].reshape(batch, 8).astype(np.int32)  # 8 pages = 512 tokens each
    lengths = np.zeros(batch, np.int32)
    keys, values = [], []
    kw = dict(block_table=table)
    new_k, new_v = draw(batch, kv_heads, prompt, dim), draw(batch, kv_heads, prompt, dim)
    start = time.perf_counter()
    attention_with_kvcache(draw(batch, heads, prompt, dim), k_pages, v_pages, cache_seqlens=lengths, k_new=new_k,
                           v_new=new_v, **kw)  # fmt: skip
    prefill_s = time.perf_counter() - start
    keys.append(new_k)
    values.append(new_v)
    lengths += prompt
    start = time.perf_counter()
    for _ in range(steps):
        q_step, new_k, new_v = draw(batch, heads, 1, dim), draw(batch, kv_heads, 1, dim), draw(batch, kv_heads, 1, dim)
        out = attention_with_kvcache(q_step, k_pages, v_pages, cache_seqlens=lengths, k_new=new_k, v_new=new_v, **kw)
        keys.append(new_k)
        values.append(new_v)
        lengths += 1
    decode_s = (time.perf_counter() - start) / steps
    ref, _ = reference.attention(q_step, np.concatenate(keys, axis=2), np.concatenate(values, axis=2), causal=True)
    print(
        f"KV cache: {batch} sequences in {page_size}-token pages scattered over a pool of {n_pages}; a {prompt}-token "
        f"prompt written and attended in {prefill_s * 1e3:.1f} ms, then {steps} decoding steps of "
        f"{decode_s * 1e3:.2f} ms each; rel err of the last step vs float64 {_rel(out, ref):.1e}"
    )

    prefix_k, prefix_v = draw(kv_heads, 4096, dim), draw(kv_heads, 4096, dim)
    own_k, own_v = draw(kv_heads, 100, dim), draw(kv_heads, 100, dim)
    q_one = draw(heads, 1, dim)
    merged, _ = merge_states(
        *attention(q_one, prefix_k, prefix_v, return_lse=True), *attention(q_one, own_k, own_v, return_lse=True)
    )
    ref, _ = reference.attention(q_one, np.concatenate([prefix_k, own_k], 1), np.concatenate([prefix_v, own_v], 1))
    print(
        f"merge_states: attention over a shared 4096-token prefix merged with a sequence's own 100 keys; "
        f"rel err vs float64 attention over all 4196 keys {_rel(merged, ref):.1e}"
    )


def beyond_memory(seq: int | None) -> None:
    """Part 7: a length where dense NumPy cannot run here, done tiled."""
    memory = total_memory()
    if seq is None:
        seq = 4096
        while dense_numpy_bytes(1, seq, seq) <= memory:
            seq *= 2
    need = dense_numpy_bytes(1, seq, seq)
    _section(f"7. beyond dense memory: H=1 L={seq} D=64 float32, causal")
    print(f"machine memory {format_bytes(memory)}; dense NumPy attention would hold {format_bytes(need)}")
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 1, seq, 64), dtype=np.float32) for _ in range(3))
    start = time.perf_counter()
    (out, lse), peak = measure_peak(lambda: attention(q, k, v, causal=True, return_lse=True))
    elapsed = time.perf_counter() - start
    rows = min(seq, 128)
    ref, _ = reference.attention(q[..., -rows:, :], k, v, causal=True)
    gflops = attention_flops(1, 1, seq, seq, 64, causal=True) / elapsed / 1e9
    extra = max(peak.extra_bytes - out.nbytes - lse.nbytes, 0)
    print(
        f"tiled attention: {elapsed:.1f} s ({gflops:.0f} GFLOP/s); peak memory beyond inputs "
        f"({format_bytes(3 * q.nbytes)}) and output ({format_bytes(out.nbytes + lse.nbytes)}): {format_bytes(extra)}; "
        f"rel err of the last {rows} rows vs float64: {_rel(out[..., -rows:, :], ref):.1e}"
    )


def run(args: argparse.Namespace) -> None:
    """The demo, in seven parts."""
    print("npsparseattn demo: exact, block-sparse, LSH, ring and inference attention on NumPy arrays")
    warm = np.random.default_rng(3).standard_normal((1, 300, 64)).astype(np.float32)
    start = time.perf_counter()
    attention(warm, warm, warm)
    attention(warm.astype(np.float64), warm.astype(np.float64), warm.astype(np.float64))
    print(
        f"(kernels ready in {time.perf_counter() - start:.1f} s; the first run compiles them, later runs load a cache)"
    )
    compare_dense_and_tiled(args.seq)
    gqa_forward_backward()
    dense_s = block_sparse_speedup(args.sparse_seq)
    lsh_speedup(args.sparse_seq, dense_s)
    ring_over_mpi()
    inference()
    if not args.skip_long:
        beyond_memory(args.long_seq)
