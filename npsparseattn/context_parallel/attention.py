"""``context_parallel_attention`` and its backward (public API)."""

from __future__ import annotations

from typing import Any

from npsparseattn.context_parallel import modes
from npsparseattn.context_parallel.arguments import prepare
from npsparseattn.distributed.base import Communicator
from npsparseattn.interop.dlpack import accepts_dlpack

Window = tuple[int | None, int | None]


def run_forward(op: str, q: Any, k: Any, v: Any, comm: Any, *, return_lse: Any = False, **options: Any) -> Any:
    """Validate, agree, run the mode's forward and restore the caller's axes (``op`` names the call in errors)."""
    setup = prepare(op, comm, q, k, v, flags={"return_lse": return_lse}, **options)
    out, lse = modes.forward(setup)
    p = setup.problem
    out = p.restore(out.astype(p.dtype, copy=False))
    return (out, p.restore(lse)) if return_lse else out


def run_backward(
    op: str, dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, comm: Any, **options: Any
) -> tuple[Any, Any, Any]:
    """Validate, agree, run the mode's backward and restore the caller's axes."""
    setup = prepare(op, comm, q, k, v, gradients=(dout, out, lse), **options)
    p = setup.problem
    return tuple(p.restore(g.astype(p.dtype, copy=False)) for g in modes.backward(setup))


