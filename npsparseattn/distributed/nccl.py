"""NCCL engine of the communicator interface (``cupy.cuda.nccl``), for CuPy arrays, one GPU per rank.

Bootstrap (:meth:`NCCLComm.from_mpi`): rank 0 creates the NCCL unique id,
mpi4py broadcasts it, each rank picks its GPU (:func:`select_device`: its rank
on the node modulo the GPUs it sees, so one visible GPU per rank through
``CUDA_VISIBLE_DEVICES`` works, and two ranks that would share a GPU are
refused by name) and joins the NCCL communicator.  MPI stays the control
plane (argument checks, barriers); NCCL moves the arrays.

Every transfer is issued on a dedicated non-blocking stream, after an event
that orders it behind the work already queued on the caller's stream; the
caller keeps computing while the transfer runs.  :meth:`~Communicator.wait`
polls an event recorded after the transfer against the deadline (on timeout
the NCCL communicator is aborted, which also frees the GPU from the stuck
kernels) and then makes the caller's stream wait on it.

* :meth:`NCCLComm.exchange` (and ``shift``): sends and receives inside
  ``groupStart``/``groupEnd``;
* :meth:`NCCLComm.alltoallv`: one grouped send and receive per peer with a
  non-zero count (NCCL has no all-to-all call; this is how PyTorch and
  cupyx issue one), this rank's own slice included;
* :meth:`NCCLComm.allgatherv`: ``ncclAllGather`` when every rank sends the
  same count, grouped sends and receives otherwise;
* :meth:`NCCLComm.split`: the MPI communicator is split, rank 0 of each
  group creates a new unique id and broadcasts it over the group's MPI
  communicator, and the group's ranks create a new NCCL communicator.

NCCL matches point-to-point messages by order, not by tag: every rank must
issue its transfers in the same order (context-parallel attention does).
Arrays travel as raw bytes, so any dtype CuPy holds (bfloat16 included) can
be moved.

CuPy is imported only when an NCCLComm is created.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from npsparseattn._checks import is_int
from npsparseattn.distributed.base import (
    Communicator,
    Transfer,
    check_allgatherv,
    check_alltoallv,
    check_exchange,
    check_split,
    completed,
)
from npsparseattn.distributed.mpi import MPIComm

UNIQUE_ID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES
INSTALL_HINT = "pip install 'npsparseattn[cuda]' (CuPy with NCCL) and 'npsparseattn[mpi]' (mpi4py, for the bootstrap)"


def import_nccl() -> tuple[Any, Any]:
    """``(cupy, cupy.cuda.nccl)``, or an ImportError/RuntimeError that says what is missing."""
    try:
        import cupy
        from cupy.cuda import nccl
    except ImportError as err:
        raise ImportError(f"the NCCL communicator needs CuPy built with NCCL: {INSTALL_HINT}") from err
    if not getattr(nccl, "available", True):
        raise RuntimeError(f"CuPy was built without NCCL (cupy.cuda.nccl.available is False): {INSTALL_HINT}")
    return cupy, nccl


class NCCLComm(Communicator):
    """Ring communicator over NCCL point-to-point (send/recv), one GPU per rank.

    Build it with :meth:`from_mpi`; the constructor takes already-made parts
    (and is what tests use to inject fakes).

    Parameters
    ----------
    nccl_comm : cupy.cuda.nccl.NcclCommunicator
    mpi : MPIComm
        Same ranks; used for :meth:`allreduce`, :meth:`barrier` and the bootstrap.
    device : int
        The CUDA device this rank uses.
    stream : cupy.cuda.Stream
        Dedicated (non-blocking) stream that carries the transfers.
    cupy, nccl : modules
        ``cupy`` and ``cupy.cuda.nccl``.
    """

    kinds = ("cupy",)

    def __init__(self, nccl_comm: Any, mpi: MPIComm, device: int, stream: Any, cupy: Any, nccl: Any):
        self.nccl_comm = nccl_comm
        self.mpi = mpi
        self.device = device
        self.stream = stream
        self.rank = mpi.rank
        self.size = mpi.size
        self.timeout = mpi.timeout
        self._cupy = cupy
        self._nccl = nccl

    @classmethod
    def from_mpi(cls, comm: Any = None, *, timeout: float | None = None, device: int | None = None) -> NCCLComm:
        """Create the NCCL communicator over the ranks of an MPI communicator.

        Parameters
        ----------
        comm : MPIComm or mpi4py.MPI.Intracomm, optional
            Defaults to ``MPI.COMM_WORLD``.
        timeout : float, optional
            As for :class:`MPIComm` (ignored when ``comm`` is already an MPIComm).
        device : int, optional
            CUDA device of this rank; default: its rank among the ranks on
            this node modulo the GPUs it sees (:func:`select_device`); two
            ranks of a node on one GPU are refused.

        Examples
        --------
        Under ``mpiexec -n 4 python script.py`` on a node with 4 GPUs::

            from npsparseattn.distributed import NCCLComm
            comm = NCCLComm.from_mpi()           # rank r uses GPU r (or its only visible GPU)
        """
        cupy, nccl = import_nccl()
        mpi = comm if isinstance(comm, MPIComm) else MPIComm(comm, timeout=timeout)
        device = select_device(mpi, cupy.cuda.runtime.getDeviceCount(), device)
        cupy.cuda.Device(device).use()
        check_distinct_devices(mpi, mpi.processor_name(), cupy.cuda.Device(device).pci_bus_id)
        nccl_comm = nccl.NcclCommunicator(mpi.size, share_unique_id(mpi, nccl), mpi.rank)
        stream = cupy.cuda.Stream(non_blocking=True)
        return cls(nccl_comm, mpi, device, stream, cupy, nccl)

    def exchange(
        self, send: Sequence[Any], dest: int | None, recv: Sequence[Any], source: int | None, *, tag: int = 0
    ) -> Transfer:
        """Grouped NCCL sends to ``dest`` and receives from ``source`` on :attr:`stream`.

        ``tag`` is checked but NCCL matches by issue order (see the module notes).
        """
        check_exchange(self, send, dest, recv, source, tag)
        self._check_arrays(send=send, recv=recv)
        if not send and not recv:
            return completed("empty exchange")
        uint8 = self._nccl.NCCL_UINT8

        def issue() -> None:
            for x in send:
                self.nccl_comm.send(x.data.ptr, x.nbytes, uint8, dest, self.stream.ptr)
            for x in recv:
                self.nccl_comm.recv(x.data.ptr, x.nbytes, uint8, source, self.stream.ptr)

        if dest != self.rank:
            self.traffic.add(len(send), sum(x.nbytes for x in send))
        what = f"NCCL ring shift ({len(send)} array(s) to rank {dest}, from rank {source})"
        if dest != self.next_rank or source != self.prev_rank:
            what = f"NCCL exchange ({len(send)} array(s) to rank {dest}, {len(recv)} from rank {source})"
        return self._grouped(issue, what, (send, recv))

    def alltoallv(
        self,
        send: Any,
        send_counts: Sequence[int],
        send_displs: Sequence[int],
        recv: Any,
        recv_counts: Sequence[int],
        recv_displs: Sequence[int],
    ) -> Transfer:
        """Grouped ``ncclSend``/``ncclRecv``, one per peer with a non-zero count (:meth:`Communicator.alltoallv`)."""
        check_alltoallv(self, send, send_counts, send_displs, recv, recv_counts, recv_displs)
        self._check_arrays(send=[send], recv=[recv])
        item, uint8 = send.dtype.itemsize, self._nccl.NCCL_UINT8

        def issue() -> None:
            for j in range(self.size):
                if send_counts[j]:
                    ptr = send.data.ptr + send_displs[j] * item
                    self.nccl_comm.send(ptr, send_counts[j] * item, uint8, j, self.stream.ptr)
            for j in range(self.size):
                if recv_counts[j]:
                    ptr = recv.data.ptr + recv_displs[j] * item
                    self.nccl_comm.recv(ptr, recv_counts[j] * item, uint8, j, self.stream.ptr)

        peers = [j for j in range(self.size) if j != self.rank and send_counts[j] > 0]
        self.traffic.add(len(peers), sum(send_counts[j] for j in peers) * item)
        return self._grouped(issue, f"NCCL all-to-all ({sum(send_counts) * item} bytes out)", (send, recv))

    def allgatherv(self, send: Any, recv: Any, counts: Sequence[int]) -> Transfer:
        """``ncclAllGather`` for equal counts, grouped sends/receives otherwise (:meth:`Communicator.allgatherv`)."""
        check_allgatherv(self, send, recv, counts)
        self._check_arrays(send=[send], recv=[recv])
        item, uint8 = send.dtype.itemsize, self._nccl.NCCL_UINT8
        displs = [sum(counts[:i]) for i in range(self.size)]

        def issue() -> None:
            if len(set(counts)) == 1:
                self.nccl_comm.allGather(send.data.ptr, recv.data.ptr, send.nbytes, uint8, self.stream.ptr)
                return
            for j in range(self.size):
                if send.size:
                    self.nccl_comm.send(send.data.ptr, send.nbytes, uint8, j, self.stream.ptr)
            for j in range(self.size):
                if counts[j]:
                    ptr = recv.data.ptr + displs[j] * item
                    self.nccl_comm.recv(ptr, counts[j] * item, uint8, j, self.stream.ptr)

        if send.size:
            self.traffic.add(self.size - 1, (self.size - 1) * send.nbytes)
        return self._grouped(issue, f"NCCL all-gather ({send.nbytes} bytes out)", (send, recv))

    def split(self, color: int, key: int) -> NCCLComm:
        """A new NCCL communicator over the ranks with this ``color`` (new unique id per group, over MPI).

        What the sub-communicator sends counts into this one's :attr:`traffic` too.
        """
        check_split(color, key)
        mpi = self.mpi.split(color, key)
        unique_id = share_unique_id(mpi, self._nccl)
        self._cupy.cuda.Device(self.device).use()
        nccl_comm = self._nccl.NcclCommunicator(mpi.size, unique_id, mpi.rank)
        sub = NCCLComm(nccl_comm, mpi, self.device, self._cupy.cuda.Stream(non_blocking=True), self._cupy, self._nccl)
        sub.share_traffic(self)
        return sub

    def _check_arrays(self, **sides: Sequence[Any]) -> None:
        for name, arrays in sides.items():
            for i, x in enumerate(arrays):
                if not isinstance(x, self._cupy.ndarray):
                    raise TypeError(f"{name}[{i}] must be a CuPy array for NCCL, got {type(x).__name__}")

    def _grouped(self, issue: Any, what: str, buffers: tuple[Any, ...]) -> Transfer:
        """Run ``issue()`` (NCCL calls) in one group on :attr:`stream`, ordered after the caller's queued work."""
        cupy, nccl = self._cupy, self._nccl
        caller = cupy.cuda.get_current_stream()
        ready = cupy.cuda.Event(disable_timing=True)
        ready.record(caller)
        self.stream.wait_event(ready)
        nccl.groupStart()
        try:
            issue()
        finally:
            nccl.groupEnd()
        arrived = cupy.cuda.Event(disable_timing=True)
        arrived.record(self.stream)
        return Transfer(
            what,
            lambda: arrived.done,
            on_done=lambda: caller.wait_event(arrived),
            on_timeout=self._abort,
            buffers=buffers,
        )

    def allreduce(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        """Over the MPI control plane (see :meth:`MPIComm.allreduce`)."""
        return self.mpi.allreduce(values, op)

    def barrier(self) -> None:
        """Over the MPI control plane."""
        self.mpi.barrier()

    def _abort(self) -> None:
        self.nccl_comm.abort()
        self.mpi.mark_failed()


def share_unique_id(mpi: MPIComm, nccl: Any) -> tuple[int, ...]:
    """The NCCL unique id, created on rank 0 and broadcast over MPI (a tuple of 128 byte values)."""
    buffer = np.zeros(UNIQUE_ID_BYTES, dtype=np.int64)
    if mpi.rank == 0:
        unique_id = tuple(nccl.get_unique_id())
        if len(unique_id) != UNIQUE_ID_BYTES:
            raise RuntimeError(f"NCCL unique id has {len(unique_id)} bytes, expected {UNIQUE_ID_BYTES}")
        buffer[:] = unique_id
    mpi.broadcast(buffer, root=0)
    return tuple(int(x) for x in buffer)


def select_device(mpi: MPIComm, n_devices: int, device: int | None) -> int:
    """This rank's GPU: ``device`` if given, else its rank on the node modulo the GPUs it sees.

    With one GPU visible per rank (``CUDA_VISIBLE_DEVICES`` set per rank, the
    usual cluster setup) every rank takes device 0, its own GPU; with every
    GPU of the node visible, rank ``i`` on the node takes GPU ``i``.  Whether
    two ranks ended on one GPU is checked by :func:`check_distinct_devices`.

    >>> class Node:                       # rank 5, the second of 4 ranks on its node
    ...     rank = 5
    ...     def local_rank(self): return (1, 4)
    >>> select_device(Node(), 1, None), select_device(Node(), 4, None), select_device(Node(), 4, 3)
    (0, 1, 3)
    """
    if device is not None:
        if not is_int(device):
            raise TypeError(f"device must be an int or None, got {device!r}")
        if not 0 <= device < n_devices:
            raise ValueError(f"device must be in [0, {n_devices}) (GPUs visible to rank {mpi.rank}), got {device}")
        return int(device)
    if n_devices < 1:
        raise RuntimeError(f"rank {mpi.rank}: no CUDA GPU visible; NCCLComm needs one GPU per rank")
    local, _ = mpi.local_rank()
    return local % n_devices


def check_distinct_devices(mpi: MPIComm, node: str, bus_id: str) -> None:
    """Refuse, on every rank, two ranks of one node on one GPU (``node``: processor name, ``bus_id``: PCI id).

    NCCL refuses such a communicator too, later and with less to say.  One
    :meth:`~MPIComm.allreduce` with the usual deadline.
    """
    codes = np.zeros(mpi.size, dtype=np.int64)
    codes[mpi.rank] = zlib.crc32(f"{node}|{bus_id}".encode()) + 1
    codes = mpi.allreduce(codes, "max")
    shared = [int(r) for r in np.flatnonzero(codes == codes[mpi.rank])]
    if len(shared) > 1:
        raise RuntimeError(
            f"ranks {', '.join(map(str, shared))} on node {node!r} would share GPU {bus_id}; NCCLComm needs one "
            f"GPU per rank (start at most as many ranks per node as it has GPUs, give each rank its own GPU with "
            f"CUDA_VISIBLE_DEVICES, or pass device=)"
        )
