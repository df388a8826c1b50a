"""Argument checks of context-parallel attention: local rules first, then one agreement across ranks.

Every rank validates its own arguments, then all ranks take part in one
:func:`~npsparseattn.distributed.agree.agree` (an ``allreduce`` with the
communicator's deadline) of what must be equal everywhere (shapes but the
local length, dtype, options, mode, sharding, a fingerprint of
``cu_seqlens``, of the layout and of ``kv_idx``) and of every rank's local length.  Every
rank reaches the same verdict and raises the same error, before any data
moves; the rules that need the total length (sharding lengths, offsets,
layout size and alignment) are checked after the agreement, on values every
rank shares (``kv_idx``'s query blocks, range and repeats included), so
they too fail everywhere at once.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from npsparseattn._arrays import array_module
from npsparseattn._checks import check_backend, check_flag, check_int, is_int
from npsparseattn._dispatch import backend_names, select
from npsparseattn.context_parallel.engine import Kernels
from npsparseattn.context_parallel.heads import head_rule_error
from npsparseattn.context_parallel.selection import IndexSelection, KeyBlockSelection, LayoutSelection
from npsparseattn.context_parallel.sharding import (
    SHARDINGS,
    Piece,
    check_sharding,
    document_offsets,
    shard_lengths,
    shard_pieces,
)
from npsparseattn.distributed.agree import Field, RankArgumentError, agree
from npsparseattn.distributed.base import Communicator
from npsparseattn.layouts import BlockLayout
from npsparseattn.problems import AttentionProblem, Gradients, SparseProblem, attention_problem, gradient_inputs
from npsparseattn.problems.sparse import canonical_index
from npsparseattn.problems.varlen import host_indices

MODES = ("ring", "ulysses", "hybrid", "allgather")
_DTYPE_CODES = ("float16", "bfloat16", "float32", "float64")
_KIND_CODES = ("numpy", "cupy")
_MAX_AXES = 8


def check_mode(mode: Any) -> str:
    """One of :data:`MODES`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    return mode


def check_ulysses_size(ulysses_size: Any, mode: str, world: int) -> int:
    """The Ulysses group size: ``world`` for ``"ulysses"``, a divisor of ``world`` for ``"hybrid"``, else 1."""
    if mode in ("ring", "allgather"):
        if ulysses_size is not None:
            raise ValueError(f"ulysses_size is for mode='ulysses' or 'hybrid', not mode={mode!r}; leave it None")
        return 1
    if ulysses_size is None:
        if mode == "ulysses":
            return world
        raise ValueError(
            f"mode='hybrid' needs ulysses_size: the ranks of one Ulysses group (a divisor of the {world} ranks); "
            f"the ring runs across the {world} // ulysses_size groups"
        )
    if not is_int(ulysses_size):
        raise TypeError(f"ulysses_size must be an int or None, got {ulysses_size!r}")
    if mode == "ulysses" and ulysses_size != world:
        raise ValueError(
            f"mode='ulysses' spreads heads over all {world} ranks (ulysses_size={world} or None), got "
            f"{ulysses_size}; for smaller groups with a ring across them use mode='hybrid'"
        )
    if ulysses_size < 1 or world % ulysses_size:
        raise ValueError(f"ulysses_size must divide the {world} ranks, got {ulysses_size}")
    return int(ulysses_size)


def check_layout_argument(layout: Any, problem: AttentionProblem) -> BlockLayout | None:
    """``None`` or a :class:`BlockLayout` whose heads fit ``q`` (its size is checked against the total length later)."""
    if layout is None:
        return None
    if not isinstance(layout, BlockLayout):
        raise TypeError(
            f"layout must be None or an npsparseattn.layouts.BlockLayout over the whole sequence, "
            f"got {type(layout).__name__}"
        )
    if layout.heads not in (1, problem.n_heads):
        raise ValueError(
            f"layout has {layout.heads} heads but q has {problem.n_heads} query heads; a layout serves every "
            f"head (heads=1) or gives one pattern per query head (heads={problem.n_heads})"
        )
    return layout


@dataclass(frozen=True)
class IndexArguments:
    """``kv_idx``/``kv_cnt`` on the host (int64, (B, Hk, nqb, K) and (B, Hk, nqb) or None) and the block sizes."""

    kv_idx: np.ndarray
    kv_cnt: np.ndarray | None
    q_block: int
    kv_block: int
    shape: tuple[int, ...]  # the caller's shape of kv_idx, for the messages

    def fingerprint(self) -> int:
        cnt = "none" if self.kv_cnt is None else self.kv_cnt
        return fingerprint(self.kv_idx, self.kv_idx.shape, cnt, self.q_block, self.kv_block)


