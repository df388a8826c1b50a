"""Ring attention: exact attention over a sequence sharded across processes.

Every rank holds a shard of ``q``, ``k`` and ``v`` along the sequence axis.
Key/value blocks travel the ring: at step ``s`` rank ``r`` holds the K/V shard
of rank ``(r - s) mod P``, posts the transfer of that shard to rank ``r + 1``
*before* computing on it, computes its queries against it with the
``attention`` kernels the registry chooses (``backend``: any implementation
of ``attention``, so a GPU backend serves CuPy arrays), and merges the
partial ``(out, lse)`` exactly (:func:`npsparseattn.merge_states`).  After ``P`` steps
every query has seen every key.

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
``dk``/``dv`` accumulators travel the ring with K/V and arrive home after ``P``
steps.

See ``docs/ring.md`` for the schedule, the merge math, MPI/NCCL setup and the
failure behaviour.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from npsparseattn._arrays import array_module, common_kind
from npsparseattn._checks import check_backend, check_flag, clamp_window, is_int
from npsparseattn._dispatch import Implementation, backend_names, select
from npsparseattn._glue import kernel_array, kernel_lse
from npsparseattn.distributed.agree import Field, RankArgumentError, agree
from npsparseattn.distributed.base import Communicator
from npsparseattn.interop.dlpack import accepts_dlpack
from npsparseattn.merge import merge_into
from npsparseattn.problems import AttentionProblem, attention_problem, gradient_inputs, lse_dtype

SHARDINGS = ("zigzag", "contiguous")
Window = tuple[int | None, int | None]

# --------------------------------------------------------------------------- sharding


def check_sharding(sharding: Any) -> str:
    """``"zigzag"`` or ``"contiguous"``."""
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be 'zigzag' or 'contiguous', got {sharding!r}")
    return sharding


def _check_world(rank: Any, world: Any) -> tuple[int, int]:
    for name, value in (("world", world), ("rank", rank)):
        if not is_int(value):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    return int(rank), int(world)


def _split(length: int, parts: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of ``parts`` near-equal consecutive pieces (the first ``length % parts`` one longer)."""
    base, extra = divmod(length, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def shard_pieces(length: int, world: int, rank: int, sharding: str = "zigzag") -> list[tuple[int, int]]:
    """Global ``[start, stop)`` ranges of the sequence that ``rank`` holds, in local order.

    >>> shard_pieces(10, 2, 0, "zigzag")   # chunks 0 and 3 of 4
    [(0, 3), (8, 10)]
    >>> shard_pieces(10, 2, 1, "contiguous")
    [(5, 10)]
    """
    rank, world = _check_world(rank, world)
    if check_sharding(sharding) == "contiguous":
        return [_split(length, world)[rank]]
    chunks = _split(length, 2 * world)
    return [chunks[rank], chunks[2 * world - 1 - rank]]


def shard_lengths(length: int, world: int, sharding: str = "zigzag") -> list[int]:
    """Local length of every rank for a sequence of ``length``.

    >>> shard_lengths(11, 3, "zigzag")
    [3, 4, 4]
    """
    return [sum(b - a for a, b in shard_pieces(length, world, r, sharding)) for r in range(world)]


def _axis(x: Any, axis: Any) -> int:
    if not is_int(axis):
        raise TypeError(f"axis must be an int, got {axis!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for an array with {x.ndim} axes")
    return int(axis) % x.ndim


@accepts_dlpack
def shard(x: Any, rank: int, world: int, sharding: str = "zigzag", *, axis: int = -2) -> Any:
    """The part of the full sequence ``x`` that ``rank`` of ``world`` holds (a copy).

    Parameters
    ----------
    x : array (NumPy or CuPy), the whole sequence along ``axis``
        ``q``/``k``/``v``/``out``/``dout`` (..., L, D) use ``axis=-2``;
        ``lse`` (..., L) uses ``axis=-1``.
    rank, world : int
        This process and the number of processes.
    sharding : ``"zigzag"`` or ``"contiguous"``
        Contiguous: ``world`` near-equal slices.  Zigzag: ``2*world`` chunks,
        rank ``r`` holds chunks ``r`` and ``2*world-1-r`` (balances causal work).

    Returns
    -------
    array with ``sum(shard_lengths(...)[rank])`` along ``axis``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(8)[:, None]                  # (L=8, D=1)
    >>> shard(x, 0, 2)[:, 0], shard(x, 1, 2)[:, 0]  # zigzag: chunks (0, 3) and (1, 2)
    (array([0, 1, 6, 7]), array([2, 3, 4, 5]))
    """
    xp = array_module(common_kind(x=x))
    ax = _axis(x, axis)
    pieces = shard_pieces(x.shape[ax], world, rank, sharding)
    index = [slice(None)] * x.ndim
    parts = []
    for start, stop in pieces:
        index[ax] = slice(start, stop)
        parts.append(x[tuple(index)])
    return xp.concatenate(parts, axis=ax)


@accepts_dlpack
def unshard(shards: Sequence[Any], sharding: str = "zigzag", *, axis: int = -2) -> Any:
    """Inverse of :func:`shard`: the full sequence from every rank's shard, in rank order.

    >>> import numpy as np
    >>> x = np.arange(10.0).reshape(5, 2)
    >>> bool((unshard([shard(x, r, 3) for r in range(3)]) == x).all())
    True
    """
    if not isinstance(shards, Sequence) or isinstance(shards, (str, bytes)):
        raise TypeError(f"shards must be a list or tuple of arrays, one per rank, got {type(shards).__name__}")
    if len(shards) < 1:
        raise ValueError("unshard needs the shards of at least one rank")
    world = len(shards)
    xp = array_module(common_kind(**{f"shards[{i}]": s for i, s in enumerate(shards)}))
    ax = _axis(shards[0], axis)
    lengths = [s.shape[ax] for s in shards]
    total = sum(lengths)
    expected = shard_lengths(total, world, sharding)
    if lengths != expected:
        raise ValueError(
            f"shard lengths {lengths} along axis {axis} do not match sharding {sharding!r} for a total length "
            f"{total} over {world} ranks (expected {expected}); pass the shards in rank order"
        )
    placed: list[tuple[int, Any]] = []
    index = [slice(None)] * shards[0].ndim
    for rank, part in enumerate(shards):
        local = 0
        for start, stop in shard_pieces(total, world, rank, sharding):
            index[ax] = slice(local, local + stop - start)
            placed.append((start, part[tuple(index)]))
            local += stop - start
    placed.sort(key=lambda item: item[0])
    return xp.concatenate([p for _, p in placed], axis=ax)


# --------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class BlockCall:
    """One kernel call of a ring step: local query rows ``q`` against local key rows ``k``.

    Query ``i`` of the call is aligned with key ``i + offset`` of the call;
    ``left``/``right`` are the window bounds (``None`` = unbounded: every
    pair visible).
    """

    q: slice
    k: slice
    offset: int
    left: int | None
    right: int | None


EMPTY, PARTIAL, FULL = 0, 1, 2


def _classify(q: tuple[int, int], k: tuple[int, int], left: int | None, right: int | None) -> int:
    """Is global key range ``k`` invisible, partly or fully visible to query range ``q``?"""
    (qs, qe), (ks, ke) = q, k
    if qe <= qs or ke <= ks:
        return EMPTY
    if (right is not None and ks > qe - 1 + right) or (left is not None and ke - 1 < qs - left):
        return EMPTY
    if (right is None or ke - 1 <= qs + right) and (left is None or ks >= qe - 1 - left):
        return FULL
    return PARTIAL


def _local(pieces: list[tuple[int, int]]) -> list[slice]:
    out, at = [], 0
    for start, stop in pieces:
        out.append(slice(at, at + stop - start))
        at += stop - start
    return out


def block_calls(
    q_pieces: list[tuple[int, int]], k_pieces: list[tuple[int, int]], left: int | None, right: int | None
) -> list[BlockCall]:
    """The kernel calls that compute local queries (global ``q_pieces``) against a K/V shard.

    Pieces are global ``[start, stop)`` ranges in local order.  Pairs the mask
    empties are skipped; a query piece whose visible key pieces are all fully
    visible and adjacent becomes one unmasked call, and consecutive query
    pieces with the same such call are fused (so non-causal steps, and the
    off-diagonal causal zigzag steps, are one call each).

    >>> block_calls([(0, 2), (6, 8)], [(2, 4), (4, 6)], None, 0)    # zigzag, P=2, rank 0, step 1
    [BlockCall(q=slice(2, 4, None), k=slice(0, 4, None), offset=0, left=None, right=None)]
    """
    q_local, k_local = _local(q_pieces), _local(k_pieces)
    rows: list[BlockCall] = []
    for qi, qp in enumerate(q_pieces):
        status = [_classify(qp, kp, left, right) for kp in k_pieces]
        visible = [ki for ki, st in enumerate(status) if st != EMPTY]
        if not visible:
            continue
        adjacent = visible == list(range(visible[0], visible[-1] + 1))
        if adjacent and all(status[ki] == FULL for ki in visible):
            k = slice(k_local[visible[0]].start, k_local[visible[-1]].stop)
            call = BlockCall(q_local[qi], k, 0, None, None)
            last = rows[-1] if rows else None
            if (
                last is not None
                and last.left is None
                and last.right is None
                and last.k == k
                and last.q.stop == call.q.start
            ):
                rows[-1] = BlockCall(slice(last.q.start, call.q.stop), k, 0, None, None)
            else:
                rows.append(call)
            continue
        for ki in visible:
            full = status[ki] == FULL
            rows.append(
                BlockCall(
                    q_local[qi],
                    k_local[ki],
                    0 if full else qp[0] - k_pieces[ki][0],
                    None if full else left,
                    None if full else right,
                )
            )
    return rows


# --------------------------------------------------------------------------- validation


@dataclass
class _Ring:
    """Everything a rank needs to run the ring, after every rank agreed on the arguments."""

    comm: Communicator
    problem: AttentionProblem
    kernels: Implementation
    sharding: str
    lengths: list[int]
    xp: Any
    dtype: Any
    compute_dtype: Any

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def pieces(self, rank: int) -> list[tuple[int, int]]:
        return shard_pieces(self.total, self.comm.size, rank, self.sharding)

    def calls(self, src: int) -> list[BlockCall]:
        p = self.problem
        return block_calls(self.pieces(self.comm.rank), self.pieces(src), p.left, p.right)

    def kv_shape(self, rank: int, width: int) -> tuple[int, ...]:
        b, hk = self.problem.k.shape[:2]
        return (b, hk, self.lengths[rank], width)

    def compute(self, x: Any) -> Any:
        """``x`` as a C-contiguous array of the kernels' compute dtype (one kernel signature for every call)."""
        return kernel_array(x, self.compute_dtype, False)

    def compute_lse(self, lse: Any) -> Any:
        """The global ``lse`` as the backward kernels read it."""
        return kernel_lse(self.kernels, self.problem.dtype, lse)

    def visibility(self, q: Any, k: Any, call: BlockCall) -> dict[str, Any]:
        """The kernel contract's keywords for one block, bounds cut to the block's extent."""
        left, right = clamp_window(call.left, call.right, q.shape[2], k.shape[2], call.offset)
        return dict(scale=self.problem.scale, offset=call.offset, left=left, right=right)

    def forward(self, q: Any, k: Any, v: Any, call: BlockCall) -> tuple[Any, Any]:
        """One block of the forward through the chosen attention kernels."""
        return self.kernels.module.forward(q, self.compute(k), self.compute(v), **self.visibility(q, k, call))

    def backward(self, dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, call: BlockCall) -> tuple[Any, ...]:
        """One block of the backward (with the global ``out``/``lse``) through the chosen attention kernels."""
        k, v = self.compute(k), self.compute(v)
        return self.kernels.module.backward(dout, q, k, v, out, lse, **self.visibility(q, k, call))


_DTYPE_CODES = ("float16", "bfloat16", "float32", "float64")
_KIND_CODES = ("numpy", "cupy")


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


_MAX_AXES = 8


def _fields(problem: AttentionProblem | None, sharding: str, backend: str) -> list[Field]:
    """What must be equal on every rank.  ``problem=None`` (local checks failed): placeholder values."""
    p = problem
    absent = -1

    def show_size(x: int) -> str:
        return "absent" if x == absent else str(x)

    def show_bound(x: int) -> str:
        return "None" if x == absent else str(x)

    def bound(x: int | None) -> int:
        return absent if x is None else x

    lead = (*p.batch_shape, p.n_heads) if p else ()
    if p and p.ndim == 2:
        lead = ()
    fields = [Field("number of axes of q", p.ndim if p else 0)]
    for i in range(1, _MAX_AXES - 1):
        size = lead[-i] if len(lead) >= i else absent
        fields.append(Field(f"q.shape[{-2 - i}]", size, show_size))
    fields.append(Field(f"product of q axes before axis {-_MAX_AXES}", int(np.prod(lead[: -(_MAX_AXES - 2)] or (1,)))))
    fields += [
        Field("number of key/value heads Hk", p.k.shape[1] if p else 0),
        Field("head dimension D", p.q.shape[3] if p else 0),
        Field("value dimension Dv", p.v.shape[3] if p else 0),
        Field("dtype", _DTYPE_CODES.index(p.dtype.name) if p else 0, lambda c: _DTYPE_CODES[c]),
        Field("array kind", _KIND_CODES.index(p.kind) if p else 0, lambda c: _KIND_CODES[c]),
        Field("causal", int(p.causal) if p else 0, lambda c: str(bool(c))),
        Field("window left", bound(p.left) if p else 0, show_bound),
        Field("window right (causal sets 0)", bound(p.right) if p else 0, show_bound),
        Field("scale", _float_bits(p.scale) if p else 0, _show_float_bits),
        Field("sharding", SHARDINGS.index(sharding) if sharding in SHARDINGS else 0, lambda c: repr(SHARDINGS[c])),
        Field("backend", _name_code(backend), _show_backend),
    ]
    return fields


def _name_code(name: str) -> int:
    return zlib.crc32(name.encode())


def _show_backend(code: int) -> str:
    names = {_name_code(name): name for name in ["auto", *backend_names()]}
    return repr(names[code]) if code in names else f"a backend unknown here (code {code})"


def _show_float_bits(bits: int) -> str:
    return repr(struct.unpack("<d", struct.pack("<q", bits))[0])


def _prepare(
    op: str,
    comm: Any,
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: Any,
    window: Any,
    scale: Any,
    sharding: Any,
    backend: Any,
    gradients: tuple[Any, Any, Any] | None = None,
    flags: dict[str, Any] | None = None,
) -> tuple[_Ring, Any]:
    """Local checks, then one collective agreement; the same error on every rank if anything is off."""
    if not isinstance(comm, Communicator):
        raise TypeError(
            f"comm must be a npsparseattn.distributed.Communicator (MPIComm or NCCLComm), got {type(comm).__name__}"
        )
    problem, grads, kernels, error = None, None, None, None
    try:
        check_sharding(sharding)
        check_backend(backend)
        for name, value in (flags or {}).items():
            check_flag(value, name)
        problem = attention_problem(q, k, v, causal=causal, window=window, scale=scale, clamp=False)
        kernels = select("ring_attention", problem, backend)
        if problem.kind not in comm.kinds:
            raise TypeError(
                f"{type(comm).__name__} moves {' or '.join(comm.kinds)} arrays but q, k, v are {problem.kind} arrays"
            )
        if problem.seq_q != problem.seq_k:
            raise ValueError(
                f"q and k must hold the same local sequence length (ring attention shards one sequence): "
                f"q has {problem.seq_q}, k has {problem.seq_k}"
            )
        if gradients is not None:
            grads = gradient_inputs(problem, *gradients)
    except (TypeError, ValueError) as err:
        error = err
    fields = _fields(problem if error is None else None, sharding, backend if isinstance(backend, str) else "")
    lengths = agree(comm, op, fields, 0 if problem is None else problem.seq_q, failed=error is not None)
    if error is not None:
        raise error
    expected = shard_lengths(sum(lengths), comm.size, sharding)
    if lengths != expected:
        raise RankArgumentError(
            f"{op}: local sequence lengths {lengths} (ranks 0..{comm.size - 1}) do not match sharding {sharding!r} "
            f"for the total length {sum(lengths)} (expected {expected}); cut the sequence with "
            f"npsparseattn.shard(x, rank, world, sharding={sharding!r})"
        )
    ring = _Ring(
        comm, problem, kernels, sharding, lengths, array_module(problem.kind), lse_dtype(problem.dtype),
        kernels.compute_dtype(problem.dtype),
    )  # fmt: skip
    return ring, grads


# --------------------------------------------------------------------------- forward


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
    ring, _ = _prepare(
        "ring_attention",
        comm,
        q,
        k,
        v,
        causal=causal,
        window=window,
        scale=scale,
        sharding=sharding,
        backend=backend,
        flags={"return_lse": return_lse},
    )
    out, lse = _forward(ring)
    p = ring.problem
    out = p.restore(out.astype(p.dtype, copy=False))
    return (out, p.restore(lse)) if return_lse else out


class _KVBuffers:
    """Two flat buffers per travelling K/V array (compute dtype), as large as the largest shard; contiguous views."""

    def __init__(self, ring: _Ring, widths: Sequence[int]):
        self.ring = ring
        self.widths = widths
        size = max(int(np.prod(ring.kv_shape(r, 1))) for r in range(ring.comm.size))
        self.flat = [[ring.xp.empty(size * w, ring.compute_dtype) for w in widths] for _ in range(2)]

    def view(self, slot: int, rank: int) -> list[Any]:
        """Slot ``slot`` shaped as the shard of ``rank``."""
        out = []
        for flat, w in zip(self.flat[slot], self.widths):
            shape = self.ring.kv_shape(rank, w)
            out.append(flat[: int(np.prod(shape))].reshape(shape))
        return out


def _forward(ring: _Ring) -> tuple[Any, Any]:
    """This rank's ``(out, lse)`` in canonical form, accumulated in float32 (float64 for float64 inputs)."""
    comm, p, xp, dt = ring.comm, ring.problem, ring.xp, ring.dtype
    size, rank = comm.size, comm.rank
    q = ring.compute(p.q)
    b, hq, length = q.shape[:3]
    out = xp.zeros((b, hq, length, p.v.shape[3]), dt)
    lse = xp.full((b, hq, length), -np.inf, dt)
    buffers = _KVBuffers(ring, (p.k.shape[3], p.v.shape[3]))
    current = buffers.view(0, rank)
    current[0][...] = p.k
    current[1][...] = p.v
    q_parts: dict[tuple[int, int], Any] = {}
    for step in range(size):
        src = (rank - step) % size
        transfer = None
        if step < size - 1:
            incoming = buffers.view((step + 1) % 2, (rank - step - 1) % size)
            transfer = comm.shift(current, incoming, tag=0)
        k_cur, v_cur = current
        for call in ring.calls(src):
            key = (call.q.start, call.q.stop)
            if key not in q_parts:
                q_parts[key] = ring.compute(q[:, :, call.q])
            block_out, block_lse = ring.forward(q_parts[key], k_cur[:, :, call.k], v_cur[:, :, call.k], call)
            merge_into(out[:, :, call.q], lse[:, :, call.q], block_out, block_lse)
        if transfer is not None:
            comm.wait(transfer)
            current = incoming
    return out, lse


# --------------------------------------------------------------------------- backward


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
    ring, grads = _prepare(
        "ring_attention_backward",
        comm,
        q,
        k,
        v,
        causal=causal,
        window=window,
        scale=scale,
        sharding=sharding,
        backend=backend,
        gradients=(dout, out, lse),
    )
    dq, dk, dv = _backward(ring, grads)
    p = ring.problem
    return tuple(p.restore(g.astype(p.dtype, copy=False)) for g in (dq, dk, dv))


def _backward(ring: _Ring, grads: Any) -> tuple[Any, Any, Any]:
    """This rank's ``(dq, dk, dv)``, accumulated in float32 (float64 for float64 inputs)."""
    comm, p, xp, dt = ring.comm, ring.problem, ring.xp, ring.dtype
    size, rank = comm.size, comm.rank
    q, dout, out = (ring.compute(x) for x in (p.q, grads.dout, grads.out))
    lse = ring.compute_lse(grads.lse)
    dq = xp.zeros(q.shape, dt)
    d, dv_width = p.k.shape[3], p.v.shape[3]
    kv = _KVBuffers(ring, (d, dv_width))
    current = kv.view(0, rank)
    current[0][...] = p.k
    current[1][...] = p.v
    rows: dict[tuple[int, int], tuple[Any, Any, Any, Any]] = {}
    grad_transfer, arriving = None, None
    for step in range(size):
        src = (rank - step) % size
        kv_transfer = None
        if step < size - 1:
            incoming = kv.view((step + 1) % 2, (rank - step - 1) % size)
            kv_transfer = comm.shift(current, incoming, tag=0)
        k_cur, v_cur = current
        dk_blk = xp.zeros(ring.kv_shape(src, d), dt)
        dv_blk = xp.zeros(ring.kv_shape(src, dv_width), dt)
        for call in ring.calls(src):
            key = (call.q.start, call.q.stop)
            if key not in rows:
                parts = (ring.compute(x[:, :, call.q]) for x in (dout, q, out))
                rows[key] = (*parts, ring.compute_lse(lse[:, :, call.q]))
            dout_c, q_c, out_c, lse_c = rows[key]
            dq_c, dk_c, dv_c = ring.backward(dout_c, q_c, k_cur[:, :, call.k], v_cur[:, :, call.k], out_c, lse_c, call)
            dq[:, :, call.q] += dq_c
            dk_blk[:, :, call.k] += dk_c
            dv_blk[:, :, call.k] += dv_c
        if grad_transfer is not None:
            comm.wait(grad_transfer)
            dk_blk += arriving[0]
            dv_blk += arriving[1]
        if size > 1:
            # the accumulators of block src go on to the next rank; the last step sends them home
            arriving = [xp.empty(ring.kv_shape((rank - step - 1) % size, w), dt) for w in (d, dv_width)]
            grad_transfer = comm.shift([dk_blk, dv_blk], arriving, tag=1)
        else:
            arriving = [dk_blk, dv_blk]
        if kv_transfer is not None:
            comm.wait(kv_transfer)
            current = incoming
    if grad_transfer is not None:
        comm.wait(grad_transfer)
    return dq, arriving[0], arriving[1]
