"""MPI engine of the communicator interface (mpi4py), for NumPy arrays on CPU ranks (and CuPy arrays staged
through host memory, or with a CUDA-aware MPI).

Transfers are ``Isend``/``Irecv`` of contiguous buffers; every wait polls
``Testall`` against a deadline, so a dead or stalled peer raises
:class:`~npsparseattn.distributed.RingTimeoutError` instead of hanging.

After a timeout the MPI world is broken: ``MPI_Finalize`` at interpreter exit
would wait forever for the lost peer.  So the first timeout arms an exit hook
that calls ``MPI_Abort`` instead (the job ends with status 1 once the error
has been printed), unless the communicator was built with
``abort_at_exit=False``.
"""

from __future__ import annotations

import atexit
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from npsparseattn.distributed.base import (
    Communicator,
    RingPeerError,
    Transfer,
    check_reduce,
    check_shift_arrays,
    check_tag,
    check_timeout,
    default_timeout,
)

INSTALL_HINT = "pip install 'npsparseattn[mpi]' (brings mpi4py and the mpich wheel with its mpiexec)"
_TAG_BASE = 7100  # away from tags a user program is likely to use on the same communicator


def import_mpi() -> Any:
    """``mpi4py.MPI``, or an ImportError that says how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise ImportError(f"the MPI communicator needs mpi4py: {INSTALL_HINT}") from err
    return MPI


class MPIComm(Communicator):
    """Ring communicator over an mpi4py intracommunicator.

    Parameters
    ----------
    comm : mpi4py.MPI.Intracomm, optional
        Defaults to ``MPI.COMM_WORLD``.  Ranks of the ring are its ranks.
    timeout : float, optional
        Seconds any wait may block before :class:`RingTimeoutError`; default
        ``$NPSPARSEATTN_RING_TIMEOUT`` or 300.
    cuda_aware : bool
        Set True only if the MPI library is CUDA-aware: the communicator then
        also moves CuPy arrays (the current stream is synchronised before each
        send).  The pip ``mpich`` wheel is not CUDA-aware.
    host_staging : bool
        Move CuPy arrays through host memory over any MPI: each send is
        copied to the host first (after the work queued on the current
        stream), each receive lands in a host buffer and is copied to the GPU
        when the wait completes.  Slower than NCCL, but it needs neither a
        CUDA-aware MPI nor one GPU per rank: several ranks may share a GPU.
    abort_at_exit : bool
        After a timeout, end the process with ``MPI_Abort`` at exit instead of
        ``MPI_Finalize`` (which would hang on the lost peer).

    Examples
    --------
    Run under ``mpiexec -n 2 python script.py``::

        from npsparseattn.distributed import MPIComm
        comm = MPIComm()                       # MPI.COMM_WORLD, 300 s timeout
        print(comm.rank, comm.size)
    """

    def __init__(
        self,
        comm: Any = None,
        *,
        timeout: float | None = None,
        cuda_aware: bool = False,
        host_staging: bool = False,
        abort_at_exit: bool = True,
    ):
        mpi = import_mpi()
        comm = mpi.COMM_WORLD if comm is None else comm
        if not isinstance(comm, mpi.Intracomm):
            raise TypeError(f"comm must be an mpi4py.MPI.Intracomm such as MPI.COMM_WORLD, got {comm!r}")
        self._mpi = mpi
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.timeout = default_timeout() if timeout is None else check_timeout(timeout)
        self.kinds = ("numpy", "cupy") if cuda_aware or host_staging else ("numpy",)
        self.host_staging = bool(host_staging) and not cuda_aware
        self.abort_at_exit = bool(abort_at_exit)
        self._abort_armed = False

    def shift(self, send: Sequence[Any], recv: Sequence[Any], *, tag: int = 0) -> Transfer:
        """Post ``Irecv`` from the previous rank and ``Isend`` to the next (see :meth:`Communicator.shift`)."""
        tag = check_tag(tag)
        check_shift_arrays(send, recv)
        on_gpu = any(not isinstance(x, np.ndarray) for x in (*send, *recv))
        if on_gpu and self.host_staging:
            return self._staged_shift(send, recv, tag)
        if on_gpu:
            _synchronize_cupy()
        base = _TAG_BASE + 16 * tag
        requests = [self.comm.Irecv(buf, source=self.prev_rank, tag=base + i) for i, buf in enumerate(recv)]
        requests += [self.comm.Isend(x, dest=self.next_rank, tag=base + i) for i, x in enumerate(send)]
        what = f"ring shift (tag {tag}, {len(send)} array(s) to rank {self.next_rank}, from rank {self.prev_rank})"
        statuses = [self._mpi.Status() for _ in requests]
        return Transfer(
            what,
            self._checked(lambda: self._mpi.Request.Testall(requests, statuses), what, statuses),
            on_timeout=self.mark_failed,
            buffers=(send, recv),
        )

    def _staged_shift(self, send: Sequence[Any], recv: Sequence[Any], tag: int) -> Transfer:
        """:meth:`shift` of CuPy arrays through host buffers (``host_staging``)."""
        import cupy

        # raw bytes, so any dtype travels (bfloat16 has no MPI datatype)
        host_send = [cupy.asnumpy(x).reshape(-1).view(np.uint8) for x in send]
        host_recv = [np.empty(int(np.prod(x.shape)) * x.dtype.itemsize, np.uint8) for x in recv]
        transfer = self.shift(host_send, host_recv, tag=tag)

        def deliver() -> None:
            for device, host in zip(recv, host_recv):
                device.set(host.view(device.dtype).reshape(device.shape))

        transfer.on_done = deliver
        transfer.buffers = (send, recv, host_send, host_recv)
        return transfer

    def allreduce(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        """Element-wise ``op`` of a small host vector over all ranks (``Iallreduce`` with a deadline)."""
        vec = check_reduce(values, op)
        out = np.empty_like(vec)
        mpi_op = {"sum": self._mpi.SUM, "min": self._mpi.MIN, "max": self._mpi.MAX}[op]
        request = self.comm.Iallreduce(vec, out, op=mpi_op)
        self._wait_collective(request, f"allreduce ({op}) of {vec.size} value(s)")
        return out

    def barrier(self) -> None:
        """``Ibarrier`` with a deadline."""
        self._wait_collective(self.comm.Ibarrier(), "barrier")

    def local_rank(self) -> tuple[int, int]:
        """``(rank, size)`` among the ranks on this node (same ``MPI_Get_processor_name``).

        One :meth:`allreduce` of the node names' hashes, so it has the same
        deadline as every other wait (an ``MPI_Comm_split_type`` would block
        without one).
        """
        node_ids = np.zeros(self.size, dtype=np.int64)
        node_ids[self.rank] = zlib.crc32(self._mpi.Get_processor_name().encode())
        node_ids = self.allreduce(node_ids, "max")
        here = np.flatnonzero(node_ids == node_ids[self.rank])
        return int(np.searchsorted(here, self.rank)), int(here.size)

    def broadcast(self, values: np.ndarray, root: int = 0) -> np.ndarray:
        """Overwrite the host vector ``values`` on every rank with ``root``'s (``Ibcast`` with a deadline).

        Small bootstrap data such as the NCCL unique id; every rank passes a
        vector of the same length and dtype.
        """
        if not isinstance(values, np.ndarray) or values.ndim != 1 or not values.flags.c_contiguous:
            got = f"{type(values).__name__} of shape {getattr(values, 'shape', '?')}"
            raise TypeError(f"values must be a contiguous 1-D NumPy vector, got {got}")
        self._wait_collective(self.comm.Ibcast(values, root=root), f"broadcast from rank {root}")
        return values

    def _wait_collective(self, request: Any, what: str) -> None:
        self.wait(Transfer(what, self._checked(request.Test, what), on_timeout=self.mark_failed))

    def _checked(self, test: Callable[[], bool], what: str, statuses: Sequence[Any] = ()) -> Callable[[], bool]:
        """``test`` with MPI errors (MPICH reports a peer whose process ended) turned into RingPeerError."""

        def checked() -> bool:
            try:
                return test()
            except self._mpi.Exception as err:
                self.mark_failed()
                codes = {s.Get_error() for s in statuses} - {self._mpi.SUCCESS, self._mpi.ERR_PENDING}
                reasons = [self._mpi.Get_error_string(c) for c in sorted(codes)] or [err.Get_error_string()]
                raise RingPeerError(
                    f"rank {self.rank} of {self.size}: {what} failed: MPI reports {'; '.join(reasons)!r}; "
                    f"a peer process probably ended"
                ) from err

        return checked

    def mark_failed(self) -> None:
        """Called on a timeout: arm ``MPI_Abort`` at exit (``MPI_Finalize`` would wait for the lost peer)."""
        if self.abort_at_exit and not self._abort_armed:
            self._abort_armed = True
            atexit.register(self.comm.Abort, 1)


def _synchronize_cupy() -> None:
    """Make pending GPU work on the current CuPy stream visible to a CUDA-aware MPI."""
    import cupy

    cupy.cuda.get_current_stream().synchronize()