def check_index_arguments(
    kv_idx: Any, kv_cnt: Any, q_block: Any, kv_block: Any, layout: Any, problem: AttentionProblem
) -> IndexArguments | None:
    """``None`` (no ``kv_idx``) or the index arguments, checked but for what needs the total length.

    ``kv_idx`` has the axes of ``k`` with the sequence and head dimension
    replaced by the query blocks of the whole sequence and the slots (as for
    :func:`npsparseattn.sparse_attention`); ``kv_cnt`` its shape without the
    slots.
    """
    if kv_idx is None:
        named = (("kv_cnt", kv_cnt), ("q_block", q_block), ("kv_block", kv_block))
        given = [name for name, x in named if x is not None]
        if given:
            raise ValueError(f"{', '.join(given)} go(es) with kv_idx, which is None; pass kv_idx or leave them None")
        return None
    if layout is not None:
        raise ValueError("pass either layout (block-sparse) or kv_idx (sparse_attention's index), not both")
    q_block = 64 if q_block is None else check_int(q_block, "q_block", 1)
    kv_block = 64 if kv_block is None else check_int(kv_block, "kv_block", 1)
    if not hasattr(kv_idx, "shape") or not hasattr(kv_idx, "dtype"):
        raise TypeError(f"kv_idx must be an integer array (*batch, Hk, nqb, K), got {type(kv_idx).__name__}")
    hk = problem.k.shape[1]
    lead = () if problem.ndim == 2 else (hk,) if problem.ndim == 3 else (*problem.batch_shape, hk)
    shape = tuple(kv_idx.shape)
    if len(shape) != len(lead) + 2 or shape[: len(lead)] != lead:
        raise ValueError(
            f"kv_idx must have shape (*batch, Hk, ceil(L / q_block), K) in the axes of k, that is "
            f"{(*lead, 'nqb', 'K')} with L the whole sequence's length, got {shape}"
        )
    host = host_indices(kv_idx, "kv_idx", problem.kind)
    b = problem.k.shape[0]
    counts = None
    if kv_cnt is not None:
        if not hasattr(kv_cnt, "shape") or tuple(kv_cnt.shape) != shape[:-1]:
            got = tuple(kv_cnt.shape) if hasattr(kv_cnt, "shape") else type(kv_cnt).__name__
            raise ValueError(f"kv_cnt must have shape {shape[:-1]} (kv_idx's shape without its last axis), got {got}")
        counts = host_indices(kv_cnt, "kv_cnt", problem.kind)
        bad = (counts < 0) | (counts > shape[-1])
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"kv_cnt{list(at)} = {counts[at]}; a count must lie in [0, K={shape[-1]}]")
        counts = counts.reshape(b, hk, shape[-2])
    return IndexArguments(host.reshape(b, hk, *shape[-2:]), counts, q_block, kv_block, shape)


def index_problem(problem: AttentionProblem, index: IndexArguments) -> SparseProblem:
    """A :class:`SparseProblem` for choosing the ``sparse_attention`` backend (the index as given)."""
    cnt = np.full(index.kv_idx.shape[:-1], index.kv_idx.shape[-1]) if index.kv_cnt is None else index.kv_cnt
    return SparseProblem(problem, index.kv_idx, cnt, index.q_block, index.kv_block)


@dataclass
class Setup:
    """Everything a rank needs to run, after every rank agreed on the arguments."""

    op: str
    comm: Communicator
    problem: AttentionProblem
    kernels: Kernels
    mode: str
    ulysses_size: int
    sharding: str
    offsets: np.ndarray | None
    selection: KeyBlockSelection | None
    block: int
    lengths: list[int]
    grads: Gradients | None = None
    fingerprints: tuple[int, int] = (0, 0)  # of cu_seqlens and of the layout or kv_idx (0: none)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def pieces(self, rank: int) -> list[Piece]:
        """The global ranges ``rank`` holds, in its local order."""
        return shard_pieces(self.total, self.comm.size, rank, self.sharding, cu_seqlens=self.offsets, block=self.block)


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _show_float_bits(bits: int) -> str:
    return repr(struct.unpack("<d", struct.pack("<q", bits))[0])


def _name_code(name: str) -> int:
    return zlib.crc32(name.encode())


def _show_backend(code: int) -> str:
    names = {_name_code(name): name for name in ["auto", *backend_names()]}
    return repr(names[code]) if code in names else f"a backend unknown here (code {code})"


