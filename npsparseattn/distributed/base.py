"""The communicator interface context-parallel attention talks through, and its errors.

A :class:`Communicator` is a group of ``size`` ranks.  Context-parallel
attention (ring, Ulysses, hybrid, all-gather) needs only a few operations
from it, every one non-blocking and finished by :meth:`~Communicator.wait`:

* :meth:`~Communicator.exchange`: send some arrays to one rank and receive
  some from another (either side may be empty); :meth:`~Communicator.shift`
  is the exchange with the next and previous ranks of the ring;
* :meth:`~Communicator.alltoallv`: every rank sends a slice of one buffer to
  every rank (counts may differ, be zero, or overlap on the sending side);
* :meth:`~Communicator.allgatherv`: every rank receives every rank's buffer;
* :meth:`~Communicator.wait`: block until a transfer has completed, or raise
  :class:`RingTimeoutError` once ``timeout`` seconds have passed;
* :meth:`~Communicator.split` into sub-groups (hybrid mode),
  :meth:`~Communicator.allreduce` of a small host vector (argument checks,
  timings) and :meth:`~Communicator.barrier`.

Two engines implement it: :class:`~npsparseattn.distributed.MPIComm`
(mpi4py, NumPy arrays) and :class:`~npsparseattn.distributed.NCCLComm`
(``cupy.cuda.nccl``, CuPy arrays).  Every wait has a deadline, so a peer that
died or stalls ends the call with an error instead of a hang.  Each
communicator counts what it hands to the transport for other ranks
(:attr:`Communicator.traffic`), so tests and benchmarks can check that a
sparse schedule sends nothing for the steps it skips.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from npsparseattn._checks import is_int

TIMEOUT_ENV = "NPSPARSEATTN_RING_TIMEOUT"
DEFAULT_TIMEOUT = 300.0
REDUCE_OPS = ("sum", "min", "max")


class RingError(RuntimeError):
    """A ring collective failed (base class of the distributed errors)."""


class RingTimeoutError(RingError, TimeoutError):
    """A peer did not answer within the communicator's timeout (dead or stalled rank)."""


class RingPeerError(RingError):
    """The transport itself reported that a peer failed (e.g. MPI saw its process exit)."""


