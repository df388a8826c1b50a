"""K/V across the members of a ring: the ring schedules and the all-gather, forward and backward.

Every member holds its queries and its own K/V shard; at step ``t`` member
``r`` computes its queries against the shard of member ``src = (r - t) mod R``
with the calls of the :class:`~npsparseattn.context_parallel.plan.Plan`, and
merges each block's ``(out, lse)`` into its accumulators with
:func:`~npsparseattn.merge.merge_into` (float32, float64 for float64
inputs) in that fixed order, so results do not depend on when data arrive.

Three ways to bring the shards (every one posts the next transfer *before*
computing on the current block, and every wait has the communicator's
deadline):

* **relay ring** (every member pair needs something: dense attention, causal
  zigzag): each member forwards the shard it holds to the next member
  (``Isend``/``Irecv``, NCCL send/recv), neighbour traffic only; in the
  backward the ``dk``/``dv`` accumulators travel with the shards and arrive
  home after ``R`` steps;
* **direct ring** (some pairs need nothing: a sparse layout, a window,
  causal contiguous shards, documents): at step ``t`` member ``r`` sends its
  *own* shard straight to member ``r + t`` only if that member needs it, and
  receives from ``r - t`` only if it needs that shard, so nothing is sent
  for a skipped step; in the backward each partial ``dk``/``dv`` goes back
  to its owner at once and the owner sums them in step order;
* **all-gather**: every member gathers every shard it needs in one
  collective (``Allgatherv``, or ``Alltoallv`` with zero counts for the
  pairs that need nothing) posted before its own block is computed; the
  backward returns the partial ``dk``/``dv`` with one ``Alltoallv`` and the
  owner sums them in step order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from npsparseattn._checks import clamp_window
from npsparseattn._dispatch import Implementation
from npsparseattn._dtypes import lse_dtype
from npsparseattn._glue import kernel_array
from npsparseattn.context_parallel.plan import BlockCall, Plan
from npsparseattn.distributed.base import Communicator, Transfer
from npsparseattn.merge import merge_into

KV_TAG, GRAD_TAG = 0, 1


class Kernels:
    """The per-block compute: the registry's dense (and sparse) attention kernels on compute-dtype arrays.

    ``acc`` is the accumulators' dtype (float32, float64 for float64 inputs).
    """

    def __init__(
        self,
        dense: Implementation,
        sparse: Implementation | None,
        dtype: Any,
        scale: float,
        xp: Any,
        sparse_options: dict[str, Any] | None = None,
    ):
        self.dense, self.sparse = dense, sparse
        self.sparse_options = sparse_options or {}
        self.dtype = dense.compute_dtype(dtype)
        self.acc = lse_dtype(dtype)
        self.scale = scale
        self.xp = xp

    def array(self, x: Any) -> Any:
        """``x`` C-contiguous in the compute dtype (one kernel signature for every call)."""
        return kernel_array(x, self.dtype, False)

    def lse(self, lse: Any) -> Any:
        """The global ``lse`` as the backward kernels read it (float32, float64 for float64)."""
        return self.xp.ascontiguousarray(lse, dtype=lse_dtype(self.dtype))

    def _visibility(self, q: Any, k: Any, call: BlockCall) -> dict[str, Any]:
        left, right = clamp_window(call.left, call.right, q.shape[2], k.shape[2], call.offset)
        return dict(scale=self.scale, offset=call.offset, left=left, right=right)

    def _sparse(self, q: Any, k: Any, call: BlockCall) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The sparse kernels' index arguments (a tuple spread, else one) and keywords for ``call``."""
        args = call.sparse if isinstance(call.sparse, tuple) else (call.sparse,)
        return args, {**self.sparse_options, **self._visibility(q, k, call)}

    def forward(self, q: Any, k: Any, v: Any, call: BlockCall) -> tuple[Any, Any]:
        """One call's ``(out, lse)``; ``k``/``v`` are the call's key rows."""
        k, v = self.array(k), self.array(v)
        if call.sparse is None:
            return self.dense.module.forward(q, k, v, **self._visibility(q, k, call))
        args, options = self._sparse(q, k, call)
        return self.sparse.module.forward(q, k, v, *args, **options)

    def backward(self, dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, call: BlockCall) -> tuple[Any, ...]:
        """One call's ``(dq, dk, dv)`` with the final ``out``/``lse`` of its query rows."""
        k, v = self.array(k), self.array(v)
        if call.sparse is None:
            return self.dense.module.backward(dout, q, k, v, out, lse, **self._visibility(q, k, call))
        args, options = self._sparse(q, k, call)
        return self.sparse.module.backward(dout, q, k, v, out, lse, *args, **options)


