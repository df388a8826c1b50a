"""Context parallelism: exact attention over a sequence sharded across ranks, in four modes.

:func:`context_parallel_attention` (and its backward) is the one entry;
``mode`` picks how the work is spread (``docs/context_parallel.md`` compares
them):

* ``"ring"``: K/V shards travel between ranks (``ring_attention`` is this
  mode's older spelling);
* ``"ulysses"``: an all-to-all over heads (DeepSpeed-Ulysses);
* ``"hybrid"``: Ulysses inside groups, a ring across them (USP);
* ``"allgather"``: every rank gathers the K/V shards it needs at once.

Modules, bottom up: :mod:`.sharding` (how a sequence is cut),
:mod:`.selection` (which key blocks each query block needs: the sparse
hook), :mod:`.plan` (the kernel calls of every rank pair, and which pairs
need anything), :mod:`.heads` (Ulysses' head split), :mod:`.engine` (the
ring schedules and the all-gather), :mod:`.ulysses` (the all-to-alls),
:mod:`.arguments` (checks and the agreement across ranks), :mod:`.modes`
and :mod:`.attention` (the public functions).
"""

from __future__ import annotations

from npsparseattn.context_parallel.arguments import MODES
from npsparseattn.context_parallel.attention import context_parallel_attention, context_parallel_attention_backward
from npsparseattn.context_parallel.sharding import SHARDINGS, shard, shard_lengths, shard_pieces, unshard

__all__ = [
    "MODES",
    "SHARDINGS",
    "context_parallel_attention",
    "context_parallel_attention_backward",
    "shard",
    "shard_lengths",
    "shard_pieces",
    "unshard",
]
