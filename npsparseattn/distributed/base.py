"""The communicator interface ring attention talks through, and its errors.

A :class:`Communicator` is a ring of ``size`` ranks.  Ring attention needs
only a few operations from it:

* :meth:`~Communicator.shift`: non-blocking send of some arrays to the next
  rank and receive of the same number of arrays from the previous one;
* :meth:`~Communicator.wait`: block until a shift has completed, or raise
  :class:`RingTimeoutError` once ``timeout`` seconds have passed;
* :meth:`~Communicator.allreduce` of a small host vector (argument checks,
  timings) and :meth:`~Communicator.barrier`.

Two engines implement it: :class:`~npsparseattn.distributed.MPIComm`
(mpi4py, NumPy arrays) and :class:`~npsparseattn.distributed.NCCLComm`
(``cupy.cuda.nccl``, CuPy arrays).  Every wait has a deadline, so a peer that
died or stalls ends the call with an error instead of a hang.
"""

from __future__ import annotations

import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
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


def poll_until(done: Callable[[], bool], deadline: float, describe: Callable[[], str]) -> None:
    """Call ``done()`` until it returns True; raise :class:`RingTimeoutError` after ``deadline``.

    ``deadline`` is a :func:`time.monotonic` value.  Sleeps grow from 10 us to
    1 ms between polls so a waiting rank leaves the cores to ranks that compute.
    """
    pause = 1e-5
    while not done():
        if time.monotonic() >= deadline:
            raise RingTimeoutError(describe())
        time.sleep(pause)
        pause = min(2 * pause, 1e-3)


class Transfer:
    """Handle of a posted :meth:`Communicator.shift`; pass it to :meth:`Communicator.wait`.

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


class Communicator(ABC):
    """A ring of ``size`` processes; this one is ``rank``.

    Subclasses implement :meth:`shift`, :meth:`allreduce` and :meth:`barrier`
    and set ``rank``, ``size``, ``timeout`` and ``kinds`` (the array kinds
    they move: ``"numpy"``, ``"cupy"``).
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

    @abstractmethod
    def shift(self, send: Sequence[Any], recv: Sequence[Any], *, tag: int = 0) -> Transfer:
        """Post sends of ``send`` to the next rank and receives into ``recv`` from the previous one.

        Arrays must be contiguous; ``recv[i]`` must match the shape and dtype
        of the previous rank's ``send[i]``.  ``tag`` (0-7) keeps independent
        streams of shifts apart.  Returns at once; call :meth:`wait` before
        reading ``recv`` or writing ``send``.
        """

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

    def _timeout_message(self, what: str) -> str:
        return (
            f"rank {self.rank} of {self.size}: {what} did not complete within {self.timeout:g} s; "
            f"a peer (rank {self.prev_rank} or {self.next_rank}, or one further along the ring) died "
            f"or stalls. Set the limit with the communicator's timeout= or ${TIMEOUT_ENV}."
        )


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
