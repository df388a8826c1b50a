"""How Ulysses spreads attention heads over a group of ranks (GQA included).

After the all-to-all every rank of a Ulysses group of ``U`` ranks holds the
whole (group's) sequence for ``Hq / U`` query heads and the key/value heads
they read:

* ``Hk % U == 0``: each rank gets ``Hk / U`` key/value heads and the
  ``Hq / U`` query heads of their groups; nothing is duplicated;
* ``U % Hk == 0`` (fewer key/value heads than ranks, MQA included): each
  rank's query heads share one key/value head, which is *replicated* to the
  ``U / Hk`` ranks that need it (as Megatron-LM and yunchang/USP do); its
  gradients come back from each replica and are summed in rank order;
* anything else (e.g. ``Hk = 2`` on ``U = 3``) is refused: a rank's query
  heads would need a ragged set of key/value heads.  Use a ``ulysses_size``
  that divides or is divided by ``Hk``, or the ring or all-gather mode.

The work of a rank is cut into *chunks*, one key/value head each (with its
query heads), so the all-to-all of the next chunk runs while the current one
is computed.
"""

from __future__ import annotations

from dataclasses import dataclass


def head_rule_error(n_heads: int, n_kv_heads: int, group: int) -> str | None:
    """Why ``group`` ranks cannot share ``n_heads`` query / ``n_kv_heads`` key-value heads, or None."""
    if n_heads % group:
        return (
            f"Ulysses spreads the {n_heads} query heads over {group} ranks, so the heads must be a multiple of the "
            f"group size; use a ulysses_size that divides {n_heads}, or mode='ring' or 'allgather'"
        )
    if n_kv_heads % group and group % n_kv_heads:
        return (
            f"Ulysses on {group} ranks needs the key/value heads ({n_kv_heads}) to be a multiple or a divisor of "
            f"the group size (each rank's query heads must share whole key/value heads); use mode='allgather' or "
            f"'ring', or a ulysses_size that divides {n_kv_heads} or is a multiple of it"
        )
    return None


@dataclass(frozen=True)
class HeadSplit:
    """The heads each rank of a Ulysses group computes, cut into pipeline chunks.

    >>> split = HeadSplit(8, 2, 4)          # GQA 8/2 on 4 ranks: each key/value head replicated twice
    >>> [split.kv_heads(u, 0) for u in range(4)], split.q_heads(3, 0), split.chunks
    ([range(0, 1), range(0, 1), range(1, 2), range(1, 2)], range(6, 8), 1)
    >>> HeadSplit(8, 4, 2).q_heads(1, 1), HeadSplit(8, 4, 2).kv_heads(1, 1)   # 2 chunks per rank
    (range(6, 8), range(3, 4))
    """

    n_heads: int
    n_kv_heads: int
    group: int

    def __post_init__(self) -> None:
        error = head_rule_error(self.n_heads, self.n_kv_heads, self.group)
        if error:
            raise ValueError(error)

    @property
    def replicated(self) -> bool:
        """Each key/value head is held by ``group / n_kv_heads`` ranks."""
        return self.n_kv_heads % self.group != 0

    @property
    def chunks(self) -> int:
        """Pipeline chunks per rank: one per key/value head it holds."""
        return 1 if self.replicated else self.n_kv_heads // self.group

    @property
    def per_rank(self) -> int:
        """Query heads per rank."""
        return self.n_heads // self.group

    def q_heads(self, member: int, chunk: int) -> range:
        """Global query heads of ``member``'s chunk ``chunk``."""
        size = self.per_rank // self.chunks
        first = member * self.per_rank + chunk * size
        return range(first, first + size)

    def kv_heads(self, member: int, chunk: int) -> range:
        """Global key/value heads of ``member``'s chunk ``chunk`` (one head)."""
        if self.replicated:
            head = member // (self.group // self.n_kv_heads)
        else:
            head = member * (self.n_kv_heads // self.group) + chunk
        return range(head, head + 1)
