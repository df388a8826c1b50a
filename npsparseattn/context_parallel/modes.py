"""The four modes as compositions of a Ulysses group (all-to-all over heads) and a ring (K/V across members).

=============  =====================  ==========================================
mode           Ulysses group           ring of members
=============  =====================  ==========================================
``ring``       none                    every rank (relay or direct schedule)
``allgather``  none                    every rank, shards gathered at once
``ulysses``    all ranks               one member: the whole sequence
``hybrid``     ``ulysses_size`` ranks  the groups (ranks ``u, u + U, ...``)
=============  =====================  ==========================================

In hybrid mode rank ``r`` is member ``r % U`` of Ulysses group ``r // U``
and member ``r // U`` of ring ``r % U``; both sub-communicators come from
:meth:`~npsparseattn.distributed.Communicator.split` and are kept for later
calls on the same communicator.  A Ulysses group's members hold the union of
their shards after the all-to-all, so the ring's members are the groups,
each with the sorted union of its ranks' pieces (zigzag shards of
consecutive ranks stay balanced).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any

import numpy as np

from npsparseattn.context_parallel.arguments import Setup
from npsparseattn.context_parallel.engine import Ring, gather_backward, gather_forward, ring_backward, ring_forward
from npsparseattn.context_parallel.heads import HeadSplit
from npsparseattn.context_parallel.plan import Plan
from npsparseattn.context_parallel.ulysses import Group, SeqMap, ulysses_backward, ulysses_forward
from npsparseattn.distributed.base import Communicator

_SUBGROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LAYOUTS: OrderedDict = OrderedDict()  # the last few calls' pieces and plans: training repeats its arguments
_KEEP = 8


def subgroups(comm: Communicator, group: int) -> tuple[Communicator | None, Communicator | None]:
    """``(Ulysses group, ring)`` communicators of this rank for groups of ``group`` ranks (``None``: a group of one)."""
    if group == 1:
        return None, comm if comm.size > 1 else None
    if group == comm.size:
        return comm, None
    cache = _SUBGROUPS.setdefault(comm, {})
    if group not in cache:
        g, u = divmod(comm.rank, group)
        cache[group] = (comm.split(g, u), comm.split(u, g))
    return cache[group]


class _Plans:
    """One plan per set of query heads (a pattern per head differs between them; otherwise one plan serves all)."""

    def __init__(self, setup: Setup, pieces: list[list[tuple[int, int]]]):
        self.pieces, self.left, self.right = pieces, setup.problem.left, setup.problem.right
        self.offsets, self.selection = setup.offsets, setup.selection
        self.found: dict[Any, Plan] = {}

    def same_inputs(self, setup: Setup) -> bool:
        """The documents and the sparse pattern are those this was planned for (not just of the same fingerprint)."""
        offsets, selection = setup.offsets, setup.selection
        if (offsets is None) != (self.offsets is None) or (selection is None) != (self.selection is None):
            return False
        same_docs = offsets is None or np.array_equal(offsets, self.offsets)
        return same_docs and selection == self.selection

    def __call__(self, heads: range) -> Plan:
        key = (heads.start, heads.stop) if self.selection is not None and self.selection.heads > 1 else None
        if key not in self.found:
            self.found[key] = Plan(self.pieces, self.left, self.right, self.offsets, self.selection, heads)
        return self.found[key]


def _layout(setup: Setup) -> tuple[Any, Any, SeqMap | None, int, int, _Plans]:
    """The sub-communicators, this rank's group and member, its sequence map and the plans of the ring.

    Pieces, maps and plans depend only on arguments every rank agreed on;
    the last few are kept (keyed by those arguments), so a training loop
    plans once.
    """
    comm, group, p = setup.comm, setup.ulysses_size, setup.problem
    ulysses, ring = subgroups(comm, group)
    g, u = divmod(comm.rank, group)
    key = (comm.size, comm.rank, group, tuple(setup.lengths), setup.sharding, setup.block, p.left, p.right,
           setup.fingerprints)  # fmt: skip
    found = _LAYOUTS.get(key)
    if found is None or not found[1].same_inputs(setup):
        everyone = [setup.pieces(r) for r in range(comm.size)]
        members = everyone
        if group > 1:
            members = [SeqMap(everyone[start : start + group]).pieces for start in range(0, comm.size, group)]
        seq = None if group == 1 else SeqMap(everyone[g * group : (g + 1) * group])
        found = _LAYOUTS[key] = (seq, _Plans(setup, members))
        while len(_LAYOUTS) > _KEEP:
            _LAYOUTS.popitem(last=False)
    _LAYOUTS.move_to_end(key)
    return ulysses, ring, found[0], g, u, found[1]


def forward(setup: Setup) -> tuple[Any, Any]:
    """This rank's ``(out, lse)`` in canonical form, accumulated in float32 (float64 for float64 inputs)."""
    p, kern = setup.problem, setup.kernels
    ulysses, ring_comm, seq, g, u, plans = _layout(setup)
    q, k, v = kern.array(p.q), kern.array(p.k), kern.array(p.v)
    run = gather_forward if setup.mode == "allgather" else ring_forward
    if ulysses is None:
        return run(Ring(ring_comm, plans(range(p.n_heads)), g), kern, q, k, v)

    def stage(q_c: Any, k_c: Any, v_c: Any, heads: range) -> tuple[Any, Any]:
        return ring_forward(Ring(ring_comm, plans(heads), g), kern, q_c, k_c, v_c)

    group = Group(ulysses, u, HeadSplit(p.n_heads, p.k.shape[1], setup.ulysses_size), seq, kern.xp)
    return ulysses_forward(group, kern, q, k, v, stage)


def backward(setup: Setup) -> tuple[Any, Any, Any]:
    """This rank's ``(dq, dk, dv)`` in canonical form (float32, float64 for float64 inputs)."""
    p, kern, grads = setup.problem, setup.kernels, setup.grads
    ulysses, ring_comm, seq, g, u, plans = _layout(setup)
    q, k, v = kern.array(p.q), kern.array(p.k), kern.array(p.v)
    dout, out, lse = kern.array(grads.dout), kern.array(grads.out), kern.lse(grads.lse)
    run = gather_backward if setup.mode == "allgather" else ring_backward
    if ulysses is None:
        return run(Ring(ring_comm, plans(range(p.n_heads)), g), kern, dout, q, k, v, out, lse)

    def stage(dout_c: Any, q_c: Any, k_c: Any, v_c: Any, out_c: Any, lse_c: Any, heads: range) -> tuple[Any, ...]:
        return ring_backward(Ring(ring_comm, plans(heads), g), kern, dout_c, q_c, k_c, v_c, out_c, lse_c)

    group = Group(ulysses, u, HeadSplit(p.n_heads, p.k.shape[1], setup.ulysses_size), seq, kern.xp)
    return ulysses_backward(group, kern, dout, q, k, v, out, lse, stage)