def fingerprint(*parts: Any) -> int:
    """A CRC-32 of arrays (their bytes) and plain values (their repr), plus 1 (0 means "none")."""
    crc = 0
    for part in parts:
        data = np.ascontiguousarray(part).tobytes() if isinstance(part, np.ndarray) else repr(part).encode()
        crc = zlib.crc32(data, crc)
    return crc + 1


def layout_fingerprint(layout: BlockLayout | None) -> int:
    if layout is None:
        return 0
    return fingerprint(layout.indptr, layout.indices, layout.block, layout.seq, layout.heads)


def _fields(p: AttentionProblem | None, values: dict[str, Any]) -> list[Field]:
    """What must be equal on every rank.  ``p=None`` (local checks failed): placeholder values."""
    absent = -1

    def show_size(x: int) -> str:
        return "absent" if x == absent else str(x)

    def show_bound(x: int) -> str:
        return "None" if x == absent else str(x)

    def bound(x: int | None) -> int:
        return absent if x is None else x

    def show_print(x: int) -> str:
        return "none" if x == 0 else f"fingerprint {x - 1:08x}"

    lead = (*p.batch_shape, p.n_heads) if p else ()
    if p and p.ndim == 2:
        lead = ()
    fields = [Field("number of axes of q", p.ndim if p else 0)]
    for i in range(1, _MAX_AXES - 1):
        size = lead[-i] if len(lead) >= i else absent
        fields.append(Field(f"q.shape[{-2 - i}]", size, show_size))
    fields.append(Field(f"product of q axes before axis {-_MAX_AXES}", int(np.prod(lead[: -(_MAX_AXES - 2)] or (1,)))))
    sharding, mode = values["sharding"], values["mode"]
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
        Field("backend", _name_code(values["backend"]), _show_backend),
        Field("mode", MODES.index(mode) if mode in MODES else 0, lambda c: repr(MODES[c])),
        Field("ulysses_size", values["ulysses_size"], lambda c: "None" if c == 0 else str(c)),
        Field("cu_seqlens", values["cu_seqlens"], show_print),
        Field("layout", values["layout"], show_print),
        Field("kv_idx (with kv_cnt, q_block, kv_block)", values["kv_idx"], show_print),
    ]
    return fields


def prepare(
    op: str,
    comm: Any,
    q: Any,
    k: Any,
    v: Any,
    *,
    mode: Any = "ring",
    ulysses_size: Any = None,
    sharding: Any = "zigzag",
    cu_seqlens: Any = None,
    layout: Any = None,
    kv_idx: Any = None,
    kv_cnt: Any = None,
    q_block: Any = None,
    kv_block: Any = None,
    causal: Any = False,
    window: Any = None,
    scale: Any = None,
    backend: Any = "auto",
    gradients: tuple[Any, Any, Any] | None = None,
    flags: dict[str, Any] | None = None,
) -> Setup:
    """Local checks, then one collective agreement; the same error on every rank if anything is off."""
    if not isinstance(comm, Communicator):
        raise TypeError(
            f"comm must be a npsparseattn.distributed.Communicator (MPIComm or NCCLComm), got {type(comm).__name__}"
        )
    problem, grads, dense, sparse, offsets, error, group = None, None, None, None, None, None, 1
    index = None
    try:
        check_mode(mode)
        check_sharding(sharding)
        check_backend(backend)
        for name, value in (flags or {}).items():
            check_flag(value, name)
        problem = attention_problem(q, k, v, causal=causal, window=window, scale=scale, clamp=False)
        group = check_ulysses_size(ulysses_size, mode, comm.size)
        layout = check_layout_argument(layout, problem)
        dense = select("ring_attention", problem, backend)
        index = check_index_arguments(kv_idx, kv_cnt, q_block, kv_block, layout, problem)
        if layout is not None:
            sparse = select("block_sparse_attention", problem, backend)
        if index is not None:
            sparse = select("sparse_attention", index_problem(problem, index), backend)
        if problem.kind not in comm.kinds:
            raise TypeError(
                f"{type(comm).__name__} moves {' or '.join(comm.kinds)} arrays but q, k, v are {problem.kind} arrays"
            )
        if problem.seq_q != problem.seq_k:
            raise ValueError(
                f"q and k must hold the same local sequence length (context parallelism shards one sequence): "
                f"q has {problem.seq_q}, k has {problem.seq_k}"
            )
        if cu_seqlens is not None:
            offsets = document_offsets(cu_seqlens)
        if sharding == "per_document" and offsets is None:
            raise ValueError("sharding='per_document' needs cu_seqlens, the offsets of the packed documents")
        if group > 1:
            reason = head_rule_error(problem.n_heads, problem.k.shape[1], group)
            if reason:
                raise ValueError(reason)
        if gradients is not None:
            grads = gradient_inputs(problem, *gradients)
    except (TypeError, ValueError) as err:
        error = err
    values = dict(
        sharding=sharding,
        mode=mode,
        backend=backend if isinstance(backend, str) else "",
        ulysses_size=0 if error else (ulysses_size or 0) if is_int(ulysses_size) else 0,
        cu_seqlens=0 if offsets is None else fingerprint(offsets),
        layout=0 if error else layout_fingerprint(layout),
        kv_idx=0 if error or index is None else index.fingerprint(),
    )
    fields = _fields(problem if error is None else None, values)
    lengths = agree(comm, op, fields, 0 if problem is None else problem.seq_q, failed=error is not None)
    if error is not None:
        raise error
    block = _check_totals(op, comm, sum(lengths), offsets, layout, index)
    expected = shard_lengths(sum(lengths), comm.size, sharding, cu_seqlens=offsets, block=block)
    if lengths != expected:
        how = f"sharding={sharding!r}" + (", cu_seqlens=cu_seqlens" if offsets is not None else "")
        how += f", block={block}" if block > 1 else ""
        raise RankArgumentError(
            f"{op}: local sequence lengths {lengths} (ranks 0..{comm.size - 1}) do not match sharding {sharding!r} "
            f"for the total length {sum(lengths)} (expected {expected}); cut the sequence with "
            f"npsparseattn.shard(x, rank, world, {how})"
        )
    xp = array_module(problem.kind)
    selection: KeyBlockSelection | None = None if layout is None else LayoutSelection(layout)
    if index is not None:
        selection = IndexSelection(
            index.kv_idx, index.kv_cnt, index.q_block, index.kv_block, heads=problem.n_heads, xp=xp
        )
    options = None if selection is None else selection.kernel_options
    kernels = Kernels(dense, sparse, problem.dtype, problem.scale, xp, options)
    prints = (values["cu_seqlens"], values["layout"] or values["kv_idx"])
    return Setup(op, comm, problem, kernels, mode, group, sharding, offsets, selection, block, lengths, grads, prints)


