"""Communicators for context-parallel attention: one small interface, two engines.

* :class:`MPIComm` over mpi4py, for NumPy arrays on CPU ranks
  (``pip install 'npsparseattn[mpi]'``);
* :class:`NCCLComm` over ``cupy.cuda.nccl``, for CuPy arrays, one GPU per
  rank, bootstrapped over MPI (``pip install 'npsparseattn[cuda,mpi]'``).

Neither mpi4py nor CuPy is imported until a communicator is created.

>>> from npsparseattn.distributed import Communicator, RingTimeoutError
>>> issubclass(RingTimeoutError, TimeoutError)
True
"""

from __future__ import annotations

from npsparseattn.distributed.base import (
    DEFAULT_TIMEOUT,
    TIMEOUT_ENV,
    Communicator,
    RingError,
    RingPeerError,
    RingTimeoutError,
    Traffic,
    Transfer,
)
from npsparseattn.distributed.mpi import MPIComm
from npsparseattn.distributed.nccl import NCCLComm

__all__ = [
    "DEFAULT_TIMEOUT",
    "TIMEOUT_ENV",
    "Communicator",
    "MPIComm",
    "NCCLComm",
    "RingError",
    "RingPeerError",
    "RingTimeoutError",
    "Traffic",
    "Transfer",
]