def default_timeout() -> float:
    """Seconds a wait may block: ``$NPSPARSEATTN_RING_TIMEOUT`` if set, else 300."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_TIMEOUT
    try:
        return check_timeout(float(raw))
    except ValueError as err:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}") from err


def check_timeout(timeout: Any) -> float:
    """A positive, finite number of seconds."""
    if isinstance(timeout, (bool, np.bool_)) or not isinstance(timeout, (int, float, np.integer, np.floating)):
        raise TypeError(f"timeout must be a number of seconds, got {timeout!r}")
    value = float(timeout)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"timeout must be a positive, finite number of seconds, got {value}")
    return value


SPIN_SECONDS = 0.05  # poll without sleeping for this long at the start of a wait
MAX_PAUSE = 1e-4  # then sleep between polls, growing from 10 us to this
_yield = getattr(os, "sched_yield", lambda: time.sleep(0))


def poll_until(done: Callable[[], bool], deadline: float, describe: Callable[[], str]) -> None:
    """Call ``done()`` until it returns True; raise :class:`RingTimeoutError` after ``deadline``.

    ``deadline`` is a :func:`time.monotonic` value.  MPI moves data only
    while some call polls it (a shared-memory all-to-all of a few MiB needs
    hundreds of polls), so the first :data:`SPIN_SECONDS` of a wait poll
    back to back, yielding the core to other runnable processes between
    polls; a longer wait (a peer still computing) sleeps between polls,
    growing from 10 us to :data:`MAX_PAUSE`, so it leaves the cores to ranks
    that compute and still polls often enough once the peer is there.
    (Sleeps of up to 1 ms made a 4 MiB ``Ialltoallv`` between two ranks take
    0.6 s instead of 10 ms.)
    """
    start, pause = time.monotonic(), 1e-5
    while not done():
        now = time.monotonic()
        if now >= deadline:
            raise RingTimeoutError(describe())
        if now - start < SPIN_SECONDS:
            _yield()
            continue
        time.sleep(pause)
        pause = min(2 * pause, MAX_PAUSE)


class Transfer:
    """Handle of a posted transfer (:meth:`Communicator.exchange`, ...); pass it to :meth:`Communicator.wait`.

    ``test()`` says whether it has completed; ``on_done``/``on_timeout`` run
    after a successful or timed-out wait; ``buffers`` are kept referenced
    until then (a GPU memory pool must not reuse them while a copy runs).
    """

    def __init__(
        self,
        what: str,
        test: Callable[[], bool],
        *,
        on_done: Callable[[], None] | None = None,
        on_timeout: Callable[[], None] | None = None,
        buffers: tuple[Any, ...] = (),
    ):
        self.what = what
        self.test = test
        self.buffers = buffers
        self.on_done = on_done
        self.on_timeout = on_timeout
        self.posted = time.monotonic()


@dataclass
class Traffic:
    """What a rank handed to the transport for *other* ranks: messages and payload bytes.

    A message is one array sent to one peer by :meth:`Communicator.exchange`
    (or :meth:`~Communicator.shift`), one non-empty slice sent to one peer by
    :meth:`~Communicator.alltoallv`, or this rank's buffer delivered to one
    peer by :meth:`~Communicator.allgatherv`; whatever stays on the rank is
    not counted.  Argument checks and barriers (``allreduce``) are not counted.
    """

    messages: int = 0
    bytes: int = 0

    def add(self, messages: int, nbytes: int) -> None:
        self.messages += int(messages)
        self.bytes += int(nbytes)

    def reset(self) -> None:
        self.messages = self.bytes = 0


def completed(what: str) -> Transfer:
    """A transfer with nothing to move: :meth:`Communicator.wait` returns at once."""
    return Transfer(what, lambda: True)


class Communicator(ABC):
    """A group of ``size`` processes; this one is ``rank``.

    Subclasses implement :meth:`allreduce` and :meth:`barrier`, the transfers
    they support (:meth:`exchange`, :meth:`alltoallv`, :meth:`allgatherv`,
    :meth:`split`; the defaults here serve a group of one) and set ``rank``,
    ``size``, ``timeout`` and ``kinds`` (the array kinds they move:
    ``"numpy"``, ``"cupy"``).
    """

    rank: int
    size: int
    timeout: float
    kinds: tuple[str, ...]

    @property
    def next_rank(self) -> int:
        """The rank this one sends to."""
        return (self.rank + 1) % self.size

    @property
    def prev_rank(self) -> int:
        """The rank this one receives from."""
        return (self.rank - 1) % self.size

    @property
    def traffic(self) -> Traffic:
        """Messages and bytes this rank has sent to other ranks (:class:`Traffic`); ``traffic.reset()`` zeroes it."""
        found = self.__dict__.get("_traffic")
        if found is None:
            found = self.__dict__["_traffic"] = Traffic()
        return found

    def share_traffic(self, parent: Communicator) -> None:
        """Count this communicator's transfers into ``parent``'s :attr:`traffic` (a sub-communicator of it)."""
        self.__dict__["_traffic"] = parent.traffic

    def shift(self, send: Sequence[Any], recv: Sequence[Any], *, tag: int = 0) -> Transfer:
        """Post sends of ``send`` to the next rank and receives into ``recv`` from the previous one.

        Arrays must be contiguous; ``recv[i]`` must match the shape and dtype
        of the previous rank's ``send[i]``.  ``tag`` (0-7) keeps independent
        streams of shifts apart.  Returns at once; call :meth:`wait` before
        reading ``recv`` or writing ``send``.
        """
        check_shift_arrays(send, recv)
        return self.exchange(send, self.next_rank, recv, self.prev_rank, tag=tag)

    def exchange(
        self, send: Sequence[Any], dest: int | None, recv: Sequence[Any], source: int | None, *, tag: int = 0
    ) -> Transfer:
        """Post sends of ``send`` to rank ``dest`` and receives into ``recv`` from rank ``source``.

        Either side may be empty (its peer ``None``): a rank that receives
        nothing posts nothing for it.  ``recv[i]`` must match what ``source``
        sends as its ``i``-th array to this rank with the same ``tag`` (0-7).
        Arrays must be C-contiguous.  Returns at once; call :meth:`wait`
        before reading ``recv`` or writing ``send``.
        """
        check_exchange(self, send, dest, recv, source, tag)
        if not send and not recv:
            return completed("empty exchange")
        raise NotImplementedError(f"{type(self).__name__} cannot exchange arrays between ranks")

    def alltoallv(
        self,
        send: Any,
        send_counts: Sequence[int],
        send_displs: Sequence[int],
        recv: Any,
        recv_counts: Sequence[int],
        recv_displs: Sequence[int],
    ) -> Transfer:
        """Post an all-to-all of slices of 1-D buffers (``MPI_Ialltoallv``'s meaning, counts in elements).

        Rank ``j`` receives ``send[send_displs[j] : send_displs[j] + send_counts[j]]``
        into ``recv[recv_displs[i] : recv_displs[i] + recv_counts[i]]`` of
        rank ``j``, where ``i`` is this rank.  Counts may differ per peer
        and be 0 (nothing is sent); send slices may overlap (one buffer sent
        to several ranks); receive slices may not.  ``send`` and ``recv``
        are C-contiguous 1-D arrays of one dtype.
        """
        check_alltoallv(self, send, send_counts, send_displs, recv, recv_counts, recv_displs)
        if self.size == 1:
            _local_copy(send, send_displs[0], recv, recv_displs[0], send_counts[0])
            return completed("all-to-all within one rank")
        raise NotImplementedError(f"{type(self).__name__} has no all-to-all")

    def allgatherv(self, send: Any, recv: Any, counts: Sequence[int]) -> Transfer:
        """Post an all-gather (``MPI_Iallgatherv``): rank ``i``'s ``send`` lands at ``recv[sum(counts[:i]):]``.

        ``counts[i]`` is rank ``i``'s ``send.size`` (every rank passes the
        same ``counts``); ``send`` and ``recv`` are C-contiguous 1-D arrays of
        one dtype, ``recv.size == sum(counts)``.
        """
        check_allgatherv(self, send, recv, counts)
        if self.size == 1:
            _local_copy(send, 0, recv, 0, counts[0])
            return completed("all-gather within one rank")
        raise NotImplementedError(f"{type(self).__name__} has no all-gather")

    def split(self, color: int, key: int) -> Communicator:
        """The sub-group of the ranks that pass the same ``color``, ranked by ``key`` (``MPI_Comm_split``).

        Collective: every rank calls it.  The default serves a group of one.
        """
        check_split(color, key)
        if self.size == 1:
            return self
        raise NotImplementedError(f"{type(self).__name__} cannot be split")

    def wait(self, transfer: Transfer) -> None:
        """Block until ``transfer`` has completed; :class:`RingTimeoutError` after ``timeout`` seconds."""
        deadline = transfer.posted + self.timeout
        try:
            poll_until(transfer.test, deadline, lambda: self._timeout_message(transfer.what))
        except RingTimeoutError:
            if transfer.on_timeout is not None:
                transfer.on_timeout()
            raise
        if transfer.on_done is not None:
            transfer.on_done()

    @abstractmethod
    def allreduce(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        """Element-wise ``op`` (``"sum"``, ``"min"``, ``"max"``) of a 1-D host vector over all ranks.

        Used for argument checks and timings, not for bulk data.  Raises
        :class:`RingTimeoutError` if a rank does not join within ``timeout``.
        """

    @abstractmethod
    def barrier(self) -> None:
        """Wait for every rank (with the same timeout as :meth:`wait`)."""

    def split_groups(self, color: int, key: int) -> tuple[list[int], int]:
        """The ranks (of this group, in new-rank order) that share this rank's ``color``, and this rank's new rank.

        One :meth:`allreduce` with the usual deadline: every rank is known to
        be present before an engine makes its blocking split call.
        """
        check_split(color, key)
        table = np.zeros(2 * self.size, dtype=np.int64)
        table[self.rank], table[self.size + self.rank] = color, key
        table = self.allreduce(table, "sum")
        colors, keys = table[: self.size], table[self.size :]
        members = sorted((int(keys[r]), r) for r in range(self.size) if colors[r] == color)
        ranks = [r for _, r in members]
        return ranks, ranks.index(self.rank)

    def _timeout_message(self, what: str) -> str:
        return (
            f"rank {self.rank} of {self.size}: {what} did not complete within {self.timeout:g} s; "
            f"a peer (rank {self.prev_rank} or {self.next_rank}, or one further along the ring) died "
            f"or stalls. Set the limit with the communicator's timeout= or ${TIMEOUT_ENV}."
        )


def _local_copy(send: Any, start: int, recv: Any, at: int, count: int) -> None:
    recv[at : at + count] = send[start : start + count]


def check_reduce(values: Any, op: Any) -> np.ndarray:
    """``values`` as a 1-D contiguous int64/float64 NumPy vector; ``op`` one of :data:`REDUCE_OPS`."""
    if op not in REDUCE_OPS:
        raise ValueError(f"op must be one of {', '.join(map(repr, REDUCE_OPS))}, got {op!r}")
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"values must be a 1-D vector, got shape {arr.shape}")
    if arr.dtype.kind in "biu":
        return np.ascontiguousarray(arr, dtype=np.int64)
    if arr.dtype.kind == "f":
        return np.ascontiguousarray(arr, dtype=np.float64)
    raise TypeError(f"values must hold integers or floats, got dtype {arr.dtype.name}")


def check_tag(tag: Any) -> int:
    """An int in ``[0, 8)``."""
    if not is_int(tag) or not 0 <= tag < 8:
        raise ValueError(f"tag must be an int in [0, 8), got {tag!r}")
    return int(tag)


def check_shift_arrays(send: Sequence[Any], recv: Sequence[Any]) -> None:
    """Same number of arrays on both sides, each C-contiguous."""
    if len(send) != len(recv):
        raise ValueError(f"shift needs as many receive buffers as sent arrays, got {len(send)} and {len(recv)}")
    for name, arrays in (("send", send), ("recv", recv)):
        for i, x in enumerate(arrays):
            if not x.flags.c_contiguous:
                raise ValueError(f"{name}[{i}] must be C-contiguous (shape {tuple(x.shape)})")


def _check_rank(comm: Communicator, peer: Any, name: str) -> None:
    if not is_int(peer) or not 0 <= peer < comm.size:
        raise ValueError(f"{name} must be a rank in [0, {comm.size}), got {peer!r}")


def check_exchange(
    comm: Communicator, send: Sequence[Any], dest: Any, recv: Sequence[Any], source: Any, tag: Any
) -> None:
    """Peers are ranks of ``comm`` (``None`` only with no arrays on that side); arrays C-contiguous; tag 0-7."""
    check_tag(tag)
    for name, arrays, peer, peer_name in (("send", send, dest, "dest"), ("recv", recv, source, "source")):
        if arrays:
            _check_rank(comm, peer, peer_name)
        elif peer is not None:
            _check_rank(comm, peer, peer_name)
        for i, x in enumerate(arrays):
            if not x.flags.c_contiguous:
                raise ValueError(f"{name}[{i}] must be C-contiguous (shape {tuple(x.shape)})")


def _vector(comm: Communicator, values: Any, name: str) -> list[int]:
    out = list(values)
    if len(out) != comm.size or not all(is_int(x) and x >= 0 for x in out):
        raise ValueError(f"{name} must hold {comm.size} non-negative ints (one per rank), got {out!r}")
    return [int(x) for x in out]


def _buffer(x: Any, name: str) -> None:
    if getattr(x, "ndim", None) != 1 or not x.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous 1-D array, got shape {tuple(getattr(x, 'shape', ()))}")


def check_alltoallv(
    comm: Communicator,
    send: Any,
    send_counts: Sequence[int],
    send_displs: Sequence[int],
    recv: Any,
    recv_counts: Sequence[int],
    recv_displs: Sequence[int],
) -> None:
    """One dtype, 1-D contiguous buffers; counts and displacements per rank, inside the buffers; disjoint receives."""
    _buffer(send, "send")
    _buffer(recv, "recv")
    if send.dtype != recv.dtype:
        raise TypeError(f"send and recv must have one dtype, got {send.dtype} and {recv.dtype}")
    sides = ((send, send_counts, send_displs, "send"), (recv, recv_counts, recv_displs, "recv"))
    for buf, counts, displs, side in sides:
        c, d = _vector(comm, counts, f"{side}_counts"), _vector(comm, displs, f"{side}_displs")
        ends = [a + b for a, b in zip(c, d)]
        if max(ends, default=0) > buf.size:
            raise ValueError(f"{side} slices reach element {max(ends)} but {side} has {buf.size}")
        if side == "recv":
            spans = sorted((a, a + b) for a, b in zip(d, c) if b > 0)
            if any(prev[1] > nxt[0] for prev, nxt in itertools.pairwise(spans)):
                raise ValueError(f"recv slices overlap: {spans}")


def check_allgatherv(comm: Communicator, send: Any, recv: Any, counts: Sequence[int]) -> None:
    """One dtype, 1-D contiguous buffers; ``counts[rank] == send.size``; ``recv.size == sum(counts)``."""
    _buffer(send, "send")
    _buffer(recv, "recv")
    if send.dtype != recv.dtype:
        raise TypeError(f"send and recv must have one dtype, got {send.dtype} and {recv.dtype}")
    c = _vector(comm, counts, "counts")
    if c[comm.rank] != send.size or recv.size != sum(c):
        raise ValueError(
            f"counts {c} do not fit: rank {comm.rank} sends {send.size} elements and receives into {recv.size}"
        )


def check_split(color: Any, key: Any) -> None:
    """``color`` a non-negative int, ``key`` an int."""
    if not is_int(color) or color < 0:
        raise ValueError(f"color must be a non-negative int, got {color!r}")
    if not is_int(key):
        raise ValueError(f"key must be an int, got {key!r}")
