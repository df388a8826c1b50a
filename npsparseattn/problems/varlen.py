"""The packed variable-length problem: sequences laid end to end, delimited by ``cu_seqlens`` offsets.

``q`` (Hq, total_q, D), ``k`` (Hk, total_k, D), ``v`` (Hk, total_k, Dv) hold
``n`` sequences each, heads first; ``cu_seqlens_q``/``cu_seqlens_k`` are
``(n + 1,)`` offsets starting at 0 (flash-attn's meaning): sequence ``s`` is
rows ``cu_seqlens_q[s]:cu_seqlens_q[s + 1]`` of ``q`` and attends only rows
``cu_seqlens_k[s]:cu_seqlens_k[s + 1]`` of ``k``/``v``.  Inside a sequence the
rules are those of ``docs/conventions.md`` with that sequence's lengths: query
``i`` is aligned with key ``i + (Lk_s - Lq_s)`` (bottom-right).

Index arrays are validated on the host (a CuPy array is copied there once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from npsparseattn._arrays import array_kind, array_module, common_kind
from npsparseattn._checks import check_dtypes, check_flag, check_lse, check_scale, check_window
from npsparseattn._dtypes import FLOAT_DTYPES

INDEX_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
INT32_MAX = 2**31 - 1


def host_indices(x: Any, name: str, kind: str) -> np.ndarray:
    """An integer index array (NumPy, or of the problem's ``kind``) as a host int64 array."""
    array_kind(x, name)
    if x.dtype.name not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer array (int32), got dtype {x.dtype.name}")
    if not isinstance(x, np.ndarray) and kind == "numpy":
        raise TypeError(f"{name} is a CuPy array but q is a NumPy array; pass index arrays on q's device")
    host = np.asarray(x) if isinstance(x, np.ndarray) else x.get()
    if host.dtype.name == "uint64" and host.size and host.max() > np.iinfo(np.int64).max:
        at = np.unravel_index(int(np.argmax(host > np.iinfo(np.int64).max)), host.shape)
        index = ", ".join(map(str, at))
        raise ValueError(f"{name}[{index}] = {host[at]} is too large for an index (at most 2**63 - 1)")
    return host.astype(np.int64)


def check_heads(q: Any, k: Any, v: Any, head_axis: int) -> None:
    """``k``/``v`` share all axes but the last; ``q`` and ``k`` share ``D``; ``Hq % Hk == 0``; ``D, Dv >= 1``."""
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"k and v must have the same shape but for the last axis (Dv): k {tuple(k.shape)} vs v {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same last axis D: q {tuple(q.shape)} vs k {tuple(k.shape)}")
    if q.shape[-1] < 1 or v.shape[-1] < 1:
        raise ValueError(f"head dimensions must be >= 1: q {tuple(q.shape)}, v {tuple(v.shape)}")
    hq, hk = q.shape[head_axis], k.shape[head_axis]
    if hk < 1 or hq % hk != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hk}) for grouped-query attention")