@dataclass
class Ring:
    """The members K/V travel between: a communicator (``None`` for a ring of one), the plan, this member."""

    comm: Communicator | None
    plan: Plan
    rank: int

    @property
    def size(self) -> int:
        return self.plan.size

    @property
    def relay(self) -> bool:
        """Forward shards neighbour to neighbour (every pair needs something), else send them directly."""
        return self.plan.dense

    def needs(self, r: int, s: int) -> bool:
        return bool(self.plan.needs[r % self.size, s % self.size])


class _Slots:
    """Two receive buffers per travelling array, as large as the largest member's shard; views shaped per member."""

    def __init__(self, xp: Any, dtype: Any, shape_of: Any, widths: tuple[int, ...], size: int):
        self.shape_of, self.widths = shape_of, widths
        largest = max(int(np.prod(shape_of(m, 1))) for m in range(size))
        self.flat = [[xp.empty(largest * w, dtype) for w in widths] for _ in range(2)]

    def view(self, slot: int, member: int) -> list[Any]:
        out = []
        for flat, w in zip(self.flat[slot], self.widths):
            shape = self.shape_of(member, w)
            out.append(flat[: int(np.prod(shape))].reshape(shape))
        return out


def _post_kv(ring: Ring, step: int, held: list[Any], own: list[Any], slots: _Slots) -> tuple[Transfer | None, Any]:
    """Post the transfer that brings member ``r - step``'s shard; returns ``(transfer, incoming arrays or None)``."""
    r, size, comm = ring.rank, ring.size, ring.comm
    src = (r - step) % size
    if ring.relay:
        incoming = slots.view(step % 2, src)
        return comm.exchange(held, (r + 1) % size, incoming, (r - 1) % size, tag=KV_TAG), incoming
    dest = (r + step) % size
    send = own if ring.needs(dest, r) else []
    incoming = slots.view(step % 2, src) if ring.needs(r, src) else []
    if not send and not incoming:
        return None, None
    transfer = comm.exchange(send, dest if send else None, incoming, src if incoming else None, tag=KV_TAG)
    return transfer, (incoming or None)


def ring_forward(ring: Ring, kern: Kernels, q: Any, k: Any, v: Any) -> tuple[Any, Any]:
    """This member's ``(out, lse)`` accumulators; ``q``, ``k``, ``v`` (B, H, L_local, X) in the compute dtype."""
    xp, acc, plan, r = kern.xp, kern.acc, ring.plan, ring.rank
    b, hq, length = q.shape[:3]
    out = xp.zeros((b, hq, length, v.shape[3]), acc)
    lse = xp.full((b, hq, length), -np.inf, acc)
    own = [kern.array(k), kern.array(v)]
    slots = _Slots(
        xp, kern.dtype, lambda m, w: (b, k.shape[1], plan.lengths[m], w), (k.shape[3], v.shape[3]), ring.size
    )
    held: Any = own
    rows: dict[tuple[int, int], Any] = {}
    for step in range(ring.size):
        src = (r - step) % ring.size
        transfer, incoming = None, None
        if step + 1 < ring.size:
            transfer, incoming = _post_kv(ring, step + 1, held, own, slots)
        if held is not None and ring.needs(r, src):
            for call in plan.calls(r, src):
                key = (call.q.start, call.q.stop)
                if key not in rows:
                    rows[key] = kern.array(q[:, :, call.q])
                block_out, block_lse = kern.forward(rows[key], held[0][:, :, call.k], held[1][:, :, call.k], call)
                merge_into(out[:, :, call.q], lse[:, :, call.q], block_out, block_lse)
        if transfer is not None:
            ring.comm.wait(transfer)
        held = incoming
    return out, lse


class _Rows:
    """The backward's per-call query-side arrays (dout, q, out, lse rows), made once per row range."""

    def __init__(self, kern: Kernels, dout: Any, q: Any, out: Any, lse: Any):
        self.kern, self.arrays, self.lse, self.cache = kern, (dout, q, out), lse, {}

    def __call__(self, rows: slice) -> tuple[Any, Any, Any, Any]:
        key = (rows.start, rows.stop)
        if key not in self.cache:
            parts = [self.kern.array(x[:, :, rows]) for x in self.arrays]
            self.cache[key] = (*parts, self.kern.lse(self.lse[:, :, rows]))
        return self.cache[key]


