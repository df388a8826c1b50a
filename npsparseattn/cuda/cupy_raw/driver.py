"""The ``cupy`` backend's host driver, one for dense and block-sparse attention.

The operation modules (:mod:`~npsparseattn.cuda.cupy_raw.exact`,
:mod:`~npsparseattn.cuda.cupy_raw.block_sparse`) call :func:`forward` and
:func:`backward` with ``layout=None`` (dense: the kernels walk one span of
tiles) or a :class:`~npsparseattn.layouts.BlockLayout` (block-sparse: the
kernels walk the runs of its rows, :mod:`npsparseattn.cuda.layout_runs`).
Everything else is shared: argument checks, output buffers, the launch
geometry (a Python copy of the shapes of ``npsa_attn.cuh``, kept equal to
them by a test), what every launch needs, and the steps of the backward.

What reaches a launch:

* **No empty grid.**  A grid with a dimension of 0 (an empty batch, no
  query rows) is an invalid launch on a GPU; such a launch has nothing to
  write and is skipped (:func:`_launch`).
* **16-byte aligned base pointers.**  ``cp.async`` and the 16-byte vector
  loads and stores fault on a misaligned address.  An input that does not
  start on a 16-byte boundary (a view one element into a buffer, a DLPack
  tensor with an odd storage offset) is copied to one that does; a
  misaligned output buffer is computed in an aligned temporary and copied
  in (:func:`kernel_input`, :func:`output_buffer`).  Rows are ``D`` 16-bit
  elements, a multiple of 16 bytes, so every row is aligned then.
* **The device of the arrays.**  Buffers are allocated and kernels launched
  inside ``with q.device`` (:func:`device_of`), on that device's current
  stream, whatever CuPy's current device is; the layout runs are uploaded
  there too (:mod:`npsparseattn.cuda.layout_runs`).

The backward's steps:

* ``npsa_bwd_prep``: ``delta = rowsum(dO * O)``, ``lse2 = lse * log2 e``
  (``+inf`` for an empty row) and a zeroed float32 dQ accumulator;
* the key-side kernel: one CTA per (64 keys, key head, batch) walks the query
  tiles of its GQA group, accumulates dK and dV in registers and adds
  ``dQ = dS K`` to the accumulator with float32 atomics;
* ``npsa_dq_store``: ``dq = dtype(dq_acc * scale)``.

With ``deterministic=True`` no atomics: ``npsa_bwd_prep`` without the
accumulator, the key-side kernel for dK and dV only, then a dQ pass
(``npsa_attn_dq``/``npsa_bsa_dq``) whose CTAs own query rows and walk the key
tiles they see in a fixed order, accumulating dQ in registers: the same bits
on every run, for about a third more work (S and dP are computed in both
passes).  dK and dV are the same bits either way.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np

from npsparseattn._arrays import array_module
from npsparseattn.cuda.constants import LOG2E
from npsparseattn.cuda.cupy_raw import HALF_DTYPES, loader, sources
from npsparseattn.cuda.index_runs import IndexRuns
from npsparseattn.cuda.layout_runs import device_runs

NTHREADS = 128  # npsa::NTHREADS: 4 warps
BWD_KEYS = 64  # npsa::BwdShape<D>::BK: keys per backward CTA
ALIGNMENT = 16  # bytes: cp.async and the vector loads/stores


def fwd_rows(d: int, *, sparse: bool = False) -> int:
    """Query rows per forward CTA: npsa::DenseFwdShape<D>::BQ (two m-tiles of 16 rows per warp) or
    npsa::SparseFwdShape<D>::BQ (one)."""
    return 64 if sparse else 128


def fwd_shared_bytes(d: int, *, sparse: bool = False) -> int:
    """npsa::FwdShape<D, MT, QREG>::SMEM: double-buffered K and V tiles of 64 rows of D + 8 elements, then,
    for the dense forward above D = 64, the resident Q tile of 128 rows (otherwise Q passes through the K
    buffers on its way to registers)."""
    resident_q = 0 if sparse or d <= 64 else 128 * (d + 8) * 2
    return 4 * 64 * (d + 8) * 2 + resident_q


def bwd_query_tile(d: int) -> int:
    """npsa::BwdShape<D>::BQ: queries per backward step."""
    return 64 if d <= 64 else 32


def bwd_shared_bytes(d: int) -> int:
    """npsa::BwdShape<D>::SMEM: K, V (64 rows), Q and dO double-buffered, lse2/delta, dS^T (64 x BQ + 8)."""
    bq = bwd_query_tile(d)
    return 2 * 64 * (d + 8) * 2 + 4 * bq * (d + 8) * 2 + 2 * 2 * bq * 4 + 64 * (bq + 8) * 2


DQ_ROWS = 64  # npsa::DqShape<D>::BQ: query rows per CTA of the deterministic dQ pass


def dq_shared_bytes(d: int) -> int:
    """npsa::DqShape<D>::SMEM: double-buffered K and V tiles of 64 rows, the Q and dO tiles of 64 rows."""
    return 4 * 64 * (d + 8) * 2 + 2 * 64 * (d + 8) * 2


def blocks(n: int, size: int) -> int:
    """``ceil(n / size)``."""
    return -(-n // size)


def _xp(x: Any) -> Any:
    return array_module("numpy" if isinstance(x, np.ndarray) else "cupy")


def device_of(x: Any) -> Any:
    """A context in which CuPy allocates and launches on the device that holds ``x`` (none for NumPy)."""
    return contextlib.nullcontext() if isinstance(x, np.ndarray) else x.device


def address(x: Any) -> int:
    """The address of ``x``'s first element."""
    return x.ctypes.data if isinstance(x, np.ndarray) else x.data.ptr


