"""Up-front agreement of arguments across ranks, before any data moves.

Every rank describes its call by a few integer fields (shapes except the local
length, dtype, options) and its local length.  One ``allreduce(max)`` of
``[fields, -fields, lengths one-hot, failed one-hot]`` gives every rank the
maximum and minimum of each field, every rank's length and which ranks failed
their local checks, so every rank reaches the same verdict and raises the same
error: nobody is left waiting for a peer that has already given up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from npsparseattn.distributed.base import Communicator


@dataclass(frozen=True)
class Field:
    """One integer that must be equal on every rank, with a way to show its value."""

    name: str
    value: int
    show: Callable[[int], str] = str


class RankArgumentError(ValueError):
    """Arguments differ across ranks, or some rank's arguments are invalid."""


def agree(comm: Communicator, op: str, fields: list[Field], length: int, *, failed: bool = False) -> list[int]:
    """Check that ``fields`` are equal on all ranks; return every rank's ``length``.

    ``fields`` must be the same list of names on every rank.  ``failed=True``
    says this rank's arguments failed a local check (its field values are then
    ignored): every other rank raises :class:`RankArgumentError` naming it,
    and this rank gets ``[]`` back and re-raises its own error.  ``op`` names
    the operation in messages.
    """
    size, rank, n = comm.size, comm.rank, len(fields)
    values = np.array([f.value for f in fields], dtype=np.int64)
    lengths = np.zeros(size, dtype=np.int64)
    bad_ranks = np.zeros(size, dtype=np.int64)
    if failed:
        bad_ranks[rank] = 1
    else:
        lengths[rank] = length
    reduced = comm.allreduce(np.concatenate([values, -values, lengths, bad_ranks]), "max")
    bad = [int(r) for r in np.flatnonzero(reduced[2 * n + size :])]
    if failed:
        return []
    if bad:
        raise RankArgumentError(
            f"{op}: the arguments on rank(s) {', '.join(map(str, bad))} of {size} are invalid "
            f"(see the error raised there); no data was exchanged"
        )
    problems = []
    for i, field in enumerate(fields):
        hi, lo = int(reduced[i]), -int(reduced[n + i])
        if hi != lo:
            problems.append(f"{field.name} differs across ranks (from {field.show(lo)} to {field.show(hi)})")
    if problems:
        raise RankArgumentError(
            f"{op}: every rank must pass the same shapes (except the local sequence length), dtype and options; "
            + "; ".join(problems)
        )
    return [int(x) for x in reduced[2 * n : 2 * n + size]]
