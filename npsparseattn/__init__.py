"""npsparseattn: exact and sparse attention kernels for NumPy and CuPy arrays.

Public API
----------
attention, attention_backward
    Tiled exact attention (online softmax, O(L) memory), forward and backward.
block_sparse_attention, block_sparse_attention_backward
    Exact attention restricted to the blocks of a CSR layout, forward and backward.
lsh_attention, lsh_attention_backward, lsh_buckets, lsh_sort
    Reformer LSH attention (shared-QK, hashed into buckets, chunked), forward
    and backward, with the hashing and the sort plan exposed.
layouts
    BlockLayout and its builders (dense, causal, sliding_window, strided, fixed,
    longformer, bigbird, topk, from_* / to_scipy, union, intersect, stack).
context_parallel_attention, context_parallel_attention_backward
    Exact attention over a sequence sharded across MPI ranks or GPUs: ring,
    Ulysses (all-to-all over heads), hybrid and all-gather modes; packed
    documents, block-sparse layouts; communicators in ``npsparseattn.distributed``.
inspect
    How much of the dense attention a sparse selection keeps: coverage per
    query, mass maps per block, recall per head, a real q/k sample (module).
ring_attention, ring_attention_backward, shard, unshard
    The ring mode under its own name, and how to cut a sequence into shards.
attention_varlen, attention_varlen_backward
    Packed batches of sequences of different lengths (flash-attn's varlen).
attention_with_kvcache
    Decoding against a contiguous or paged KV cache, appending new tokens in
    place (flash-attn's ``flash_attn_with_kvcache``; flash-decoding splits).
sparse_attention, sparse_attention_backward, sparse_attention_varlen, sparse_attention_varlen_backward
    Index-driven sparse attention: each query block attends the key blocks
    (or tokens) a router listed for it, forward and backward (NSA, MoBA, DSA).
routing
    Routers that produce those lists: ``select_topk_blocks``,
    ``lightning_indexer`` (DSA), ``indexer_kl_target``, ``compressed_attention`` (NSA).
merge_states
    The exact merge of two partial attention results by their lse.
available_backends, register_backend, unregister_backend, BackendError
    The backend registry: which implementations exist for an operation, how
    to add one (a module per operation on the kernel contract of
    :mod:`npsparseattn.problems`) and remove it again, the error that
    explains a refusal.
reference
    Dense float64 oracle (module).

Every operation also accepts DLPack arrays (PyTorch tensors, JAX arrays) and
returns the caller's kind; ``npsparseattn.interop.torch`` and
``npsparseattn.interop.jax`` hold autograd/``custom_vjp`` adapters.

Importing the package imports no backend: the registry imports a backend's
module the first time it is chosen (so neither numba nor CuPy is loaded
until a kernel runs).
"""

from __future__ import annotations

from npsparseattn import inspect, layouts, reference, routing
from npsparseattn._dispatch import BackendError, available_backends, register_backend, unregister_backend
from npsparseattn.block_sparse import block_sparse_attention, block_sparse_attention_backward
from npsparseattn.context_parallel import context_parallel_attention, context_parallel_attention_backward
from npsparseattn.exact import attention, attention_backward
from npsparseattn.kvcache import attention_with_kvcache
from npsparseattn.lsh import lsh_attention, lsh_attention_backward, lsh_buckets, lsh_rotations, lsh_sort
from npsparseattn.merge import merge_states
from npsparseattn.ring import ring_attention, ring_attention_backward, shard, unshard
from npsparseattn.sparse import (
    sparse_attention,
    sparse_attention_backward,
    sparse_attention_varlen,
    sparse_attention_varlen_backward,
)
from npsparseattn.varlen import attention_varlen, attention_varlen_backward

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "__version__",
    "attention",
    "attention_backward",
    "attention_varlen",
    "attention_varlen_backward",
    "attention_with_kvcache",
    "available_backends",
    "block_sparse_attention",
    "block_sparse_attention_backward",
    "context_parallel_attention",
    "context_parallel_attention_backward",
    "inspect",
    "layouts",
    "lsh_attention",
    "lsh_attention_backward",
    "lsh_buckets",
    "lsh_rotations",
    "lsh_sort",
    "merge_states",
    "reference",
    "register_backend",
    "ring_attention",
    "ring_attention_backward",
    "routing",
    "shard",
    "sparse_attention",
    "sparse_attention_backward",
    "sparse_attention_varlen",
    "sparse_attention_varlen_backward",
    "unregister_backend",
    "unshard",
]
