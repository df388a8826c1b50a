"""How a sequence is cut across ranks: the shardings, :func:`shard` and :func:`unshard`.

A sharding gives every rank a list of *pieces*, global ``[start, stop)``
ranges of the sequence, in the order the rank holds them:

* ``"contiguous"``: rank ``r`` holds the ``r``-th of ``P`` near-equal slices;
* ``"zigzag"``: the sequence is cut in ``2P`` chunks and rank ``r`` holds
  chunks ``r`` and ``2P-1-r`` (one early, one late: balanced causal work,
  ring-flash-attn's zigzag);
* ``"per_document"``: packed documents (``cu_seqlens``) are each cut in
  ``2P`` chunks and rank ``r`` holds chunks ``r`` and ``2P-1-r`` of every
  document, document after document, so every rank holds the same share of
  every document and causal work stays balanced whatever the lengths.

``block`` makes every cut a multiple of ``block`` tokens (from the start of
the sequence, or of each document for ``"per_document"``), as block-sparse
layouts need (:func:`npsparseattn.context_parallel_attention` with
``layout=``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from npsparseattn._arrays import array_module, common_kind
from npsparseattn._checks import is_int
from npsparseattn.interop.dlpack import accepts_dlpack
from npsparseattn.problems.varlen import host_indices

SHARDINGS = ("zigzag", "contiguous", "per_document")
Piece = tuple[int, int]


def check_sharding(sharding: Any) -> str:
    """``"zigzag"``, ``"contiguous"`` or ``"per_document"``."""
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be 'zigzag', 'contiguous' or 'per_document', got {sharding!r}")
    return sharding


def _check_world(rank: Any, world: Any) -> tuple[int, int]:
    for name, value in (("world", world), ("rank", rank)):
        if not is_int(value):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    return int(rank), int(world)


def check_block(block: Any) -> int:
    """A positive int."""
    if not is_int(block) or block < 1:
        raise ValueError(f"block must be a positive int (tokens), got {block!r}")
    return int(block)


def document_offsets(cu_seqlens: Any, total: int | None = None) -> np.ndarray:
    """``cu_seqlens`` checked (1-D integers from 0, non-decreasing, ending at ``total`` if given) as host int64.

    >>> document_offsets([0, 3, 3, 8]).tolist()
    [0, 3, 3, 8]
    """
    if isinstance(cu_seqlens, (list, tuple)):
        cu_seqlens = np.asarray(cu_seqlens, dtype=np.int64)
    kind = "numpy" if isinstance(cu_seqlens, np.ndarray) else "cupy"
    host = host_indices(cu_seqlens, "cu_seqlens", kind)
    if host.ndim != 1 or host.shape[0] < 1:
        raise ValueError(f"cu_seqlens must be a 1-D array of n_docs + 1 offsets, got shape {tuple(host.shape)}")
    if host[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {host[0]}")
    steps = np.diff(host)
    if (steps < 0).any():
        s = int(np.argmax(steps < 0))
        raise ValueError(f"cu_seqlens must be non-decreasing: cu_seqlens[{s}] = {host[s]} > {host[s + 1]}")
    if total is not None and host[-1] != total:
        raise ValueError(f"cu_seqlens must end at the sequence length {total}, got cu_seqlens[-1] = {host[-1]}")
    return host


def _split(length: int, parts: int, block: int = 1) -> list[Piece]:
    """``[start, stop)`` of ``parts`` near-equal consecutive pieces of whole ``block`` units (the first ones longer)."""
    units = -(-length // block)
    base, extra = divmod(units, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((min(start * block, length), min(stop * block, length)))
        start = stop
    return bounds


def shard_pieces(
    length: int, world: int, rank: int, sharding: str = "zigzag", *, cu_seqlens: Any = None, block: int = 1
) -> list[Piece]:
    """Global ``[start, stop)`` ranges of the sequence that ``rank`` holds, in local order.

    ``cu_seqlens`` (document offsets) is needed by ``"per_document"`` only,
    which drops empty pieces; ``block`` makes every cut a multiple of
    ``block`` tokens.

    >>> shard_pieces(10, 2, 0, "zigzag")   # chunks 0 and 3 of 4
    [(0, 3), (8, 10)]
    >>> shard_pieces(10, 2, 1, "contiguous")
    [(5, 10)]
    >>> shard_pieces(12, 2, 0, "per_document", cu_seqlens=[0, 8, 12])   # chunks 0 and 3 of each document
    [(0, 2), (6, 8), (8, 9), (11, 12)]
    """
    rank, world = _check_world(rank, world)
    sharding, block = check_sharding(sharding), check_block(block)
    if sharding == "contiguous":
        return [_split(length, world, block)[rank]]
    if sharding == "zigzag":
        chunks = _split(length, 2 * world, block)
        return [chunks[rank], chunks[2 * world - 1 - rank]]
    if cu_seqlens is None:
        raise ValueError("sharding='per_document' needs cu_seqlens, the offsets of the packed documents")
    offsets = document_offsets(cu_seqlens, length)
    pieces = []
    for start, stop in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        chunks = _split(stop - start, 2 * world, block)
        for a, b in (chunks[rank], chunks[2 * world - 1 - rank]):
            if b > a:
                pieces.append((start + a, start + b))
    return pieces


def shard_lengths(
    length: int, world: int, sharding: str = "zigzag", *, cu_seqlens: Any = None, block: int = 1
) -> list[int]:
    """Local length of every rank for a sequence of ``length``.

    >>> shard_lengths(11, 3, "zigzag")
    [3, 4, 4]
    """
    return [
        sum(b - a for a, b in shard_pieces(length, world, r, sharding, cu_seqlens=cu_seqlens, block=block))
        for r in range(world)
    ]


def _axis(x: Any, axis: Any) -> int:
    if not is_int(axis):
        raise TypeError(f"axis must be an int, got {axis!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for an array with {x.ndim} axes")
    return int(axis) % x.ndim


@accepts_dlpack
def shard(
    x: Any,
    rank: int,
    world: int,
    sharding: str = "zigzag",
    *,
    axis: int = -2,
    cu_seqlens: Any = None,
    block: int = 1,
) -> Any:
    """The part of the full sequence ``x`` that ``rank`` of ``world`` holds (a copy).

    Parameters
    ----------
    x : array (NumPy or CuPy), the whole sequence along ``axis``
        ``q``/``k``/``v``/``out``/``dout`` (..., L, D) use ``axis=-2``;
        ``lse`` (..., L) uses ``axis=-1``.
    rank, world : int
        This process and the number of processes.
    sharding : ``"zigzag"``, ``"contiguous"`` or ``"per_document"``
        Contiguous: ``world`` near-equal slices.  Zigzag: ``2*world`` chunks,
        rank ``r`` holds chunks ``r`` and ``2*world-1-r`` (balances causal
        work).  Per document: the same zigzag inside every document of
        ``cu_seqlens``, document after document.
    cu_seqlens : integer array (n_docs + 1,), optional
        Offsets of packed documents (from 0 to ``L``); needed by ``"per_document"``.
    block : int
        Cut only at multiples of ``block`` tokens (what a block-sparse
        ``layout`` of that block size needs).

    Returns
    -------
    array with ``shard_lengths(...)[rank]`` along ``axis``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(8)[:, None]                  # (L=8, D=1)
    >>> shard(x, 0, 2)[:, 0], shard(x, 1, 2)[:, 0]  # zigzag: chunks (0, 3) and (1, 2)
    (array([0, 1, 6, 7]), array([2, 3, 4, 5]))
    >>> shard(x, 0, 2, "per_document", cu_seqlens=[0, 4, 8])[:, 0]   # chunks 0 and 3 of both documents
    array([0, 3, 4, 7])
    """
    xp = array_module(common_kind(x=x))
    ax = _axis(x, axis)
    pieces = shard_pieces(x.shape[ax], world, rank, sharding, cu_seqlens=cu_seqlens, block=block)
    index = [slice(None)] * x.ndim
    parts = []
    for start, stop in pieces:
        index[ax] = slice(start, stop)
        parts.append(x[tuple(index)])
    if not parts:
        index[ax] = slice(0, 0)
        parts.append(x[tuple(index)])
    return xp.concatenate(parts, axis=ax)


@accepts_dlpack
def unshard(
    shards: Sequence[Any], sharding: str = "zigzag", *, axis: int = -2, cu_seqlens: Any = None, block: int = 1
) -> Any:
    """Inverse of :func:`shard`: the full sequence from every rank's shard, in rank order.

    >>> import numpy as np
    >>> x = np.arange(10.0).reshape(5, 2)
    >>> bool((unshard([shard(x, r, 3) for r in range(3)]) == x).all())
    True
    """
    if not isinstance(shards, Sequence) or isinstance(shards, (str, bytes)):
        raise TypeError(f"shards must be a list or tuple of arrays, one per rank, got {type(shards).__name__}")
    if len(shards) < 1:
        raise ValueError("unshard needs the shards of at least one rank")
    world = len(shards)
    xp = array_module(common_kind(**{f"shards[{i}]": s for i, s in enumerate(shards)}))
    ax = _axis(shards[0], axis)
    lengths = [s.shape[ax] for s in shards]
    total = sum(lengths)
    expected = shard_lengths(total, world, sharding, cu_seqlens=cu_seqlens, block=block)
    if lengths != expected:
        raise ValueError(
            f"shard lengths {lengths} along axis {axis} do not match sharding {sharding!r} for a total length "
            f"{total} over {world} ranks (expected {expected}); pass the shards in rank order"
        )
    placed: list[tuple[int, Any]] = []
    index = [slice(None)] * shards[0].ndim
    for rank, part in enumerate(shards):
        local = 0
        for start, stop in shard_pieces(total, world, rank, sharding, cu_seqlens=cu_seqlens, block=block):
            index[ax] = slice(local, local + stop - start)
            placed.append((start, part[tuple(index)]))
            local += stop - start
    placed.sort(key=lambda item: item[0])
    if not placed:
        return xp.concatenate(list(shards), axis=ax)
    return xp.concatenate([p for _, p in placed], axis=ax)
