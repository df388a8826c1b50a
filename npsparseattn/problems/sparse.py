"""The index-driven sparse problems: attention over the key blocks each query block selects.

``kv_idx`` lists, for every (batch, key/value head, query block), the key
blocks that query block attends: int32 ``(B, Hk, ceil(Lq / q_block), K)``,
``-1`` for an unused slot.  The query heads of a GQA group share their key
head's list.  ``kv_block=1`` selects single tokens (DeepSeek's DSA),
``q_block=1`` gives every query its own list (NSA).  ``kv_cnt`` (optional,
``(B, Hk, nqb)``) counts the leading slots that hold indices; the slots
after it are ignored whatever they hold.  Inside the selected blocks the
``causal``/``window`` masks of :func:`npsparseattn.attention` apply (offset
``Lk - Lq``); a query that sees no key gets output 0 and ``lse = -inf``.

Rules, checked on the host before any work: an integer index array of the
problem's array kind and exactly the expected shape; every counted index
``-1`` or in ``[0, ceil(Lk / kv_block))``; no key block twice in one list
(a ``ValueError`` names the first repeat, its list and its two slots).

**The canonical index** the kernels read (:meth:`SparseProblem.kernel_index`):
each list's valid blocks sorted ascending and packed to the front, ``-1``
after them, and ``kv_cnt`` their number, both int32 arrays of the problem's
kind.  A backend can therefore walk a list as runs of consecutive blocks and
stop at ``kv_cnt``, and build the transposed index (the query blocks that
chose each key block) in one counting pass.

The packed variable-length form (:class:`SparseVarlenProblem`) numbers the
query blocks of each sequence from the sequence's start, sequence after
sequence: ``kv_idx`` is ``(Hk, NQB, K)`` with ``NQB = sum_s ceil(Lq_s /
q_block)``, and its indices count the key blocks of the same sequence from
that sequence's first key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from npsparseattn._arrays import KIND_NAMES, array_kind, array_module
from npsparseattn._checks import check_int
from npsparseattn.problems.attention import AttentionProblem, attention_problem
from npsparseattn.problems.varlen import INDEX_DTYPES, VarlenProblem, host_indices, varlen_problem

__all__ = [
    "SparseProblem",
    "SparseVarlenProblem",
    "canonical_index",
    "query_block_offsets",
    "sparse_problem",
    "sparse_varlen_problem",
]

INT32_MAX = 2**31 - 1


def _blocks(length: int, size: int) -> int:
    return -(-length // size)


def _where(flat: int, shape: tuple[int, ...]) -> str:
    """``[i, j, ...]`` of the flat index ``flat`` in an array of ``shape`` (``[`` alone for a 0-d one)."""
    return "[" + ", ".join(str(int(i)) for i in np.unravel_index(flat, shape)) + "]"


def _index_array(x: Any, name: str, kind: str, shape: tuple[int, ...], form: str) -> np.ndarray:
    """An integer array of the problem's kind and exactly ``shape``, as a host int64 array."""
    got = array_kind(x, name)
    if got != kind:
        raise TypeError(
            f"{name} is a {KIND_NAMES[got]} array but q is a {KIND_NAMES[kind]} array; pass the index arrays "
            f"on q's device"
        )
    if x.dtype.name not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer array (int32), got dtype {x.dtype.name}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} {form}, got {tuple(x.shape)}")
    return host_indices(x, name, kind)


