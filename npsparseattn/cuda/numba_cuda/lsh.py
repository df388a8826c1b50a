"""Reformer LSH attention on the GPU (numba-cuda), forward and backward: backend ``"numba-cuda"`` of ``lsh_attention``.

The sort plan (``order``, ``inverse``) comes from the same backend's
``lsh_buckets`` and ``lsh_sort`` (:mod:`npsparseattn.cuda.numba_cuda.lsh_hash`,
:mod:`npsparseattn.cuda.numba_cuda.lsh_sort`); the kernels are in
:mod:`npsparseattn.cuda.numba_cuda.lsh_kernels`.

Forward: the key normalisation per position, then one block per (chunk tile,
head, batch) computes every sorted slot's round output with the online
softmax over its window (rows gathered through the plan), then one thread per
output element combines each position's rounds.  Extra memory: the rounds'
outputs, float32 (B, H, n_hashes * L, Dv), and two floats per slot.

Backward: the rounds are combined by their sums, so the output is one softmax
over all rounds' window entries with ``P = 2^(x - M) / sum`` (``M`` the
largest base-2 row maximum of the position).  A statistics pass recomputes
the rows' maxima and sums (no outputs), then the query side (``dq`` per slot)
and the key side (``dk``, ``dv`` per slot, one block per key tile walking the
chunks whose windows hold it) run as separate passes that own their slots,
so no atomics and the same result on every run; a last pass sums every
position's rounds and applies the Jacobian of the key normalisation.  Extra
memory: float32 (B, H, n_hashes * L, 2 D + Dv).

Takes what the backend takes (:mod:`npsparseattn.cuda.numba_cuda`: dtypes,
devices, head dimensions up to 128), with the same tolerances.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from npsparseattn.cuda.numba_cuda import DTYPES, KINDS, STRIDED_ROWS, TOLERANCE, compute_dtype, unsupported
from npsparseattn.cuda.numba_cuda import lsh_kernels as kernels
from npsparseattn.cuda.numba_cuda.runtime import (
    blocks,
    empty,
    is_bf16,
    kernel_view,
    launch,
    on_device,
    threads_per_block,
)
from npsparseattn.cuda.numba_cuda.tiles import tiles

__all__ = ["DTYPES", "KINDS", "STRIDED_ROWS", "TOLERANCE", "backward", "compute_dtype", "forward", "unsupported"]


def _key_scale(qk: Any) -> Any:
    """float32 (B, H, L): ``1 / sqrt(mean(qk^2) + 1e-6) / sqrt(D)`` per position."""
    n_batch, n_heads, length, _ = qk.shape
    scale = empty(qk, (n_batch, n_heads, length), np.float32)
    threads = threads_per_block(128)
    launch(kernels.key_scale_kernel(is_bf16(qk)), blocks(scale.size, threads), threads, kernel_view(qk), scale)
    return scale


def _rounds(qk: Any, v: Any, order: Any, kscale: Any, options: tuple, with_output: bool) -> tuple[Any, Any, Any]:
    """Every slot's base-2 row maximum and sum (B, H, N) and, ``with_output``, its round output (B, H, N, Dv)."""
    n_batch, n_heads, _, d = qk.shape
    dv = v.shape[3]
    n_items = order.shape[2]
    chunk = options[0]
    rounds_shape = (n_batch, n_heads, n_items, dv) if with_output else (1, 1, 1, 1)
    rounds = empty(qk, rounds_shape, np.float32)
    rmax = empty(qk, (n_batch, n_heads, n_items), np.float32)
    rsum = empty(qk, (n_batch, n_heads, n_items), np.float32)
    t = tiles("forward", max(d, dv))
    n_sub = blocks(chunk, t.rows)
    grid = n_items // chunk * n_sub * n_batch * n_heads
    launch(
        kernels.forward_kernel(t, is_bf16(qk)), grid, t.threads, kernel_view(qk), kernel_view(v), order, kscale,
        *options, n_sub, with_output, rounds, rmax, rsum,
    )  # fmt: skip
    return rounds, rmax, rsum


