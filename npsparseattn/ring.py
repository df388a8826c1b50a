"""Ring attention: ``context_parallel_attention(mode="ring")`` under its own name, and the sharding helpers.

Every rank holds a shard of ``q``, ``k`` and ``v`` along the sequence axis.
Key/value blocks travel between ranks: at step ``s`` rank ``r`` holds the K/V
shard of rank ``(r - s) mod P``, posts the transfer of the next shard
*before* computing on the current one, computes its queries against it with
the ``attention`` kernels the registry chooses (``backend``: any
implementation of ``attention``, so a GPU backend serves CuPy arrays), and
merges the partial ``(out, lse)`` exactly (:func:`npsparseattn.merge_states`)
in step order.  After ``P`` steps every query has seen every key.  When
every rank needs every shard (dense attention, causal zigzag) the shards are
relayed neighbour to neighbour; otherwise each goes straight to the ranks
that need it and nothing is sent for a skipped step
(:mod:`npsparseattn.context_parallel.engine`).

Shardings (:func:`shard`): ``"contiguous"`` gives rank ``r`` the ``r``-th of
``P`` slices; ``"zigzag"`` cuts the sequence in ``2P`` chunks and gives rank
``r`` chunks ``r`` and ``2P-1-r``, so under a causal mask every rank does the
same work at every step (ring-flash-attn's zigzag)::

    P = 2, 4 chunks        keys:  c0  c1  c2  c3
    rank 0 holds c0, c3   q c0    \\
    rank 1 holds c1, c2   q c1    #   \\
                          q c2    #   #   \\
                          q c3    #   #   #   \\

Backward (FlashAttention-2 scheme with the *final* ``out`` and ``lse``, so
every block's contribution is exact on its own): ``dq`` accumulates locally,
``dk``/``dv`` accumulators travel with K/V and arrive home after ``P``
steps (or go straight back to their owner in the direct schedule).

The other modes (Ulysses, hybrid, all-gather), packed documents and sparse
layouts: :func:`npsparseattn.context_parallel_attention`.  See
``docs/ring.md`` for the schedule, the merge math, MPI/NCCL setup and the
failure behaviour.
"""

from __future__ import annotations

from typing import Any

from npsparseattn.context_parallel.attention import run_backward, run_forward
from npsparseattn.context_parallel.plan import EMPTY, FULL, PARTIAL, BlockCall, block_calls
from npsparseattn.context_parallel.sharding import (
    SHARDINGS,
    check_sharding,
    shard,
    shard_lengths,
    shard_pieces,
    unshard,
)
from npsparseattn.distributed.base import Communicator
from npsparseattn.interop.dlpack import accepts_dlpack

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "SHARDINGS",
    "BlockCall",
    "block_calls",
    "check_sharding",
    "ring_attention",
    "ring_attention_backward",
    "shard",
    "shard_lengths",
    "shard_pieces",
    "unshard",
]
Window = tuple[int | None, int | None]