def _check_totals(
    op: str, comm: Communicator, total: int, offsets: np.ndarray | None, layout: Any, index: IndexArguments | None
) -> int:
    """Rules that need the total length (the same on every rank); returns the sharding's block granule."""
    if offsets is not None and offsets[-1] != total:
        raise RankArgumentError(
            f"{op}: cu_seqlens must end at the total sequence length {total} (the sum of the local lengths), "
            f"got cu_seqlens[-1] = {offsets[-1]}"
        )
    if layout is not None:
        if layout.seq != (total, total):
            raise RankArgumentError(
                f"{op}: layout is for seq (Lq, Lk) = {layout.seq} but the whole sequence has {total} positions "
                f"(the sum of the local lengths); build the layout over the whole sequence"
            )
        pattern, sizes = "a layout", layout.block
        hint = (
            "pad the documents or express their separation in the layout (layouts.intersect with a block-diagonal "
            "layout)"
        )
    elif index is not None:
        _check_index_totals(op, total, index)
        pattern, sizes = "kv_idx", (index.q_block, index.kv_block)
        hint = "pad the documents to multiples of lcm(q_block, kv_block)"
    else:
        return 1
    block = math.lcm(*sizes)
    if offsets is not None:
        bad = offsets[(offsets % block != 0) & (offsets != total)]
        if bad.size:
            raise RankArgumentError(
                f"{op}: with {pattern} of block {sizes}, documents must start at multiples of {block} "
                f"tokens (cu_seqlens has {int(bad[0])}); {hint}"
            )
    return block


def _check_index_totals(op: str, total: int, index: IndexArguments) -> None:
    """``kv_idx`` lists every query block of the whole sequence and names its key blocks, each once per list."""
    nqb, nkb = -(-total // index.q_block), -(-total // index.kv_block)
    if index.kv_idx.shape[2] != nqb:
        raise RankArgumentError(
            f"{op}: kv_idx has {index.kv_idx.shape[2]} query blocks (axis -2) but the whole sequence of {total} "
            f"positions (the sum of the local lengths) has ceil({total} / q_block={index.q_block}) = {nqb}; build "
            f"kv_idx over the whole sequence"
        )
    rows = index.kv_idx.reshape(-1, index.kv_idx.shape[-1])
    counts = None if index.kv_cnt is None else index.kv_cnt.reshape(-1)
    try:
        canonical_index(rows, counts, nkb, index.shape)
    except ValueError as err:
        raise RankArgumentError(f"{op}: {err} (key blocks of the whole sequence)") from None