@accepts_dlpack
def context_parallel_attention(
    q: Any,
    k: Any,
    v: Any,
    comm: Communicator,
    *,
    mode: str = "ring",
    ulysses_size: int | None = None,
    sharding: str = "zigzag",
    cu_seqlens: Any = None,
    layout: Any = None,
    kv_idx: Any = None,
    kv_cnt: Any = None,
    q_block: int | None = None,
    kv_block: int | None = None,
    causal: bool = False,
    window: Window | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Any:
    """Exact attention over a sequence sharded across the ranks of ``comm``, in one of four modes.

    Call it on every rank with that rank's shard (cut with
    :func:`npsparseattn.shard`); each rank gets its shard of the output,
    equal to the matching rows of single-process attention on the whole
    sequence (:func:`npsparseattn.attention`, or
    :func:`npsparseattn.attention_varlen` with ``cu_seqlens``,
    :func:`npsparseattn.block_sparse_attention` with ``layout``, or
    :func:`npsparseattn.sparse_attention` with ``kv_idx``).

    Parameters
    ----------
    q : array, shape (*batch, Hq, L_local, D), (Hq, L_local, D) or (L_local, D)
    k : array, shape (*batch, Hk, L_local, D), ``Hq % Hk == 0`` (GQA/MQA)
    v : array, shape (*batch, Hk, L_local, Dv)
        This rank's shard; every rank's ``L_local`` is checked against
        ``sharding`` (and ``cu_seqlens``, ``layout``'s block).
    comm : Communicator
        :class:`~npsparseattn.distributed.MPIComm` (NumPy arrays) or
        :class:`~npsparseattn.distributed.NCCLComm` (CuPy arrays).
    mode : ``"ring"``, ``"ulysses"``, ``"hybrid"`` or ``"allgather"``
        ``"ring"``: K/V shards travel between ranks (relayed neighbour to
        neighbour, or sent directly to the ranks that need them when some
        rank pairs need nothing).  ``"ulysses"``: an all-to-all gives each
        rank the whole sequence for ``Hq / P`` heads (needs ``Hq % P == 0``
        and ``Hk`` a multiple or divisor of ``P``; key/value heads are
        replicated when ``Hk < P``).  ``"hybrid"``: Ulysses inside groups of
        ``ulysses_size`` ranks, a ring across the groups.
        ``"allgather"``: each rank gathers the K/V shards it needs at once
        (suits GQA with few key/value heads).  The trade-offs:
        ``docs/context_parallel.md``.
    ulysses_size : int, optional
        Ranks per Ulysses group: ``None`` (all ranks) for ``"ulysses"``,
        required for ``"hybrid"`` (a divisor of the world size).
    sharding : ``"zigzag"`` (default), ``"contiguous"`` or ``"per_document"``
        How the sequence was sharded (:func:`npsparseattn.shard`).
        ``"per_document"`` zigzags every document of ``cu_seqlens`` on its own.
    cu_seqlens : integer array (n_docs + 1,), optional
        Packed documents over the whole sequence (offsets from 0 to ``L``,
        the same on every rank): a query sees keys of its own document only,
        and ``causal``/``window`` apply inside documents (flash-attn's varlen
        for self-attention, ``cu_seqlens_q == cu_seqlens_k``).
    layout : BlockLayout, optional
        A block-sparse layout over the whole sequence (``seq == (L, L)``,
        heads 1 or ``Hq``); masks apply on top.  Shards must be cut at
        multiples of its block (``shard(..., block=b)``, ``b`` the lcm of
        ``layout.block``).  Steps in which a rank needs no block of the
        incoming shard are skipped and nothing is sent for them.
    kv_idx : integer array (*batch, Hk, ceil(L / q_block), K), optional
        :func:`npsparseattn.sparse_attention`'s index over the whole sequence
        (the same on every rank; indices count key blocks of the whole
        sequence, ``-1`` unused), instead of ``layout``; masks apply on top.
        Shards must be cut at multiples of ``lcm(q_block, kv_block)``;
        steps are skipped as with a layout.  Ranks compare a fingerprint.
    kv_cnt : integer array (*batch, Hk, ceil(L / q_block)), optional
        Slots in use at the front of each list of ``kv_idx`` (default: all).
    q_block, kv_block : int, optional
        ``kv_idx``'s block edges in queries and keys (default 64 each).
    causal, window, scale
        As for :func:`npsparseattn.attention`, in global positions of the
        whole sequence (query ``i`` sees key ``j <= i`` when causal).
    return_lse : bool
        Also return this rank's shard of ``lse`` (*batch, Hq, L_local).
    backend : str
        The per-block compute: ``"auto"`` or any backend of ``attention``
        (and of ``block_sparse_attention`` with a layout, of
        ``sparse_attention`` with ``kv_idx``).

    Returns
    -------
    out : array, shape (*batch, Hq, L_local, Dv), dtype of ``q``
    lse : array, shape (*batch, Hq, L_local), float32 (float64 for float64 inputs), if ``return_lse``

    Raises
    ------
    RankArgumentError (a ValueError), on every rank
        Shapes (other than ``L_local``), dtypes or options differ across
        ranks, local lengths do not match the sharding, or some rank's
        arguments are invalid (that rank raises the specific error).
    RingTimeoutError
        A peer died or stalls (``comm.timeout`` seconds without progress).

    Examples
    --------
    The same script runs under ``mpiexec -n 4 python script.py`` and
    directly (one rank):

    >>> import numpy as np
    >>> import npsparseattn as nsa
    >>> from npsparseattn.distributed import MPIComm
    >>> comm = MPIComm()
    >>> rng = np.random.default_rng(0)                    # the same full inputs on every rank
    >>> q = rng.standard_normal((8, 256, 32), dtype=np.float32)          # (Hq, L, D)
    >>> k, v = rng.standard_normal((2, 2, 256, 32), dtype=np.float32)    # (Hk, L, D): GQA
    >>> cu = np.array([0, 100, 256])                                     # two packed documents
    >>> cut = dict(sharding="per_document", cu_seqlens=cu)
    >>> mine = [nsa.shard(x, comm.rank, comm.size, **cut) for x in (q, k, v)]
    >>> out = nsa.context_parallel_attention(*mine, comm, mode="ulysses", causal=True, **cut)
    >>> full = nsa.attention_varlen(q, k, v, cu, cu, causal=True)
    >>> bool(np.allclose(out, nsa.shard(full, comm.rank, comm.size, **cut), atol=1e-5))
    True
    """
    return run_forward(
        "context_parallel_attention", q, k, v, comm, mode=mode, ulysses_size=ulysses_size, sharding=sharding,
        cu_seqlens=cu_seqlens, layout=layout, kv_idx=kv_idx, kv_cnt=kv_cnt, q_block=q_block, kv_block=kv_block,
        causal=causal, window=window, scale=scale, return_lse=return_lse, backend=backend,
    )  # fmt: skip


@accepts_dlpack
def context_parallel_attention_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    comm: Communicator,
    *,
    mode: str = "ring",
    ulysses_size: int | None = None,
    sharding: str = "zigzag",
    cu_seqlens: Any = None,
    layout: Any = None,
    kv_idx: Any = None,
    kv_cnt: Any = None,
    q_block: int | None = None,
    kv_block: int | None = None,
    causal: bool = False,
    window: Window | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[Any, Any, Any]:
    """Gradients of :func:`context_parallel_attention` for this rank's shard.

    Each block's contribution uses the final ``out`` and ``lse``
    (FlashAttention-2: ``P = exp(scale*S - lse)``, ``D = rowsum(dout*out)``),
    so it is exact on its own; ``dq`` accumulates where the queries are and
    the ``dk``/``dv`` contributions reach the rank that owns the keys (in the
    ring, with the travelling shard or straight back to the owner; in
    all-gather mode by one all-to-all; in Ulysses mode by the all-to-all
    back, replicated key/value heads summed), summed in a fixed order.

    Parameters
    ----------
    dout : array, shape (*batch, Hq, L_local, Dv)
        This rank's shard of the gradient of the loss with respect to ``out``.
    q, k, v, comm : as for :func:`context_parallel_attention`
    out, lse : this rank's forward outputs (``return_lse=True``)
    mode, ulysses_size, sharding, cu_seqlens, layout, kv_idx, kv_cnt, q_block, kv_block, causal, window, scale, backend
        As for the forward call.

    Returns
    -------
    dq, dk, dv : this rank's shards, shaped like ``q``, ``k``, ``v`` and of their dtype
        (``dk``/``dv`` summed over each GQA group).

    Examples
    --------
    >>> import numpy as np
    >>> import npsparseattn as nsa
    >>> from npsparseattn.distributed import MPIComm
    >>> comm = MPIComm()
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((4, 256, 32)) for _ in range(3))
    >>> mine = [nsa.shard(x, comm.rank, comm.size) for x in (q, k, v)]
    >>> out, lse = nsa.context_parallel_attention(*mine, comm, mode="allgather", causal=True, return_lse=True)
    >>> grads = nsa.context_parallel_attention_backward(np.ones_like(out), *mine, out, lse, comm,
    ...                                                 mode="allgather", causal=True)
    >>> [g.shape == x.shape for g, x in zip(grads, mine)]
    [True, True, True]
    """
    return run_backward(
        "context_parallel_attention_backward", dout, q, k, v, out, lse, comm, mode=mode, ulysses_size=ulysses_size,
        sharding=sharding, cu_seqlens=cu_seqlens, layout=layout, kv_idx=kv_idx, kv_cnt=kv_cnt, q_block=q_block,
        kv_block=kv_block, causal=causal, window=window, scale=scale, backend=backend,
    )  # fmt: skip
