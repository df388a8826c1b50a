"""NCCL engine of the communicator interface (``cupy.cuda.nccl``), for CuPy arrays, one GPU per rank.

Bootstrap (:meth:`NCCLComm.from_mpi`): rank 0 creates the NCCL unique id,
mpi4py broadcasts it, each rank picks its GPU from its rank on the node
(ranks with the same processor name) and joins the NCCL communicator.  MPI stays
the control plane (argument checks, barriers); NCCL moves the arrays.

Each :meth:`NCCLComm.shift` issues its sends and receives inside
``groupStart``/``groupEnd`` on a dedicated non-blocking stream, after an event
that orders them behind the work already queued on the caller's stream; the
caller keeps computing while the transfer runs.  :meth:`~Communicator.wait`
polls an event recorded after the transfer against the deadline (on timeout
the NCCL communicator is aborted, which also frees the GPU from the stuck
kernels) and then makes the caller's stream wait on it.

NCCL matches point-to-point messages by order, not by tag: every rank must
issue its shifts in the same order (ring attention does).  Arrays travel as
raw bytes, so any dtype CuPy holds (bfloat16 included) can be moved.

CuPy is imported only when an NCCLComm is created.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from npsparseattn._checks import is_int
from npsparseattn.distributed.base import Communicator, Transfer, check_shift_arrays, check_tag
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
            this node, which must not exceed the node's GPU count.

        Examples
        --------
        Under ``mpiexec -n 4 python script.py`` on a node with 4 GPUs::

            from npsparseattn.distributed import NCCLComm
            comm = NCCLComm.from_mpi()           # rank r uses GPU r
        """
        cupy, nccl = import_nccl()
        mpi = comm if isinstance(comm, MPIComm) else MPIComm(comm, timeout=timeout)
        device = select_device(mpi, cupy.cuda.runtime.getDeviceCount(), device)
        cupy.cuda.Device(device).use()
        nccl_comm = nccl.NcclCommunicator(mpi.size, share_unique_id(mpi, nccl), mpi.rank)
        stream = cupy.cuda.Stream(non_blocking=True)
        return cls(nccl_comm, mpi, device, stream, cupy, nccl)

    def shift(self, send: Sequence[Any], recv: Sequence[Any], *, tag: int = 0) -> Transfer:
        """Grouped NCCL send to the next rank / receive from the previous one on :attr:`stream`.

        ``tag`` is checked but NCCL matches by issue order (see the module notes).
        """
        check_tag(tag)
        check_shift_arrays(send, recv)
        cupy, nccl = self._cupy, self._nccl
        for name, arrays in (("send", send), ("recv", recv)):
            for i, x in enumerate(arrays):
                if not isinstance(x, cupy.ndarray):
                    raise TypeError(f"{name}[{i}] must be a CuPy array for NCCL, got {type(x).__name__}")
        caller = cupy.cuda.get_current_stream()
        ready = cupy.cuda.Event(disable_timing=True)
        ready.record(caller)
        self.stream.wait_event(ready)
        nccl.groupStart()
        try:
            for x in send:
                self.nccl_comm.send(x.data.ptr, x.nbytes, nccl.NCCL_UINT8, self.next_rank, self.stream.ptr)
            for x in recv:
                self.nccl_comm.recv(x.data.ptr, x.nbytes, nccl.NCCL_UINT8, self.prev_rank, self.stream.ptr)
        finally:
            nccl.groupEnd()
        arrived = cupy.cuda.Event(disable_timing=True)
        arrived.record(self.stream)
        return Transfer(
            f"NCCL ring shift ({len(send)} array(s) to rank {self.next_rank}, from rank {self.prev_rank})",
            lambda: arrived.done,
            on_done=lambda: caller.wait_event(arrived),
            on_timeout=self._abort,
            buffers=(send, recv),
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
    """This rank's GPU: ``device`` if given, else its rank on the node; clear errors when there are too few."""
    if device is not None:
        if not is_int(device):
            raise TypeError(f"device must be an int or None, got {device!r}")
        if not 0 <= device < n_devices:
            raise ValueError(f"device must be in [0, {n_devices}) (GPUs visible to rank {mpi.rank}), got {device}")
        return int(device)
    if n_devices < 1:
        raise RuntimeError(f"rank {mpi.rank}: no CUDA GPU visible; NCCLComm needs one GPU per rank")
    local, local_size = mpi.local_rank()
    if local_size > n_devices:
        raise RuntimeError(
            f"rank {mpi.rank}: {local_size} ranks share this node but it has {n_devices} GPU(s); "
            f"NCCLComm needs one GPU per rank (start at most {n_devices} ranks per node or pass device=)"
        )
    return local