def _offsets(cu: Any, name: str, total: int, kind: str) -> np.ndarray:
    host = host_indices(cu, name, kind)
    if host.ndim != 1 or host.shape[0] < 1:
        raise ValueError(f"{name} must be a 1-D array of n_seqs + 1 offsets, got shape {tuple(cu.shape)}")
    if host[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {host[0]}")
    steps = np.diff(host)
    if (steps < 0).any():
        s = int(np.argmax(steps < 0))
        raise ValueError(f"{name} must be non-decreasing: {name}[{s}] = {host[s]} > {name}[{s + 1}] = {host[s + 1]}")
    if host[-1] != total:
        raise ValueError(f"{name} must end at the packed length {total}, got {name}[-1] = {host[-1]}")
    if total > INT32_MAX:
        raise ValueError(f"the packed length {total} does not fit the int32 offsets")
    return host


@dataclass(frozen=True)
class VarlenProblem:
    """Validated packed sequences: ``q`` (Hq, Tq, D), ``k`` (Hk, Tk, D), ``v`` (Hk, Tk, Dv) and their offsets.

    ``offsets_q``/``offsets_k`` are the validated offsets on the host
    (NumPy int64), :meth:`kernel_offsets` gives them as the kernels read
    them.  ``left``/``right`` are the window with causal folded in.
    """

    q: Any
    k: Any
    v: Any
    offsets_q: np.ndarray
    offsets_k: np.ndarray
    kind: str
    dtype: np.dtype
    scale: float
    causal: bool
    left: int | None
    right: int | None

    @property
    def n_seqs(self) -> int:
        return self.offsets_q.shape[0] - 1

    def kernel_offsets(self) -> tuple[Any, Any]:
        """``(cu_seqlens_q, cu_seqlens_k)`` as int32 arrays of the problem's kind (copied to the GPU for CuPy)."""
        xp = array_module(self.kind)
        return xp.asarray(self.offsets_q.astype(np.int32)), xp.asarray(self.offsets_k.astype(np.int32))

    def visibility(self) -> dict[str, Any]:
        """The keywords of the varlen kernel contract: ``scale``, ``left``, ``right`` (offsets are per sequence)."""
        return dict(scale=self.scale, left=self.left, right=self.right)

    def output_shape(self) -> tuple[int, ...]:
        return (self.q.shape[0], self.q.shape[1], self.v.shape[2])

    def lse_shape(self) -> tuple[int, ...]:
        return (self.q.shape[0], self.q.shape[1])


def varlen_problem(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    *,
    causal: Any = False,
    window: Any = None,
    scale: Any = None,
) -> VarlenProblem:
    """Validate packed ``q``, ``k``, ``v`` and their offsets into a :class:`VarlenProblem`."""
    arrays = {"q": q, "k": k, "v": v}
    kind = common_kind(**arrays)
    for name, x in arrays.items():
        if x.ndim != 3:
            raise ValueError(f"{name} must have 3 axes (H, total, D) of packed sequences, got shape {tuple(x.shape)}")
    dtype = check_dtypes(arrays, FLOAT_DTYPES)
    check_heads(q, k, v, 0)
    host_q = _offsets(cu_seqlens_q, "cu_seqlens_q", q.shape[1], kind)
    host_k = _offsets(cu_seqlens_k, "cu_seqlens_k", k.shape[1], kind)
    if host_q.shape != host_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences: "
            f"{host_q.shape[0] - 1} vs {host_k.shape[0] - 1}"
        )
    causal = check_flag(causal, "causal")
    left, right = check_window(window, causal)
    return VarlenProblem(
        q=q,
        k=k,
        v=v,
        offsets_q=host_q,
        offsets_k=host_k,
        kind=kind,
        dtype=dtype,
        scale=check_scale(scale, q.shape[-1], dtype),
        causal=causal,
        left=left,
        right=right,
    )


@dataclass(frozen=True)
class VarlenGradients:
    """Validated backward inputs: ``dout``/``out`` (Hq, Tq, Dv), ``lse`` (Hq, Tq)."""

    dout: Any
    out: Any
    lse: Any


def varlen_gradient_inputs(problem: VarlenProblem, dout: Any, out: Any, lse: Any) -> VarlenGradients:
    """Check ``dout``, ``out``, ``lse`` against the forward problem they belong to."""
    common_kind(q=problem.q, dout=dout, out=out, lse=lse)
    for name, x in (("dout", dout), ("out", out)):
        if tuple(x.shape) != problem.output_shape():
            raise ValueError(
                f"{name} must have shape {problem.output_shape()} (like the forward output), got {tuple(x.shape)}"
            )
        if x.dtype != problem.dtype:
            raise TypeError(f"{name} has dtype {x.dtype.name}; expected {problem.dtype.name} like q")
    check_lse(lse, problem.lse_shape(), problem.dtype)
    return VarlenGradients(dout=dout, out=out, lse=lse)