def canonical_index(
    kv_idx: np.ndarray, kv_cnt: np.ndarray | None, n_key_blocks: Any, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Check host int64 lists ``kv_idx`` (R, K) and return them canonical: ``(kv_idx, kv_cnt)`` int32.

    ``kv_cnt`` (R,) or None counts the leading slots that hold indices;
    ``n_key_blocks`` (an int, or (R,) per list) bounds the indices; ``shape``
    is the caller's shape of ``kv_idx``, for the messages.  Returns each list
    sorted ascending with its valid indices first and ``-1`` after, and their
    counts.

    >>> idx, cnt = canonical_index(np.array([[3, -1, 0], [2, 1, 7]]), np.array([3, 2]), 4, (2, 3))
    >>> idx.tolist(), cnt.tolist()
    ([[0, 3, -1], [1, 2, -1]], [2, 2])
    """
    rows, slots = kv_idx.shape
    limit = np.broadcast_to(np.asarray(n_key_blocks, dtype=np.int64), (rows,))[:, None]
    counted = np.arange(slots)[None, :] < (slots if kv_cnt is None else kv_cnt[:, None])
    bad = counted & ((kv_idx < -1) | (kv_idx >= limit))
    if bad.any():
        flat = int(np.flatnonzero(bad)[0])
        r = flat // max(slots, 1)
        raise ValueError(
            f"kv_idx{_where(flat, shape)} = {kv_idx.flat[flat]} is out of range: an index must be -1 (unused) or "
            f"a key block in [0, {limit[r, 0]})"
        )
    valid = counted & (kv_idx >= 0)
    sentinel = INT32_MAX
    ordered = np.sort(np.where(valid, kv_idx, sentinel), axis=1)
    repeats = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != sentinel)
    if repeats.any():
        r, c = (int(x) for x in np.argwhere(repeats)[0])
        block = int(ordered[r, c])
        first, second = np.flatnonzero(valid[r] & (kv_idx[r] == block))[:2]
        where = _where(r, shape[:-1])[:-1] + ", :]"
        raise ValueError(
            f"kv_idx{where} selects key block {block} twice (slots {first} and {second}); a key block may appear "
            f"once per query block"
        )
    count = valid.sum(axis=1)
    ordered[ordered == sentinel] = -1
    return ordered.astype(np.int32), count.astype(np.int32)


def _counts(kv_cnt: Any, name: str, kind: str, shape: tuple[int, ...], slots: int) -> np.ndarray | None:
    """``kv_cnt`` checked: None, or integers in ``[0, K]`` of ``shape``."""
    if kv_cnt is None:
        return None
    host = _index_array(kv_cnt, name, kind, shape, "(kv_idx's shape without its last axis)")
    bad = (host < 0) | (host > slots)
    if bad.any():
        flat = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}{_where(flat, shape)} = {host.flat[flat]}; a count must lie in [0, K={slots}]")
    return host.reshape(-1)


@dataclass(frozen=True)
class SparseProblem:
    """Validated index-driven sparse attention: the dense problem plus the canonical index.

    ``kv_idx`` (B, Hk, nqb, K) and ``kv_cnt`` (B, Hk, nqb) are host int32
    arrays in canonical form (see the module docstring);
    :meth:`kernel_index` gives them as the kernels read them.
    """

    dense: AttentionProblem
    kv_idx: np.ndarray
    kv_cnt: np.ndarray
    q_block: int
    kv_block: int

    @property
    def kind(self) -> str:
        return self.dense.kind

    @property
    def dtype(self) -> np.dtype:
        return self.dense.dtype

    @property
    def mods(self) -> Any:
        """The dense problem's score modifications (:mod:`npsparseattn.problems.scores`), or ``None``."""
        return self.dense.mods

    @property
    def n_query_blocks(self) -> int:
        return self.kv_idx.shape[2]

    @property
    def n_key_blocks(self) -> int:
        return _blocks(self.dense.seq_k, self.kv_block)

    def kernel_index(self) -> tuple[Any, Any]:
        """``(kv_idx, kv_cnt)`` canonical, int32, of the problem's array kind."""
        xp = array_module(self.kind)
        return xp.asarray(self.kv_idx), xp.asarray(self.kv_cnt)

    def options(self) -> dict[str, Any]:
        """The keywords of the kernel contract: block sizes and the visibility rule."""
        return dict(q_block=self.q_block, kv_block=self.kv_block, **self.dense.visibility())


def _block_sizes(q_block: Any, kv_block: Any) -> tuple[int, int]:
    q_block = check_int(q_block, "q_block", 1)
    kv_block = check_int(kv_block, "kv_block", 1)
    if max(q_block, kv_block) > INT32_MAX:
        raise ValueError(f"q_block and kv_block must fit int32, got {q_block} and {kv_block}")
    return q_block, kv_block


def sparse_problem(
    q: Any,
    k: Any,
    v: Any,
    kv_idx: Any,
    kv_cnt: Any = None,
    *,
    q_block: Any = 64,
    kv_block: Any = 64,
    causal: Any = False,
    window: Any = None,
    scale: Any = None,
) -> SparseProblem:
    """Validate the arguments of :func:`npsparseattn.sparse_attention` into a :class:`SparseProblem`.

    ``kv_idx`` has the caller's axes of ``k`` with the sequence and head
    axes replaced by the query blocks and the slots: ``(*batch, Hk, nqb, K)``
    for 4-D and larger inputs, ``(Hk, nqb, K)`` for 3-D ones and ``(nqb, K)``
    for 2-D ones (as :func:`npsparseattn.attention` accepts them).
    """
    dense = attention_problem(q, k, v, causal=causal, window=window, scale=scale)
    q_block, kv_block = _block_sizes(q_block, kv_block)
    nqb = _blocks(dense.seq_q, q_block)
    if not hasattr(kv_idx, "shape") or len(kv_idx.shape) < 1:
        raise TypeError(f"kv_idx must be an integer array (*batch, Hk, nqb, K), got {type(kv_idx).__name__}")
    lead = tuple(k.shape[:-2]) + (nqb,)
    shape = lead + (kv_idx.shape[-1],)
    form = "(*batch, Hk, ceil(Lq / q_block), K) in the axes of k"
    host = _index_array(kv_idx, "kv_idx", dense.kind, shape, form)
    slots = shape[-1]
    counts = _counts(kv_cnt, "kv_cnt", dense.kind, lead, slots)
    idx, cnt = canonical_index(host.reshape(int(np.prod(lead)), slots), counts, _blocks(dense.seq_k, kv_block), shape)
    b, hk = dense.k.shape[:2]
    return SparseProblem(
        dense=dense,
        kv_idx=idx.reshape(b, hk, nqb, slots),
        kv_cnt=cnt.reshape(b, hk, nqb),
        q_block=q_block,
        kv_block=kv_block,
    )


def query_block_offsets(lengths: np.ndarray, q_block: int) -> np.ndarray:
    """First list of each packed sequence: ``(n_seqs + 1,)`` cumulative ``ceil(Lq_s / q_block)`` from 0.

    >>> query_block_offsets(np.array([5, 0, 3]), 4).tolist()
    [0, 2, 2, 3]
    """
    return np.concatenate([[0], np.cumsum(-(-np.asarray(lengths, dtype=np.int64) // q_block))])


@dataclass(frozen=True)
class SparseVarlenProblem:
    """Validated packed sparse attention: the varlen problem plus the canonical index.

    ``kv_idx`` (Hk, NQB, K) and ``kv_cnt`` (Hk, NQB): the lists of the query
    blocks of every sequence, sequence after sequence (``block_offsets``),
    indices counted within their own sequence.
    """

    packed: VarlenProblem
    kv_idx: np.ndarray
    kv_cnt: np.ndarray
    block_offsets: np.ndarray
    q_block: int
    kv_block: int

    @property
    def kind(self) -> str:
        return self.packed.kind

    @property
    def dtype(self) -> np.dtype:
        return self.packed.dtype

    def kernel_index(self) -> tuple[Any, Any]:
        """``(kv_idx, kv_cnt)`` canonical, int32, of the problem's array kind."""
        xp = array_module(self.kind)
        return xp.asarray(self.kv_idx), xp.asarray(self.kv_cnt)

    def options(self) -> dict[str, Any]:
        """The keywords of the kernel contract: block sizes and the window (offsets are per sequence)."""
        return dict(q_block=self.q_block, kv_block=self.kv_block, **self.packed.visibility())


def sparse_varlen_problem(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    kv_idx: Any,
    kv_cnt: Any = None,
    *,
    q_block: Any = 64,
    kv_block: Any = 64,
    causal: Any = False,
    window: Any = None,
    scale: Any = None,
) -> SparseVarlenProblem:
    """Validate the arguments of :func:`npsparseattn.sparse_attention_varlen` into a :class:`SparseVarlenProblem`."""
    packed = varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, window=window, scale=scale)
    q_block, kv_block = _block_sizes(q_block, kv_block)
    lengths_q, lengths_k = np.diff(packed.offsets_q), np.diff(packed.offsets_k)
    offsets = query_block_offsets(lengths_q, q_block)
    if not hasattr(kv_idx, "shape") or len(kv_idx.shape) < 1:
        raise TypeError(f"kv_idx must be an integer array (Hk, NQB, K), got {type(kv_idx).__name__}")
    hk = k.shape[0]
    shape = (hk, int(offsets[-1]), kv_idx.shape[-1])
    form = "(Hk, NQB, K): NQB = sum over sequences of ceil(Lq_s / q_block)"
    host = _index_array(kv_idx, "kv_idx", packed.kind, shape, form)
    counts = _counts(kv_cnt, "kv_cnt", packed.kind, shape[:2], shape[2])
    seq_of_block = np.repeat(np.arange(lengths_q.shape[0]), np.diff(offsets))
    limit = np.tile(-(-lengths_k[seq_of_block] // kv_block), hk)
    idx, cnt = canonical_index(host.reshape(shape[0] * shape[1], shape[2]), counts, limit, shape)
    return SparseVarlenProblem(
        packed=packed,
        kv_idx=idx.reshape(shape),
        kv_cnt=cnt.reshape(shape[:2]),
        block_offsets=offsets,
        q_block=q_block,
        kv_block=kv_block,
    )
