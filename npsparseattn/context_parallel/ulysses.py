"""Ulysses: an all-to-all turns sequence shards of every head into whole sequences of a few heads, and back.

Inside a Ulysses group of ``U`` ranks, member ``u`` holds its sequence shard
of every head.  One all-to-all gives it the group's whole sequence (the
union of the members' shards, in global order) for its heads
(:class:`~npsparseattn.context_parallel.heads.HeadSplit`), attention runs on
that (a ring of one, or the ring across groups in hybrid mode), and a second
all-to-all sends each member's rows of the output back.  The work is cut into
head chunks: the all-to-all of chunk ``c + 1`` is posted before chunk ``c``
is computed, and the return of chunk ``c`` runs while chunk ``c + 1`` is.

Arrays of several dtypes travel in one all-to-all as bytes, each starting
at a multiple of 8 bytes of its peer's slice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from npsparseattn.context_parallel.engine import Kernels
from npsparseattn.context_parallel.heads import HeadSplit
from npsparseattn.distributed.base import Communicator, Transfer

Spec = tuple[tuple[int, ...], Any]  # shape, dtype
ALIGN = 8


class Packing:
    """Per peer, a list of arrays laid out one after another in a flat byte buffer (8-byte aligned).

    >>> p = Packing([[((2,), np.float32), ((1,), np.float64)], [((3,), np.int8)]])
    >>> p.counts, p.displs, p.total
    ([16, 8], [0, 16], 24)
    """

    def __init__(self, specs: list[list[Spec]]):
        self.specs = specs
        self.offsets: list[list[int]] = []
        self.counts: list[int] = []
        self.displs: list[int] = []
        at = 0
        for peer in specs:
            self.displs.append(at)
            offsets, size = [], 0
            for shape, dtype in peer:
                offsets.append(size)
                size += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // ALIGN) * ALIGN
            self.offsets.append(offsets)
            self.counts.append(size)
            at += size
        self.total = at

    def views(self, buf: Any, peer: int) -> list[Any]:
        """The arrays of ``peer`` inside ``buf`` (views)."""
        out = []
        for (shape, dtype), offset in zip(self.specs[peer], self.offsets[peer]):
            start = self.displs[peer] + offset
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            out.append(buf[start : start + nbytes].view(dtype).reshape(shape))
        return out


class SeqMap:
    """Where each member's local rows sit in the group's sequence (the sorted union of the members' pieces).

    >>> m = SeqMap([[(0, 2), (6, 8)], [(2, 6)]])       # zigzag of 8 positions on 2 ranks
    >>> m.pieces, m.length, [i.tolist() for i in m.index]
    ([(0, 8)], 8, [[0, 1, 6, 7], [2, 3, 4, 5]])
    """

    def __init__(self, member_pieces: list[list[tuple[int, int]]]):
        ranges = sorted(p for pieces in member_pieces for p in pieces if p[1] > p[0])
        merged: list[tuple[int, int]] = []
        for a, b in ranges:
            if merged and merged[-1][1] == a:
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        self.pieces = merged
        self.length = sum(b - a for a, b in merged)
        starts = np.array([a for a, _ in merged], dtype=np.int64)
        before = np.concatenate([[0], np.cumsum([b - a for a, b in merged])]).astype(np.int64)

        def position(x: int) -> int:
            i = int(np.searchsorted(starts, x, side="right")) - 1
            return int(before[i] + x - starts[i])

        self.index = [
            np.concatenate(
                [np.arange(position(a), position(a) + b - a) for a, b in pieces if b > a] or [np.zeros(0)]
            ).astype(np.int64)
            for pieces in member_pieces
        ]
        self.lengths = [int(i.size) for i in self.index]


class Group:
    """A Ulysses group: its communicator, this member, the head split and the sequence map."""

    def __init__(self, comm: Communicator, member: int, split: HeadSplit, seq: SeqMap, xp: Any):
        self.comm, self.member, self.split, self.seq, self.xp = comm, member, split, seq, xp
        self.index = [xp.asarray(i) for i in seq.index]

    @property
    def size(self) -> int:
        return self.split.group

    def exchange(self, send: Packing, parts: Callable[[int], list[Any]], recv: Packing) -> tuple[Transfer, Any]:
        """Pack ``parts(j)`` for every member ``j`` and post the all-to-all; returns the transfer and receive buffer."""
        out = self.xp.empty(send.total, np.uint8)
        for j in range(self.size):
            for view, part in zip(send.views(out, j), parts(j)):
                view[...] = part
        return self._post(out, send, recv)

    def exchange_rows(self, send: Packing, arrays: list[Any], recv: Packing) -> tuple[Transfer, Any]:
        """Pack the rows of the group's sequence (axis 2) that member ``j`` holds, for every ``j``, and post."""
        out = self.xp.empty(send.total, np.uint8)
        for j in range(self.size):
            for view, x in zip(send.views(out, j), arrays):
                self.xp.take(x, self.index[j], axis=2, out=view)
        return self._post(out, send, recv)

    def _post(self, out: Any, send: Packing, recv: Packing) -> tuple[Transfer, Any]:
        into = self.xp.empty(recv.total, np.uint8)
        return self.comm.alltoallv(out, send.counts, send.displs, into, recv.counts, recv.displs), (out, into)

    def scatter_rows(self, arrays: list[Any], shape: tuple[int, ...], dtype: Any) -> Any:
        """The group's sequence assembled from every member's rows (axis 2); NaN where no member wrote."""
        whole = self.xp.full(shape, np.nan, dtype)
        for member, part in enumerate(arrays):
            whole[:, :, self.index[member]] = part
        return whole


def _s(heads: range) -> slice:
    return slice(heads.start, heads.stop)


def _specs(batch: int, heads: list[int], lengths: list[int], widths: list[Any]) -> list[list[Spec]]:
    """Per peer: arrays (batch, heads[i], lengths[peer], width) of each (width, dtype) (width None: no last axis)."""
    specs = []
    for length in lengths:
        peer = []
        for h, (width, dtype) in zip(heads, widths):
            shape = (batch, h, length) if width is None else (batch, h, length, width)
            peer.append((shape, dtype))
        specs.append(peer)
    return specs


def ulysses_forward(group: Group, kern: Kernels, q: Any, k: Any, v: Any, stage: Callable) -> tuple[Any, Any]:
    """This member's ``(out, lse)`` rows for every head; ``stage(q, k, v, heads)`` computes one chunk."""
    xp, split, u, seq = kern.xp, group.split, group.member, group.seq
    b, hq, length, d = q.shape
    dv, cd, acc = v.shape[3], kern.dtype, kern.acc
    nq = split.per_rank // split.chunks
    mine, lengths = seq.lengths[u], seq.lengths
    send = Packing(_specs(b, [nq, 1, 1], [mine] * group.size, [(d, cd), (d, cd), (dv, cd)]))
    recv = Packing(_specs(b, [nq, 1, 1], lengths, [(d, cd), (d, cd), (dv, cd)]))
    back_send = Packing(_specs(b, [nq, nq], lengths, [(dv, acc), (None, acc)]))
    back_recv = Packing(_specs(b, [nq, nq], [mine] * group.size, [(dv, acc), (None, acc)]))

    def parts_in(c: int) -> Callable[[int], list[Any]]:
        return lambda j: [
            q[:, _s(split.q_heads(j, c))],
            k[:, _s(split.kv_heads(j, c))],
            v[:, _s(split.kv_heads(j, c))],
        ]

    out = xp.full((b, hq, length, dv), np.nan, acc)  # NaN shows a row no member sent back
    lse = xp.full((b, hq, length), np.nan, acc)
    incoming = group.exchange(send, parts_in(0), recv)
    returns = []
    for c in range(split.chunks):
        group.comm.wait(incoming[0])
        received = [recv.views(incoming[1][1], i) for i in range(group.size)]
        if c + 1 < split.chunks:
            incoming = group.exchange(send, parts_in(c + 1), recv)
        q_c, k_c, v_c = (
            group.scatter_rows([r[n] for r in received], (b, h, seq.length, w), cd)
            for n, (h, w) in enumerate(((nq, d), (1, d), (1, dv)))
        )
        out_c, lse_c = stage(q_c, k_c, v_c, split.q_heads(u, c))
        returned = group.exchange_rows(back_send, [out_c, lse_c], back_recv)
        returns.append((c, returned))
    for c, (transfer, (_, into)) in returns:
        group.comm.wait(transfer)
        for j in range(group.size):
            part_out, part_lse = back_recv.views(into, j)
            out[:, _s(split.q_heads(j, c))] = part_out
            lse[:, _s(split.q_heads(j, c))] = part_lse
    return out, lse


def ulysses_backward(
    group: Group, kern: Kernels, dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, stage: Callable
) -> tuple[Any, Any, Any]:
    """This member's ``(dq, dk, dv)``; ``stage(dout, q, k, v, out, lse, heads)`` computes one chunk's gradients.

    A replicated key/value head's gradients arrive from each replica and are
    summed in member order.
    """
    xp, split, u, seq = kern.xp, group.split, group.member, group.seq
    b, hq, length, d = q.shape
    hk, dv, cd, acc = k.shape[1], v.shape[3], kern.dtype, kern.acc
    ld = lse.dtype
    nq = split.per_rank // split.chunks
    mine, lengths = seq.lengths[u], seq.lengths
    kinds = [(dv, cd), (d, cd), (dv, cd), (None, ld), (d, cd), (dv, cd)]
    heads = [nq, nq, nq, nq, 1, 1]
    send = Packing(_specs(b, heads, [mine] * group.size, kinds))
    recv = Packing(_specs(b, heads, lengths, kinds))
    back_kinds = [(d, acc), (d, acc), (dv, acc)]
    back_send = Packing(_specs(b, [nq, 1, 1], lengths, back_kinds))
    back_recv = Packing(_specs(b, [nq, 1, 1], [mine] * group.size, back_kinds))

    def parts_in(c: int) -> Callable[[int], list[Any]]:
        def parts(j: int) -> list[Any]:
            qh, kh = split.q_heads(j, c), split.kv_heads(j, c)
            return [dout[:, _s(qh)], q[:, _s(qh)], out[:, _s(qh)], lse[:, _s(qh)], k[:, _s(kh)], v[:, _s(kh)]]

        return parts

    dq = xp.full((b, hq, length, d), np.nan, acc)
    dk = xp.zeros((b, hk, length, d), acc)
    dvv = xp.zeros((b, hk, length, dv), acc)
    incoming = group.exchange(send, parts_in(0), recv)
    returns = []
    for c in range(split.chunks):
        group.comm.wait(incoming[0])
        received = [recv.views(incoming[1][1], i) for i in range(group.size)]
        if c + 1 < split.chunks:
            incoming = group.exchange(send, parts_in(c + 1), recv)
        shapes = [(nq, dv, cd), (nq, d, cd), (nq, dv, cd), (nq, None, ld), (1, d, cd), (1, dv, cd)]
        whole = []
        for n, (h, w, dt) in enumerate(shapes):
            shape = (b, h, seq.length) if w is None else (b, h, seq.length, w)
            whole.append(group.scatter_rows([r[n] for r in received], shape, dt))
        dout_c, q_c, out_c, lse_c, k_c, v_c = whole
        grads = stage(dout_c, q_c, k_c, v_c, out_c, lse_c, split.q_heads(u, c))
        returned = group.exchange_rows(back_send, list(grads), back_recv)
        returns.append((c, returned))
    for c, (transfer, (_, into)) in returns:
        group.comm.wait(transfer)
        for j in range(group.size):
            part_dq, part_dk, part_dv = back_recv.views(into, j)
            dq[:, _s(split.q_heads(j, c))] = part_dq
            dk[:, _s(split.kv_heads(j, c))] += part_dk
            dvv[:, _s(split.kv_heads(j, c))] += part_dv
    return dq, dk, dvv