def _block_backward(kern: Kernels, calls: list[BlockCall], rows: _Rows, held: list[Any], dq: Any, grads: list[Any]):
    """Add the calls' contributions: ``dq`` rows, and ``dk``/``dv`` of the held shard into ``grads``."""
    for call in calls:
        dout_c, q_c, out_c, lse_c = rows(call.q)
        dq_c, dk_c, dv_c = kern.backward(dout_c, q_c, held[0][:, :, call.k], held[1][:, :, call.k], out_c, lse_c, call)
        dq[:, :, call.q] += dq_c
        grads[0][:, :, call.k] += dk_c
        grads[1][:, :, call.k] += dv_c


def ring_backward(
    ring: Ring, kern: Kernels, dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any
) -> tuple[Any, Any, Any]:
    """This member's ``(dq, dk, dv)`` accumulators (``acc`` dtype) with the final ``out``/``lse``."""
    xp, acc, plan, r, size = kern.xp, kern.acc, ring.plan, ring.rank, ring.size
    b, hk = q.shape[0], k.shape[1]
    widths = (k.shape[3], v.shape[3])

    def shape_of(m: int, w: int) -> tuple[int, ...]:
        return (b, hk, plan.lengths[m], w)

    def zeros(m: int) -> list[Any]:
        return [xp.zeros(shape_of(m, w), acc) for w in widths]

    rows = _Rows(kern, dout, q, out, lse)
    dq = xp.zeros(q.shape, acc)
    own = [kern.array(k), kern.array(v)]
    slots = _Slots(xp, kern.dtype, shape_of, widths, size)
    held: Any = own
    relay = ring.relay and size > 1
    mine = None if relay else zeros(r)
    pending: Any = None  # the gradient transfer posted at the previous step, and its receive buffers
    for step in range(size):
        src = (r - step) % size
        transfer, incoming = None, None
        if step + 1 < size:
            transfer, incoming = _post_kv(ring, step + 1, held, own, slots)
        block = mine if step == 0 and not relay else zeros(src)
        if held is not None and ring.needs(r, src):
            _block_backward(kern, plan.calls(r, src), rows, held, dq, block)
        if relay:
            # the accumulators of shard src travel on; the last step sends them home
            if pending is not None:
                ring.comm.wait(pending[0])
                for g, arrived in zip(block, pending[1]):
                    g += arrived
            arriving = zeros((r - step - 1) % size)
            pending = (ring.comm.exchange(block, (r + 1) % size, arriving, (r - 1) % size, tag=GRAD_TAG), arriving)
        elif step > 0:
            pending = _return_partial(ring, step, block, pending, mine, zeros)
        if transfer is not None:
            ring.comm.wait(transfer)
        held = incoming
    if relay:
        ring.comm.wait(pending[0])
        mine = pending[1]
    elif pending is not None:
        _add_arrived(ring, pending, mine)
    return dq, mine[0], mine[1]


def _add_arrived(ring: Ring, pending: tuple[Transfer | None, Any], mine: list[Any]) -> None:
    transfer, arriving = pending
    if transfer is not None:
        ring.comm.wait(transfer)
    if arriving:
        for g, arrived in zip(mine, arriving):
            g += arrived


def _return_partial(ring: Ring, step: int, block: list[Any], pending: Any, mine: list[Any], zeros: Any) -> Any:
    """Direct ring: send the partial ``dk``/``dv`` of step ``step`` to its owner, receive one for this shard.

    The partial that arrived for the previous step is added first, so the
    owner sums them in step order.
    """
    r, size = ring.rank, ring.size
    src, helper = (r - step) % size, (r + step) % size
    if pending is not None:
        _add_arrived(ring, pending, mine)
    send = block if ring.needs(r, src) else []
    arriving = zeros(r) if ring.needs(helper, r) else []
    if not send and not arriving:
        return None
    transfer = ring.comm.exchange(send, src if send else None, arriving, helper if arriving else None, tag=GRAD_TAG)
    return transfer, arriving


# --------------------------------------------------------------------------- all-gather


def _flat_kv(xp: Any, k: Any, v: Any) -> Any:
    return xp.concatenate([k.reshape(-1), v.reshape(-1)])


def _post_gather(ring: Ring, xp: Any, own: Any, sizes: list[int]) -> tuple[Transfer, Any, list[int]]:
    """Post the all-gather of the K/V (or gradient) buffers this member needs; returns the receive buffer, offsets."""
    r, size = ring.rank, ring.size
    displs = [int(x) for x in np.cumsum([0, *sizes[:-1]])]
    recv = xp.empty(sum(sizes), own.dtype)
    if ring.plan.dense:
        return ring.comm.allgatherv(own, recv, sizes), recv, displs
    send_counts = [own.size if j != r and ring.needs(j, r) else 0 for j in range(size)]
    recv_counts = [sizes[i] if i != r and ring.needs(r, i) else 0 for i in range(size)]
    transfer = ring.comm.alltoallv(own, send_counts, [0] * size, recv, recv_counts, displs)
    return transfer, recv, displs