def forward(
    qk: Any,
    v: Any,
    order: Any,
    inverse: Any,
    *,
    chunk_size: int,
    chunks_before: int,
    chunks_after: int,
    causal: bool,
    exclude_self: bool,
    out: Any = None,
    lse: Any = None,
) -> tuple[Any, Any]:
    """LSH attention forward on canonical 4-D arrays.

    Parameters
    ----------
    qk : (B, H, L, D), v : (B, H, L, Dv)
        C-contiguous CuPy arrays (NumPy under the simulator), one dtype
        (float16, bfloat16 or float32); ``L % chunk_size == 0``.
    order, inverse : (B, H, n_hashes * L) int32 arrays of the same kind
        The sort plan (``lsh_sort`` of the buckets of ``qk``).
    chunk_size, chunks_before, chunks_after, causal, exclude_self
        As for :func:`npsparseattn.lsh.lsh_attention`.
    out, lse : arrays, optional
        Buffers (B, H, L, Dv) in the input dtype and (B, H, L) float32.

    Returns
    -------
    out : (B, H, L, Dv) in the input dtype, lse : (B, H, L) float32.
    """
    n_batch, n_heads, length, _ = qk.shape
    dv = v.shape[3]
    with on_device(qk):
        out = empty(qk, (n_batch, n_heads, length, dv), qk.dtype) if out is None else out
        lse = empty(qk, (n_batch, n_heads, length), np.float32) if lse is None else lse
        if out.size == 0 and lse.size == 0:
            return out, lse
        n_hashes = order.shape[2] // length
        options = (chunk_size, chunks_before, chunks_after, bool(causal), bool(exclude_self))
        rounds, rmax, rsum = _rounds(qk, v, order, _key_scale(qk), options, True)
        threads = threads_per_block(128)
        launch(
            kernels.combine_kernel(is_bf16(qk)), blocks(out.size, threads), threads, rounds, rmax, rsum, inverse,
            n_hashes, kernel_view(out), lse,
        )  # fmt: skip
    return out, lse


def backward(
    dout: Any,
    qk: Any,
    v: Any,
    out: Any,
    lse: Any,
    order: Any,
    inverse: Any,
    *,
    chunk_size: int,
    chunks_before: int,
    chunks_after: int,
    causal: bool,
    exclude_self: bool,
    grads: tuple[Any, Any] | None = None,
) -> tuple[Any, Any]:
    """LSH attention backward on canonical 4-D arrays.

    ``dout`` and ``out`` are (B, H, L, Dv) in the dtype of ``qk``, ``lse``
    (B, H, L) the forward's (not read: the rows' maxima and sums are
    recomputed, see the module docstring); the other arguments are those of
    :func:`forward`.  ``grads`` optionally gives the ``(dqk, dv)`` buffers.
    Returns ``(dqk, dv)`` shaped like ``qk`` and ``v``.
    """
    n_batch, n_heads, length, d = qk.shape
    dv = v.shape[3]
    with on_device(qk):
        if grads is None:
            grads = (empty(qk, qk.shape, qk.dtype), empty(qk, v.shape, qk.dtype))
        dqk, dv_out = grads
        if dqk.size == 0 and dv_out.size == 0:
            return dqk, dv_out
        n_items = order.shape[2]
        n_hashes = n_items // length
        bf16 = is_bf16(qk)
        options = (chunk_size, chunks_before, chunks_after, bool(causal), bool(exclude_self))
        kscale = _key_scale(qk)
        dout_s, qk_s, v_s, out_s = (kernel_view(x) for x in (dout, qk, v, out))
        _, rmax, rsum = _rounds(qk, v, order, kscale, options, False)
        per_position = [empty(qk, (n_batch, n_heads, length), np.float32) for _ in range(3)]
        threads = threads_per_block(128)
        launch(
            kernels.row_stats_kernel(bf16), blocks(n_batch * n_heads * length, threads), threads, rmax, rsum,
            inverse, n_hashes, dout_s, out_s, *per_position,
        )  # fmt: skip
        dq_s = empty(qk, (n_batch, n_heads, n_items, d), np.float32)
        dk_s = empty(qk, (n_batch, n_heads, n_items, d), np.float32)
        dv_s = empty(qk, (n_batch, n_heads, n_items, dv), np.float32)
        sides = ((kernels.dq_kernel, "dq", (dq_s,)), (kernels.dkdv_kernel, "dkdv", (dk_s, dv_s)))
        for factory, family, results in sides:
            t = tiles(family, max(d, dv))
            n_sub = blocks(chunk_size, t.rows)
            grid = n_items // chunk_size * n_sub * n_batch * n_heads
            launch(
                factory(t, bf16), grid, t.threads, dout_s, qk_s, v_s, order, kscale, *per_position, *options, n_sub,
                *results,
            )  # fmt: skip
        launch(
            kernels.gather_kernel(bf16), blocks(n_batch * n_heads * length, threads), threads, qk_s, inverse,
            n_hashes, dq_s, dk_s, dv_s, kernel_view(dqk), kernel_view(dv_out),
        )  # fmt: skip
    return dqk, dv_out