@accepts_dlpack
def ring_attention(
    q: Any,
    k: Any,
    v: Any,
    comm: Communicator,
    *,
    causal: bool = False,
    window: Window | None = None,
    scale: float | None = None,
    sharding: str = "zigzag",
    return_lse: bool = False,
    backend: str = "auto",
) -> Any:
    """Exact attention over a sequence sharded across the ranks of ``comm``.

    Call it on every rank with that rank's shard (cut with :func:`shard`);
    each rank gets its shard of the output, equal to the matching rows of
    :func:`npsparseattn.attention` on the whole sequence.

    Parameters
    ----------
    q : array, shape (*batch, Hq, L_local, D), (Hq, L_local, D) or (L_local, D)
    k : array, shape (*batch, Hk, L_local, D), ``Hq % Hk == 0`` (GQA/MQA)
    v : array, shape (*batch, Hk, L_local, Dv)
        This rank's shard; ``L_local`` must be what :func:`shard` gives for
        ``sharding`` (every rank's length is checked against it).
    comm : Communicator
        :class:`~npsparseattn.distributed.MPIComm` (NumPy arrays) or
        :class:`~npsparseattn.distributed.NCCLComm` (CuPy arrays).
    causal, window, scale
        As for :func:`npsparseattn.attention`, in global positions of the
        whole sequence (query ``i`` sees key ``j <= i`` when causal).
    sharding : ``"zigzag"`` (default) or ``"contiguous"``
        How the sequence was sharded.  Zigzag balances causal work.
    return_lse : bool
        Also return this rank's shard of ``lse`` (*batch, Hq, L_local).
    backend : str
        The per-block compute: ``"auto"`` or any backend of ``attention``
        (``available_backends("ring_attention")``), e.g. ``"numba"`` (the
        tiled CPU kernels) or ``"reference"`` (dense float64).

    Returns
    -------
    out : array, shape (*batch, Hq, L_local, Dv), dtype of ``q``
    lse : array, shape (*batch, Hq, L_local), float32 (float64 for float64 inputs), if ``return_lse``

    Raises
    ------
    RankArgumentError (a ValueError), on every rank
        Shapes (other than ``L_local``), dtypes or options differ across
        ranks, local lengths do not match ``sharding``, or some rank's
        arguments are invalid (that rank raises the specific error).
    RingTimeoutError
        A peer died or stalls (``comm.timeout`` seconds without progress).

    Examples
    --------
    The same script runs under ``mpiexec -n 4 python script.py`` (4 ranks,
    each gets 1/4 of the rows) and directly (a ring of one):

    >>> import numpy as np
    >>> import npsparseattn as nsa
    >>> from npsparseattn.distributed import MPIComm
    >>> comm = MPIComm()                                  # MPI.COMM_WORLD
    >>> rng = np.random.default_rng(0)                    # the same full inputs on every rank
    >>> q, k, v = (rng.standard_normal((4, 256, 32), dtype=np.float32) for _ in range(3))
    >>> mine = [nsa.shard(x, comm.rank, comm.size) for x in (q, k, v)]   # (4, 256 / P, 32)
    >>> out = nsa.ring_attention(*mine, comm, causal=True)               # this rank's rows
    >>> full = nsa.attention(q, k, v, causal=True)
    >>> bool(np.allclose(out, nsa.shard(full, comm.rank, comm.size), atol=1e-5))
    True
    """
    return run_forward(
        "ring_attention", q, k, v, comm, causal=causal, window=window, scale=scale, sharding=sharding,
        return_lse=return_lse, backend=backend,
    )  # fmt: skip


@accepts_dlpack
def ring_attention_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    comm: Communicator,
    *,
    causal: bool = False,
    window: Window | None = None,
    scale: float | None = None,
    sharding: str = "zigzag",
    backend: str = "auto",
) -> tuple[Any, Any, Any]:
    """Gradients of :func:`ring_attention` for this rank's shard.

    ``dq`` accumulates locally; the ``dk``/``dv`` accumulators travel the ring
    with K/V and reach their home rank after ``P`` steps.  Each block's
    contribution uses the final ``out`` and ``lse`` (FlashAttention-2:
    ``P = exp(scale*S - lse)``, ``D = rowsum(dout*out)``), so it is exact.

    Parameters
    ----------
    dout : array, shape (*batch, Hq, L_local, Dv)
        This rank's shard of the gradient of the loss with respect to ``out``.
    q, k, v, comm : as for :func:`ring_attention`
    out, lse : this rank's forward outputs (``return_lse=True``)
    causal, window, scale, sharding, backend : as for the forward call

    Returns
    -------
    dq, dk, dv : this rank's shards, shaped like ``q``, ``k``, ``v`` and of their dtype
        (``dk``/``dv`` summed over each GQA group).

    Examples
    --------
    Under ``mpiexec -n P`` or directly (a ring of one):

    >>> import numpy as np
    >>> import npsparseattn as nsa
    >>> from npsparseattn.distributed import MPIComm
    >>> comm = MPIComm()
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((4, 256, 32)) for _ in range(3))
    >>> mine = [nsa.shard(x, comm.rank, comm.size) for x in (q, k, v)]
    >>> out, lse = nsa.ring_attention(*mine, comm, causal=True, return_lse=True)
    >>> dq, dk, dv = nsa.ring_attention_backward(np.ones_like(out), *mine, out, lse, comm, causal=True)
    >>> dq.shape == mine[0].shape and dk.shape == mine[1].shape
    True
    """
    return run_backward(
        "ring_attention_backward", dout, q, k, v, out, lse, comm, causal=causal, window=window, scale=scale,
        sharding=sharding, backend=backend,
    )  # fmt: skip