def empty(xp: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """An uninitialised C-contiguous array that starts on a 16-byte boundary (CuPy's allocations start on
    256 bytes; NumPy's are cut from a slightly larger buffer)."""
    if xp is not np:
        return xp.empty(shape, dtype)
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def kernel_input(x: Any) -> Any:
    """``x`` itself if it starts on a 16-byte boundary, else an aligned copy."""
    if address(x) % ALIGNMENT == 0:
        return x
    copy = empty(_xp(x), x.shape, x.dtype)
    copy[...] = x
    return copy


def element_type(dtype: Any, element: str | None) -> str:
    """The element type the kernels read from arrays of ``dtype``: the dtype itself (float16, bfloat16), or
    ``element`` for uint16 buffers that hold its bits (bfloat16 where CuPy has no bfloat16 dtype)."""
    name = np.dtype(dtype).name
    if name == "uint16":
        if element not in HALF_DTYPES:
            wanted = "element='bfloat16' or 'float16' (the bits they hold)"
            raise TypeError(f"uint16 buffers need {wanted}, got {element!r}")
        return element
    if name not in HALF_DTYPES:
        raise TypeError(f"the cupy kernels read float16 or bfloat16, got {name}")
    if element is not None and element != name:
        raise TypeError(f"element={element!r} is for uint16 buffers; these arrays are {name}")
    return name


def check_arrays(dtype: Any, lse: Any = None, *, element: str | None = None, **arrays: Any) -> str:
    """The kernels read raw pointers: every array C-contiguous, ``arrays`` all of ``dtype`` (float16 or
    bfloat16, or uint16 holding the bits of ``element``), ``lse`` float32.  ``ValueError``/``TypeError``
    naming the array otherwise (the public functions copy and cast before calling the kernels).  Returns
    the element type (:func:`element_type`)."""
    element = element_type(dtype, element)
    for name, x in {**arrays, **({} if lse is None else {"lse": lse})}.items():
        want = np.float32 if name == "lse" else dtype
        if x.dtype != np.dtype(want):
            raise TypeError(f"{name} has dtype {x.dtype.name}; the cupy kernels need {np.dtype(want).name}")
        if not x.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous for the cupy kernels")
    return element


def window_args(left: int | None, right: int | None, lq: int, lk: int) -> tuple[bool, int, int]:
    """``(masked, left, right)`` for the kernels: a side of ``None`` becomes a bound no pair reaches,
    and every bound is clamped so that ``i + offset +- bound`` stays inside int32."""
    limit = lq + lk + 1
    masked = left is not None or right is not None

    def clamp(x):
        return limit if x is None else max(-limit, min(int(x), limit))

    return masked, clamp(left), clamp(right)


def output_buffer(x: Any, shape: tuple[int, ...], dtype: Any, xp: Any) -> tuple[Any, Any]:
    """``(target, kernel_out)``: an aligned C-contiguous array of ``shape``/``dtype`` for the kernel to write,
    and where the result goes (``x`` itself when the kernel can write it in place, else ``x`` after a copy)."""
    if x is None:
        out = empty(xp, shape, dtype)
        return out, out
    in_place = x.flags.c_contiguous and x.dtype == np.dtype(dtype) and tuple(x.shape) == shape
    if in_place and address(x) % ALIGNMENT == 0:
        return x, x
    return x, empty(xp, shape, dtype)


def finish(target: Any, computed: Any) -> Any:
    """Copy ``computed`` into ``target`` if they differ (see :func:`output_buffer`); return ``target``."""
    if computed is not target:
        target[...] = computed
    return target


KERNELS = {  # step -> (dense kernel, block-sparse kernel), and whether its CTAs own query rows or keys
    "forward": ("npsa_attn_fwd", "npsa_bsa_fwd", True),
    "keys": ("npsa_attn_bwd", "npsa_bsa_bwd", False),
    "dq": ("npsa_attn_dq", "npsa_bsa_dq", True),
}


def walk_args(step: str, layout: Any, q: Any, k: Any, tile: int, window: tuple[int, int, int]) -> tuple:
    """``(kernel, grid, runs, ints)`` of a launch of ``step`` (:data:`KERNELS`) whose CTAs own ``tile`` query rows
    or keys: over a span for dense attention (``layout`` None), over the runs of the layout's rows (the
    transpose's for the key side) chunk by chunk of its blocks otherwise (``layout`` a
    :class:`~npsparseattn.layouts.BlockLayout`, or an :class:`~npsparseattn.cuda.index_runs.IndexRuns`: a
    sparse index whose runs are on the device already).  ``window``: ``(offset, left, right)`` as the
    kernels take them (:func:`window_args`)."""
    dense, sparse, by_queries = KERNELS[step]
    n_batch, hq, lq = q.shape[:3]
    hk, lk = k.shape[1], k.shape[2]
    heads = hq if by_queries else hk
    if layout is None:
        return dense, (blocks(lq if by_queries else lk, tile), heads, n_batch), (), (lq, lk, hq, hk, *window)
    bq, bk = layout.block
    n_blocks, chunks = (
        (layout.n_query_blocks, blocks(bq, tile)) if by_queries else (layout.n_key_blocks, blocks(bk, tile))
    )
    ints = (lq, lk, hq, hk, bq, bk, n_blocks, layout.heads, chunks, *window)
    if isinstance(layout, IndexRuns):  # sparse_attention's index, its runs on the device already
        runs = layout.device_runs(transposed=not by_queries)
    else:
        runs = device_runs(layout, q, transposed=not by_queries)
    return sparse, (n_blocks * chunks, heads, n_batch), runs, ints


def score_args(mods: Any, like: Any) -> list[Any]:
    """The dense kernels' last arguments ``slopes, cap2`` for ``mods`` (a ScoreMods of ALiBi and softcap, or
    None): the (B, Hq) slopes times ``log2 e`` as float32 on ``like``'s device or None (a null pointer), and
    the softcap times ``log2 e`` (0: off)."""
    slopes = None
    cap2 = 0.0
    if mods is not None:
        if mods.slopes is not None:
            slopes = _xp(like).ascontiguousarray((mods.slopes * LOG2E).astype(np.float32))
        if mods.softcap is not None:
            cap2 = mods.softcap * LOG2E
    return [slopes, np.float32(cap2)]


def _launch(kernel: str, dtype: str, d: int | None, masked: bool | None, grid, shared: int, args: list) -> None:
    """Launch an instance of ``kernel`` on ``grid`` CTAs of :data:`NTHREADS`; an empty grid launches nothing."""
    if min(grid) > 0:
        loader.launcher().launch(sources.instance(kernel, dtype, d, masked), grid, (NTHREADS,), shared, args)


def forward(
    q: Any, k: Any, v: Any, layout: Any, mask: dict[str, Any], out: Any, lse: Any, element: str | None
) -> tuple[Any, Any]:
    """Attention forward on canonical 4-D arrays (tensor cores): dense if ``layout`` is None, else over its
    stored blocks; ``mask`` holds ``scale, offset, left, right``.  Arguments and results:
    :func:`npsparseattn.cuda.cupy_raw.exact.forward`; ``mask`` may also hold ``mods`` (dense only: ALiBi, softcap)."""
    element = check_arrays(q.dtype, q=q, k=k, v=v, element=element)
    with device_of(q):
        return _forward(q, k, v, layout, **mask, out=out, lse=lse, element=element)


def _forward(q, k, v, layout, *, scale, offset, left, right, out, lse, element, mods=None) -> tuple[Any, Any]:
    xp = _xp(q)
    q, k, v = (kernel_input(x) for x in (q, k, v))
    n_batch, hq, lq, d = q.shape
    lk = k.shape[2]
    out_t, out_k = output_buffer(out, (n_batch, hq, lq, d), q.dtype, xp)
    lse_t, lse_k = output_buffer(lse, (n_batch, hq, lq), np.float32, xp)
    if lq > 0:
        masked, left_b, right_b = window_args(left, right, lq, lk)
        tile = fwd_rows(d, sparse=layout is not None)
        kernel, grid, runs, ints = walk_args("forward", layout, q, k, tile, (offset, left_b, right_b))
        args = [q, k, v, out_k, lse_k, *runs, *map(np.int32, ints), np.float32(scale * LOG2E)]
        args += score_args(mods, q) if layout is None else []
        _launch(kernel, element, d, masked, grid, fwd_shared_bytes(d, sparse=layout is not None), args)
    return finish(out_t, out_k), finish(lse_t, lse_k)


def backward_prepare(dout: Any, out: Any, lse: Any, dtype: str, d: int, accumulate: bool = True) -> tuple:
    """``(lse2, delta, dq_acc)`` of a backward: ``lse * log2 e`` (+inf for empty rows), ``rowsum(dout * out)``
    and a zeroed float32 dQ accumulator shaped like ``out`` (``None`` unless ``accumulate``)."""
    xp = _xp(dout)
    rows = math.prod(out.shape[:3])
    lse2 = empty(xp, out.shape[:3], np.float32)
    delta = empty(xp, out.shape[:3], np.float32)
    dq_acc = empty(xp, out.shape, np.float32) if accumulate else None
    args = [out, dout, lse, lse2, delta, dq_acc, np.int32(rows)]
    _launch("npsa_bwd_prep", dtype, d, None, (blocks(rows, NTHREADS // 4),), 0, args)
    return lse2, delta, dq_acc


def store_dq(dq_acc: Any, dq: Any, dtype: str, scale: float) -> None:
    """``dq = dtype(dq_acc * scale)`` (both C-contiguous, same shape)."""
    n = dq_acc.size
    _launch("npsa_dq_store", dtype, None, None, (blocks(n // 8, NTHREADS),), 0, [dq_acc, dq, np.int64(n),
            np.float32(scale)])  # fmt: skip


def backward(
    arrays: tuple, layout: Any, mask: dict[str, Any], grads: Any, element: str | None, deterministic: bool
) -> tuple[Any, Any, Any]:
    """Attention backward on canonical 4-D arrays (tensor cores): ``arrays`` are ``(dout, q, k, v, out, lse)``,
    dense if ``layout`` is None, else over its stored blocks; ``mask`` holds ``scale, offset, left, right``.
    Arguments and results: :func:`npsparseattn.cuda.cupy_raw.exact.backward`; ``mask`` may also hold ``mods``
    (dense only: ALiBi, softcap)."""
    dout, q, k, v, out, lse = arrays
    element = check_arrays(q.dtype, lse, q=q, k=k, v=v, dout=dout, out=out, element=element)
    with device_of(q):
        return _backward(*arrays, layout, **mask, grads=grads, element=element, deterministic=deterministic)


def _backward(
    dout, q, k, v, out, lse, layout, *, scale, offset, left, right, grads, element, deterministic, mods=None
) -> tuple:
    xp = _xp(q)
    dout, q, k, v, out, lse = (kernel_input(x) for x in (dout, q, k, v, out, lse))
    lq, d, lk = q.shape[2], q.shape[3], k.shape[2]
    targets = (None, None, None) if grads is None else grads
    bufs = [output_buffer(g, x.shape, x.dtype, xp) for g, x in zip(targets, (q, k, v))]
    dq, dk, dv = (b[1] for b in bufs)
    if lq == 0 or lk == 0:
        for g in (dq, dk, dv):
            g[...] = 0
    else:
        dtype = element
        lse2, delta, dq_acc = backward_prepare(dout, out, lse, dtype, d, accumulate=not deterministic)
        masked, left_b, right_b = window_args(left, right, lq, lk)
        window, scales = (offset, left_b, right_b), (np.float32(scale * LOG2E), np.float32(scale))
        extra = score_args(mods, q) if layout is None else []
        kernel, grid, runs, ints = walk_args("keys", layout, q, k, BWD_KEYS, window)
        args = [q, k, v, dout, lse2, delta, dq_acc, dk, dv, *runs, *map(np.int32, ints), *scales, *extra]
        _launch(kernel, dtype, d, masked, grid, bwd_shared_bytes(d), args)
        if deterministic:  # dQ without atomics: CTAs of 64 query rows walk their key tiles
            kernel, grid, runs, ints = walk_args("dq", layout, q, k, DQ_ROWS, window)
            args = [q, k, v, dout, lse2, delta, dq, *runs, *map(np.int32, ints), *scales, *extra]
            _launch(kernel, dtype, d, masked, grid, dq_shared_bytes(d), args)
        else:
            store_dq(dq_acc, dq, dtype, scale)
    return tuple(finish(t, c) for t, c in bufs)
