"""MPI engine of the communicator interface (mpi4py), for NumPy arrays on CPU ranks (and CuPy arrays staged
through host memory, or with a CUDA-aware MPI).

Transfers are ``Isend``/``Irecv`` of contiguous buffers (exchange, shift),
``Ialltoallv`` and ``Iallgatherv`` of byte views (so any dtype travels,
bfloat16 included); every wait polls ``Test``/``Testall`` against a
deadline, so a dead or stalled peer raises
:class:`~npsparseattn.distributed.RingTimeoutError` instead of hanging.
:meth:`MPIComm.split` first agrees on the groups with an ``allreduce`` that
has the same deadline, then calls ``MPI_Comm_split`` (a blocking call, made
only once every rank is known to be present).

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
    check_allgatherv,
    check_alltoallv,
    check_exchange,
    check_reduce,
    check_split,
    check_timeout,
    completed,
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
        self.cuda_aware = bool(cuda_aware)
        self.host_staging = bool(host_staging) and not cuda_aware
        self.abort_at_exit = bool(abort_at_exit)
        self._abort_armed = False

    def exchange(
        self, send: Sequence[Any], dest: int | None, recv: Sequence[Any], source: int | None, *, tag: int = 0
    ) -> Transfer:
        """Post ``Irecv`` from ``source`` and ``Isend`` to ``dest`` (see :meth:`Communicator.exchange`)."""
        check_exchange(self, send, dest, recv, source, tag)
        if not send and not recv:
            return completed("empty exchange")
        on_gpu = any(not isinstance(x, np.ndarray) for x in (*send, *recv))
        if on_gpu and self.host_staging:
            return self._staged(send, recv, lambda hs, hr: self.exchange(hs, dest, hr, source, tag=tag), raw=True)
        if on_gpu:
            _synchronize_cupy()
        base = _TAG_BASE + 16 * tag
        requests = [self.comm.Irecv(buf, source=source, tag=base + i) for i, buf in enumerate(recv)]
        requests += [self.comm.Isend(x, dest=dest, tag=base + i) for i, x in enumerate(send)]
        if dest != self.rank:
            self.traffic.add(len(send), sum(x.nbytes for x in send))
        what = f"ring shift (tag {tag}, {len(send)} array(s) to rank {dest}, from rank {source})"
        if dest != self.next_rank or source != self.prev_rank:
            what = f"exchange (tag {tag}, {len(send)} array(s) to rank {dest}, {len(recv)} from rank {source})"
        statuses = [self._mpi.Status() for _ in requests]
        return Transfer(
            what,
            self._checked(lambda: self._mpi.Request.Testall(requests, statuses), what, statuses),
            on_timeout=self.mark_failed,
            buffers=(send, recv),
        )

    def alltoallv(
        self,
        send: Any,
        send_counts: Sequence[int],
        send_displs: Sequence[int],
        recv: Any,
        recv_counts: Sequence[int],
        recv_displs: Sequence[int],
    ) -> Transfer:
        """``Ialltoallv`` of byte views (see :meth:`Communicator.alltoallv`)."""
        check_alltoallv(self, send, send_counts, send_displs, recv, recv_counts, recv_displs)
        if not isinstance(send, np.ndarray) and self.host_staging:
            return self._staged(
                [send],
                [recv],
                lambda hs, hr: self.alltoallv(hs[0], send_counts, send_displs, hr[0], recv_counts, recv_displs),
            )
        if not isinstance(send, np.ndarray):
            _synchronize_cupy()
        item = send.dtype.itemsize
        byte = self._mpi.BYTE
        spec = [_bytes(send), ([c * item for c in send_counts], [d * item for d in send_displs]), byte]
        rspec = [_bytes(recv), ([c * item for c in recv_counts], [d * item for d in recv_displs]), byte]
        request = self.comm.Ialltoallv(spec, rspec)
        peers = [j for j in range(self.size) if j != self.rank and send_counts[j] > 0]
        self.traffic.add(len(peers), sum(send_counts[j] for j in peers) * item)
        what = f"all-to-all ({sum(send_counts) * item} bytes out, {sum(recv_counts) * item} in)"
        return Transfer(what, self._checked(request.Test, what), on_timeout=self.mark_failed, buffers=(send, recv))

    def allgatherv(self, send: Any, recv: Any, counts: Sequence[int]) -> Transfer:
        """``Iallgatherv`` of byte views (see :meth:`Communicator.allgatherv`)."""
        check_allgatherv(self, send, recv, counts)
        if not isinstance(send, np.ndarray) and self.host_staging:
            return self._staged([send], [recv], lambda hs, hr: self.allgatherv(hs[0], hr[0], counts))
        if not isinstance(send, np.ndarray):
            _synchronize_cupy()
        item = send.dtype.itemsize
        sizes = [c * item for c in counts]
        displs = [sum(sizes[:i]) for i in range(self.size)]
        request = self.comm.Iallgatherv(_bytes(send), [_bytes(recv), (sizes, displs), self._mpi.BYTE])
        if send.size:
            self.traffic.add(self.size - 1, (self.size - 1) * send.nbytes)
        what = f"all-gather ({send.nbytes} bytes out, {recv.nbytes} in)"
        return Transfer(what, self._checked(request.Test, what), on_timeout=self.mark_failed, buffers=(send, recv))

    def split(self, color: int, key: int) -> MPIComm:
        """``MPI_Comm_split`` after an ``allreduce`` with a deadline; the sub-communicator keeps these options.

        What the sub-communicator sends counts into this one's :attr:`traffic` too.
        """
        check_split(color, key)
        self.split_groups(color, key)
        sub = MPIComm(
            self.comm.Split(int(color), int(key)),
            timeout=self.timeout,
            cuda_aware=self.cuda_aware,
            host_staging=self.host_staging,
            abort_at_exit=self.abort_at_exit,
        )
        sub.share_traffic(self)
        return sub

    def _staged(
        self,
        send: Sequence[Any],
        recv: Sequence[Any],
        post: Callable[[list[np.ndarray], list[np.ndarray]], Transfer],
        *,
        raw: bool = False,
    ) -> Transfer:
        """A transfer of CuPy arrays through host buffers (``host_staging``): ``post`` moves the host copies.

        ``raw``: the host copies are flat bytes (point-to-point messages: any
        dtype travels, bfloat16 has no MPI datatype); otherwise they keep
        shape and dtype (the collectives move byte views themselves).
        """
        import cupy

        host_send = [cupy.asnumpy(x) for x in send]
        host_recv = [np.empty(tuple(x.shape), np.dtype(x.dtype)) for x in recv]
        if raw:
            host_send = [h.reshape(-1).view(np.uint8) for h in host_send]
            host_recv = [h.reshape(-1).view(np.uint8) for h in host_recv]
        transfer = post(host_send, host_recv)

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

    def processor_name(self) -> str:
        """``MPI_Get_processor_name``: the node this rank runs on."""
        return self._mpi.Get_processor_name()

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


def _bytes(x: Any) -> Any:
    """A C-contiguous 1-D array as its bytes (NumPy or CuPy), for the byte-counted collectives."""
    return x.view(np.uint8) if isinstance(x, np.ndarray) else x.view("uint8")


def _synchronize_cupy() -> None:
    """Make pending GPU work on the current CuPy stream visible to a CUDA-aware MPI."""
    import cupy

    cupy.cuda.get_current_stream().synchronize()
