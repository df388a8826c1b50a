"""Canonical problems and the kernel contract every backend module implements.

A public function validates its arguments into a *problem* (canonical arrays
plus options, nothing computed yet), the registry (:mod:`npsparseattn._dispatch`)
chooses a backend module for it, the public layer converts the arrays to what
that module reads (:mod:`npsparseattn._glue`) and calls the module's kernels.

**The contract.** A backend module implements one operation and declares,
next to its kernels:

``KINDS``
    array kinds it reads (``"numpy"``, ``"cupy"``);
``DTYPES``
    input dtype names it accepts;
``TOLERANCE``
    its relative error against the float64 reference, per input dtype name;
``unsupported(problem) -> list[str]``
    reasons it cannot take a problem beyond kind and dtype (a missing package
    or GPU, a head dimension it has no instance for); empty when it can;
``compute_dtype(dtype) -> numpy.dtype``
    the dtype its kernels read for inputs of ``dtype``
    (:func:`~npsparseattn._dtypes.compute_dtype` is the usual rule);
``SCORE_MODS`` (optional)
    the score modifications its ``attention`` kernels apply, named as in
    :data:`npsparseattn.problems.scores.FEATURES`; the registry never gives
    a module a problem with a modification it does not list;
``STRIDED_ROWS``
    ``True`` if it reads arrays whose last axis has unit stride and whose
    other strides are arbitrary (non-negative, non-overlapping rows);
    ``False`` if it needs C-contiguous arrays.

and the kernels of its operation, on canonical arrays already in the compute
dtype; the visibility rule is explicit: query ``i`` sees key ``j`` iff
``i + offset - left <= j <= i + offset + right`` (``None``: unbounded), and
outputs are returned in the compute dtype (``lse`` float32, float64 for
float64) or written into the optional buffers:

==========================  ==================================================================
operation                   kernels
==========================  ==================================================================
``attention``               ``forward(q, k, v, *, scale, offset, left, right, out=None, lse=None)
                            -> (out, lse)``; ``backward(dout, q, k, v, out, lse, *, scale, offset,
                            left, right, grads=None) -> (dq, dk, dv)``
                            With score modifications (``SCORE_MODS`` below) ``forward`` and
                            ``backward`` also get ``mods`` (a
                            :class:`~npsparseattn.problems.scores.ScoreMods`), and ``backward``
                            with a bias a zero (B, Hq, Lq, Lk) ``dbias`` buffer that it fills with
                            the gradient of the biased score of every visible pair
``block_sparse_attention``  the same with ``layout`` (a :class:`~npsparseattn.layouts.BlockLayout`)
                            after ``v``
``lsh_buckets``             ``buckets(x, rotations, factors) -> int32 (M, n_hashes, L)``
``lsh_sort``                ``sort(buckets, n_values) -> (order, inverse)``, int32 (M, n_hashes * L)
``lsh_attention``           ``forward(qk, v, order, inverse, *, chunk_size, chunks_before,
                            chunks_after, causal, exclude_self, out=None, lse=None)``;
                            ``backward(dout, qk, v, out, lse, order, inverse, *, ..., grads=None)
                            -> (dqk, dv)``
``attention_varlen``        ``forward(q, k, v, cu_seqlens_q, cu_seqlens_k, *, scale, left, right,
                            out=None, lse=None) -> (out, lse)``; ``backward(dout, q, k, v, out, lse,
                            cu_seqlens_q, cu_seqlens_k, *, scale, left, right, grads=None)
                            -> (dq, dk, dv)``; packed (H, total, X) arrays, int32 offsets
                            (n_seqs + 1,), sequence ``s`` offset ``Lk_s - Lq_s``
``attention_with_kvcache``  ``forward(q, k_cache, v_cache, seqlens, block_table, *, scale, left,
                            right, out=None, lse=None) -> (out, lse)``; caches as pages
                            (P, Hk, page_size, D|Dv) (a contiguous cache is one page per
                            sequence), int32 ``seqlens`` (B,) keys to attend (new tokens
                            already written), int32 ``block_table`` (B, max_pages); sequence
                            ``b`` offset ``seqlens[b] - Lq``
``sparse_attention``        ``forward(q, k, v, kv_idx, kv_cnt, *, q_block, kv_block, scale, offset,
                            left, right, out=None, lse=None) -> (out, lse)``;
                            ``backward(dout, q, k, v, out, lse, kv_idx, kv_cnt, *, q_block,
                            kv_block, scale, offset, left, right, grads=None) -> (dq, dk, dv)``;
                            the canonical index: int32 ``kv_idx`` (B, Hk, ceil(Lq / q_block), K),
                            each list's ``kv_cnt`` key blocks ascending and unique first, ``-1``
                            after; int32 ``kv_cnt`` (B, Hk, nqb); query head ``h`` reads list
                            ``h // (Hq // Hk)``; query ``i`` sees key ``j`` iff block ``j //
                            kv_block`` is listed for block ``i // q_block`` and the visibility
                            rule holds.  The backward must be deterministic: dK/dV through the
                            transposed index (the query blocks that listed each key block),
                            without atomics
``sparse_attention_varlen`` ``forward(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_idx, kv_cnt, *,
                            q_block, kv_block, scale, left, right, out=None, lse=None)``;
                            ``backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                            kv_idx, kv_cnt, *, ..., grads=None)``: packed (H, total, X) arrays;
                            ``kv_idx`` (Hk, NQB, K), the lists of sequence ``s`` from
                            ``sum_{t<s} ceil(Lq_t / q_block)``, indices counted from the
                            sequence's first key; sequence ``s`` offset ``Lk_s - Lq_s``
==========================  ==================================================================

Shapes: ``q`` (B, Hq, Lq, D), ``k`` (B, Hk, Lk, D), ``v`` (B, Hk, Lk, Dv),
``out``/``dout`` (B, Hq, Lq, Dv), ``lse`` (B, Hq, Lq); dk/dv are summed over
each group of ``Hq // Hk`` query heads.  ``ring_attention`` runs the
``attention`` kernels block by block.
"""

from __future__ import annotations

from npsparseattn._dtypes import FLOAT_DTYPES, compute_dtype, lse_dtype
from npsparseattn.problems.attention import AttentionProblem, Gradients, attention_problem, gradient_inputs, output_like
from npsparseattn.problems.block_sparse import check_layout
from npsparseattn.problems.kvcache import KVCacheProblem, kvcache_problem
from npsparseattn.problems.lsh import (
    BucketsProblem,
    LSHProblem,
    SortProblem,
    buckets_problem,
    lsh_problem,
    lsh_rotations,
    sort_problem,
)
from npsparseattn.problems.sparse import SparseProblem, SparseVarlenProblem, sparse_problem, sparse_varlen_problem
from npsparseattn.problems.varlen import VarlenGradients, VarlenProblem, varlen_gradient_inputs, varlen_problem

__all__ = [
    "FLOAT_DTYPES",
    "AttentionProblem",
    "BucketsProblem",
    "Gradients",
    "KVCacheProblem",
    "LSHProblem",
    "SortProblem",
    "SparseProblem",
    "SparseVarlenProblem",
    "VarlenGradients",
    "VarlenProblem",
    "attention_problem",
    "buckets_problem",
    "check_layout",
    "compute_dtype",
    "gradient_inputs",
    "kvcache_problem",
    "lse_dtype",
    "lsh_problem",
    "lsh_rotations",
    "output_like",
    "sort_problem",
    "sparse_problem",
    "sparse_varlen_problem",
    "varlen_gradient_inputs",
    "varlen_problem",
]