def _kv_views(flat: Any, at: int, shape_k: tuple[int, ...], shape_v: tuple[int, ...]) -> list[Any]:
    nk, nv = int(np.prod(shape_k)), int(np.prod(shape_v))
    return [flat[at : at + nk].reshape(shape_k), flat[at + nk : at + nk + nv].reshape(shape_v)]


def gather_forward(ring: Ring, kern: Kernels, q: Any, k: Any, v: Any) -> tuple[Any, Any]:
    """:func:`ring_forward` with the shards gathered by one collective, merged in the ring's step order."""
    xp, acc, plan, r, size = kern.xp, kern.acc, ring.plan, ring.rank, ring.size
    b, hq, length = q.shape[:3]
    hk, widths = k.shape[1], (k.shape[3], v.shape[3])
    out = xp.zeros((b, hq, length, v.shape[3]), acc)
    lse = xp.full((b, hq, length), -np.inf, acc)
    own = [kern.array(k), kern.array(v)]
    sizes = [b * hk * plan.lengths[m] * sum(widths) for m in range(size)]
    transfer, recv, displs = (None, None, None)
    if size > 1:
        transfer, recv, displs = _post_gather(ring, xp, _flat_kv(xp, *own), sizes)
    rows: dict[tuple[int, int], Any] = {}
    for step in range(size):
        src = (r - step) % size
        if step == 1:
            ring.comm.wait(transfer)
        if not ring.needs(r, src):
            continue
        held = own if step == 0 else _kv_views(recv, displs[src], *(((b, hk, plan.lengths[src], w)) for w in widths))
        for call in plan.calls(r, src):
            key = (call.q.start, call.q.stop)
            if key not in rows:
                rows[key] = kern.array(q[:, :, call.q])
            block_out, block_lse = kern.forward(rows[key], held[0][:, :, call.k], held[1][:, :, call.k], call)
            merge_into(out[:, :, call.q], lse[:, :, call.q], block_out, block_lse)
    return out, lse


def gather_backward(
    ring: Ring, kern: Kernels, dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any
) -> tuple[Any, Any, Any]:
    """:func:`ring_backward` over gathered shards; partial ``dk``/``dv`` return to their owners in one all-to-all."""
    xp, acc, plan, r, size = kern.xp, kern.acc, ring.plan, ring.rank, ring.size
    b, hk, widths = q.shape[0], k.shape[1], (k.shape[3], v.shape[3])

    def shapes(m: int) -> list[tuple[int, ...]]:
        return [(b, hk, plan.lengths[m], w) for w in widths]

    rows = _Rows(kern, dout, q, out, lse)
    dq = xp.zeros(q.shape, acc)
    own = [kern.array(k), kern.array(v)]
    sizes = [b * hk * plan.lengths[m] * sum(widths) for m in range(size)]
    transfer, recv, displs = (None, None, None)
    if size > 1:
        transfer, recv, displs = _post_gather(ring, xp, _flat_kv(xp, *own), sizes)
    mine = [xp.zeros(s, acc) for s in shapes(r)]
    if ring.needs(r, r):
        _block_backward(kern, plan.calls(r, r), rows, own, dq, mine)
    if size == 1:
        return dq, mine[0], mine[1]
    ring.comm.wait(transfer)
    partials = xp.zeros(sum(sizes), acc)
    for step in range(1, size):
        src = (r - step) % size
        if ring.needs(r, src):
            held = _kv_views(recv, displs[src], *shapes(src))
            _block_backward(kern, plan.calls(r, src), rows, held, dq, _kv_views(partials, displs[src], *shapes(src)))
    send_counts = [sizes[j] if j != r and ring.needs(r, j) else 0 for j in range(size)]
    recv_counts = [sizes[r] if i != r and ring.needs(i, r) else 0 for i in range(size)]
    arrived = xp.empty(sizes[r] * size, acc)
    at = [sizes[r] * i for i in range(size)]
    ring.comm.wait(ring.comm.alltoallv(partials, send_counts, displs, arrived, recv_counts, at))
    for step in range(1, size):
        helper = (r + step) % size
        if recv_counts[helper]:
            for g, part in zip(mine, _kv_views(arrived, at[helper], *shapes(r))):
                g += part
    return dq, mine[0], mine[1]
