"""The block schedule: which kernel calls compute one member's queries against another member's keys.

A *member* is a rank of the ring over which K/V travel (a rank in ring and
all-gather modes, a Ulysses group in hybrid mode, the whole sequence in
Ulysses mode).  It holds *pieces*, global ``[start, stop)`` ranges of the
sequence in local order.  For a pair of members, :meth:`Plan.calls` lists
the kernel calls that compute the first's queries against the second's keys:

* pieces are cut at document boundaries (``cu_seqlens``): a query and a key
  of different documents never see each other;
* a (query segment, key segment) pair the causal/window mask leaves empty is
  skipped with an interval test; a fully visible pair is an unmasked call,
  and fully visible neighbours are fused into one call; the rest carry the
  diagonal offset of the pair in global positions
  (``offset = q_start - k_start``; query ``i`` sees key ``j`` iff
  ``i + offset - left <= j <= i + offset + right``);
* with a sparse selection (:mod:`~npsparseattn.context_parallel.selection`),
  each pair keeps the selected blocks the mask does not empty and becomes a
  sparse call over them (the selection's operation: ``block_sparse_attention``
  or ``sparse_attention``), or nothing.

:attr:`Plan.needs` says which member pairs have any call at all: a step
whose incoming shard holds no needed block is skipped, and nothing is sent
for it.  Every rank derives the plan from the same agreed arguments, so
senders and receivers agree on every skip without talking.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from npsparseattn.context_parallel.selection import KeyBlockSelection

Piece = tuple[int, int]
EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class BlockCall:
    """One kernel call: local query rows ``q`` against local key rows ``k`` of the source member.

    Query ``i`` of the call is aligned with key ``i + offset`` of the call;
    ``left``/``right`` are the window bounds (``None`` = unbounded: every
    pair visible).  ``sparse`` is the sparse kernels' argument for the call
    (a :class:`~npsparseattn.layouts.BlockLayout` over its rows and keys, or
    a ``(kv_idx, kv_cnt)`` pair: the selection's ``kernel_argument``), or
    ``None`` for a dense call.
    """

    q: slice
    k: slice
    offset: int
    left: int | None
    right: int | None
    sparse: Any = None


@dataclass(frozen=True)
class Segment:
    """A piece cut at document boundaries: global ``[start, stop)``, its document and its first local row."""

    start: int
    stop: int
    doc: int
    local: int


def segments(pieces: list[Piece], offsets: np.ndarray | None) -> list[Segment]:
    """``pieces`` (in local order) cut where documents start; empty pieces dropped.

    >>> [(s.start, s.stop, s.doc, s.local) for s in segments([(0, 4), (10, 12)], np.array([0, 3, 11, 12]))]
    [(0, 3, 0, 0), (3, 4, 1, 3), (10, 11, 1, 4), (11, 12, 2, 5)]
    """
    out, at = [], 0
    for start, stop in pieces:
        pos = start
        while pos < stop:
            doc = 0 if offsets is None else int(np.searchsorted(offsets, pos, side="right")) - 1
            end = stop if offsets is None else min(stop, int(offsets[doc + 1]))
            out.append(Segment(pos, end, doc, at + pos - start))
            pos = end
        at += stop - start
    return out


def classify(q: Piece, k: Piece, left: int | None, right: int | None) -> int:
    """Is global key range ``k`` invisible (0), partly (1) or fully (2) visible to query range ``q``?"""
    (qs, qe), (ks, ke) = q, k
    if qe <= qs or ke <= ks:
        return EMPTY
    if (right is not None and ks > qe - 1 + right) or (left is not None and ke - 1 < qs - left):
        return EMPTY
    if (right is None or ke - 1 <= qs + right) and (left is None or ks >= qe - 1 - left):
        return FULL
    return PARTIAL


def any_visible(qs: Any, qe: Any, ks: Any, ke: Any, left: int | None, right: int | None) -> np.ndarray:
    """Element-wise :func:`classify` ``!= EMPTY`` on arrays of ranges."""
    seen = (np.asarray(qe) > qs) & (np.asarray(ke) > ks)
    if right is not None:
        seen &= np.asarray(ks) <= np.asarray(qe) - 1 + right
    if left is not None:
        seen &= np.asarray(ke) - 1 >= np.asarray(qs) - left
    return seen


def _by_doc(segs: list[Segment]) -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for i, s in enumerate(segs):
        found.setdefault(s.doc, []).append(i)
    return found


def _visible(qs: Segment, k_segs: list[Segment], candidates: list[int], left, right) -> list[tuple[int, int]]:
    """``(index, status)`` of the key segments of ``candidates`` that query segment ``qs`` sees."""
    found = []
    for ki in candidates:
        status = classify((qs.start, qs.stop), (k_segs[ki].start, k_segs[ki].stop), left, right)
        if status != EMPTY:
            found.append((ki, status))
    return found


def dense_calls(q_segs: list[Segment], k_segs: list[Segment], left, right) -> list[BlockCall]:
    """The dense calls of a member pair (see the module notes); fully visible neighbours fused."""
    by_doc = _by_doc(k_segs)
    rows: list[BlockCall] = []
    for qs in q_segs:
        visible = _visible(qs, k_segs, by_doc.get(qs.doc, []), left, right)
        if not visible:
            continue
        q = slice(qs.local, qs.local + qs.stop - qs.start)
        index = [ki for ki, _ in visible]
        if index == list(range(index[0], index[-1] + 1)) and all(st == FULL for _, st in visible):
            first, last = k_segs[index[0]], k_segs[index[-1]]
            k = slice(first.local, last.local + last.stop - last.start)
            last_call = rows[-1] if rows else None
            if last_call is not None and last_call.left is None and last_call.right is None:
                if last_call.k == k and last_call.q.stop == q.start:
                    rows[-1] = BlockCall(slice(last_call.q.start, q.stop), k, 0, None, None)
                    continue
            rows.append(BlockCall(q, k, 0, None, None))
            continue
        for ki, status in visible:
            ks = k_segs[ki]
            k = slice(ks.local, ks.local + ks.stop - ks.start)
            if status == FULL:
                rows.append(BlockCall(q, k, 0, None, None))
            else:
                rows.append(BlockCall(q, k, qs.start - ks.start, left, right))
    return rows


def block_calls(
    q_pieces: list[Piece], k_pieces: list[Piece], left: int | None, right: int | None, offsets: Any = None
) -> list[BlockCall]:
    """The dense kernel calls that compute local queries (global ``q_pieces``) against a K/V shard (``k_pieces``).

    Pieces are global ``[start, stop)`` ranges in local order; ``offsets``
    (document offsets, optional) separate packed documents.

    >>> block_calls([(0, 2), (6, 8)], [(2, 4), (4, 6)], None, 0)    # zigzag, P=2, rank 0, step 1
    [BlockCall(q=slice(2, 4, None), k=slice(0, 4, None), offset=0, left=None, right=None, sparse=None)]
    """
    docs = None if offsets is None else np.asarray(offsets)
    return dense_calls(segments(q_pieces, docs), segments(k_pieces, docs), left, right)


class Plan:
    """The schedule of a ring of members: their pieces, the calls of every pair, and which pairs need anything.

    Parameters
    ----------
    pieces : list of piece lists, one per member (global ``[start, stop)``, local order)
    left, right : window bounds with causal folded in (global positions)
    offsets : document offsets (host int64) or None
    selection : KeyBlockSelection or None (dense)
    heads : range
        The global query heads the members compute (a sparse pattern per
        head is read for these heads only).
    """

    def __init__(
        self,
        pieces: list[list[Piece]],
        left: int | None,
        right: int | None,
        offsets: np.ndarray | None = None,
        selection: KeyBlockSelection | None = None,
        heads: range = range(1),
    ):
        self.pieces = pieces
        self.offsets = offsets
        self.left, self.right = left, right
        self.selection = selection
        self.heads = heads
        self.lengths = [sum(b - a for a, b in p) for p in pieces]
        self.segments = [segments(p, offsets) for p in pieces]
        self._items: dict[tuple[int, int], list[tuple[BlockCall, Any]]] = {}
        self._calls: dict[tuple[int, int], list[BlockCall]] = {}

    @property
    def size(self) -> int:
        return len(self.pieces)

    def _pair(self, r: int, s: int) -> list[tuple[BlockCall, Any]]:
        """Calls of member ``r``'s queries against member ``s``'s keys, each with its selected blocks (sparse)."""
        found = self._items.get((r, s))
        if found is not None:
            return found
        q_segs, k_segs = self.segments[r], self.segments[s]
        if self.selection is None:
            found = [(call, None) for call in dense_calls(q_segs, k_segs, self.left, self.right)]
        else:
            found = self._sparse_pair(q_segs, k_segs)
        self._items[r, s] = found
        return found

    def _sparse_pair(self, q_segs: list[Segment], k_segs: list[Segment]) -> list[tuple[BlockCall, Any]]:
        sel, left, right = self.selection, self.left, self.right
        bq, bk = sel.block
        by_doc = _by_doc(k_segs)
        found = []
        for qs in q_segs:
            for ki, status in _visible(qs, k_segs, by_doc.get(qs.doc, []), left, right):
                ks = k_segs[ki]
                head, qb, kb = sel.blocks((qs.start, qs.stop), (ks.start, ks.stop), self.heads)
                if status == PARTIAL and qb.size:
                    q_lo, q_hi = np.maximum(qb * bq, qs.start), np.minimum((qb + 1) * bq, qs.stop)
                    k_lo, k_hi = np.maximum(kb * bk, ks.start), np.minimum((kb + 1) * bk, ks.stop)
                    keep = any_visible(q_lo, q_hi, k_lo, k_hi, left, right)
                    head, qb, kb = head[keep], qb[keep], kb[keep]
                if not qb.size:
                    continue
                q = slice(qs.local, qs.local + qs.stop - qs.start)
                k = slice(ks.local, ks.local + ks.stop - ks.start)
                if status == FULL:
                    call = BlockCall(q, k, 0, None, None)
                else:
                    call = BlockCall(q, k, qs.start - ks.start, left, right)
                found.append((call, ((qs.start, qs.stop), (ks.start, ks.stop), (head, qb, kb))))
        return found

    def calls(self, r: int, s: int) -> list[BlockCall]:
        """The kernel calls of member ``r``'s queries against member ``s``'s keys, in the order they run."""
        found = self._calls.get((r, s))
        if found is None:
            found = []
            for call, chosen in self._pair(r, s):
                if chosen is not None:
                    q_range, k_range, blocks = chosen
                    sparse = self.selection.kernel_argument(q_range, k_range, self.heads, blocks)
                    call = BlockCall(call.q, call.k, call.offset, call.left, call.right, sparse)
                found.append(call)
            self._calls[r, s] = found
        return found

    @cached_property
    def needs(self) -> np.ndarray:
        """``needs[r, s]``: member ``r``'s queries see something of member ``s``'s keys (bool, members x members).

        Vectorised over segment pairs of one document (dense) or over the
        selected blocks (sparse): the same predicate as :meth:`calls` is
        non-empty, without making the calls (``tests/test_context_parallel.py``
        checks both against brute force).
        """
        if self.selection is None:
            return self._dense_needs()
        return self._sparse_needs()

    def _dense_needs(self) -> np.ndarray:
        needs = np.zeros((self.size, self.size), dtype=bool)
        rows = [(s.start, s.stop, s.doc, m) for m, segs in enumerate(self.segments) for s in segs]
        if not rows:
            return needs
        table = np.array(rows, dtype=np.int64)
        table = table[np.argsort(table[:, 2], kind="stable")]
        bounds = np.flatnonzero(np.diff(table[:, 2])) + 1
        for doc in np.split(table, bounds):
            start, stop, member = doc[:, 0], doc[:, 1], doc[:, 3]
            seen = any_visible(start[:, None], stop[:, None], start[None, :], stop[None, :], self.left, self.right)
            q, k = np.nonzero(seen)
            needs[member[q], member[k]] = True
        return needs

    def _sparse_needs(self) -> np.ndarray:
        """Each selected block belongs to one member's piece (pieces and documents are cut at block multiples)."""
        needs = np.zeros((self.size, self.size), dtype=bool)
        (bq, bk), total = self.selection.block, max((b for p in self.pieces for _, b in p), default=0)
        owner_q = np.full(-(-total // bq), -1, dtype=np.int64)
        owner_k = np.full(-(-total // bk), -1, dtype=np.int64)
        for m, pieces in enumerate(self.pieces):
            for a, b in pieces:
                owner_q[a // bq : -(-b // bq)] = m
                owner_k[a // bk : -(-b // bk)] = m
        _, qb, kb = self.selection.blocks((0, total), (0, total), self.heads)
        qs, ks = qb * bq, kb * bk
        seen = any_visible(qs, np.minimum(qs + bq, total), ks, np.minimum(ks + bk, total), self.left, self.right)
        if self.offsets is not None:
            seen &= np.searchsorted(self.offsets, qs, side="right") == np.searchsorted(self.offsets, ks, side="right")
        needs[owner_q[qb[seen]], owner_k[kb[seen]]] = True
        return needs

    @property
    def dense(self) -> bool:
        """Every member pair needs something (the ring relays every shard)."""
        return bool(self.needs.all())
