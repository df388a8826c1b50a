"""Thread-block tiles of the numba-cuda attention kernels, and the device helpers that work on them.

numba-cuda has no tensor-core API, so the kernels are SIMT with register
tiling.  A block of ``TR x TC`` threads owns a ``rows x cols`` score tile;
thread ``(tr, tc)`` owns rows ``tr + TR*i`` (``i < RM``) and columns
``tc + TC*j`` (``j < CN``) of it, and columns ``tc + TC*n`` (``n < DN``) of
the row-by-head-dimension accumulators.  Operands live in shared memory in
float32 whatever the storage dtype (loads widen float16/bfloat16 once), laid
out so a warp's reads are conflict-free:

* *transposed* operands ``a[k * stride + row]`` (the reduction index ``k``
  outermost), so the threads of a warp read consecutive words;
* rows padded by one word (``cols + 1``) where a tile is written column by
  column from coalesced global loads, and by :data:`PAD` words for the
  probability tiles written from registers.

The products (:func:`ops`) keep their operands in registers (``RM + CN``
shared loads for ``RM * CN`` multiply-adds); row reductions go through
shared memory, not warp shuffles, so the simulator runs the same code.
Every size is a compile-time constant of a kernel instance, chosen per head
dimension by :func:`tiles`; every instance fits the 48 KiB of static shared
memory a block may use (the compile checks read it from the PTX).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache
from types import SimpleNamespace

from npsparseattn.cuda import _env
from npsparseattn.cuda.numba_cuda.runtime import device_function, storage

PAD = 4  # extra words per row of a probability tile: conflict-free writes from registers
HEAD_DIMS = (64, 128)  # head-dimension capacities of the GPU instances
SIM_HEAD_DIMS = (16, 64, 128)  # the simulator's (small dimensions keep its per-thread Python loops short)


@dataclass(frozen=True)
class Tiles:
    """``tr x tc`` threads; each owns ``rm`` rows, ``cn`` score columns and ``dp // tc`` head-dimension columns."""

    tr: int
    tc: int
    rm: int
    cn: int
    dp: int  # capacity for the head dimensions D and Dv

    @property
    def threads(self) -> int:
        return self.tr * self.tc

    @property
    def rows(self) -> int:
        return self.tr * self.rm

    @property
    def cols(self) -> int:
        return self.tc * self.cn

    @property
    def dn(self) -> int:
        return self.dp // self.tc


# Per kernel family and head-dimension capacity.  "forward": rows are queries, cols keys; "dq" likewise;
# "dkdv": rows are keys, cols queries.  Wider heads take smaller tiles to stay within 48 KiB.
_GPU_TILES = {
    ("forward", 64): Tiles(8, 8, 8, 4, 64),  # 64 queries x 32 keys, 64 threads, 8 x 4 scores and 8 x 8 outputs each
    ("forward", 128): Tiles(8, 8, 4, 4, 128),  # 32 x 32
    ("dq", 64): Tiles(8, 8, 4, 4, 64),  # 32 x 32
    ("dq", 128): Tiles(8, 8, 2, 4, 128),  # 16 x 32
    ("dkdv", 64): Tiles(8, 8, 4, 4, 64),  # 32 keys x 32 queries
    ("dkdv", 128): Tiles(8, 8, 2, 2, 128),  # 16 x 16
}


def tiles(kernel: str, head_dim: int, simulated: bool | None = None, user: bool = False) -> Tiles:
    """The tiles of ``kernel`` ("forward", "dq", "dkdv") for head dimensions up to ``head_dim``.

    Under the simulator every kernel takes 4 x 4 threads with 2 x 2 cells
    each: the same code at a size whose per-thread Python runs in seconds.
    ``user``: a kernel with a user's ``score_mod``/``mask_mod`` inlined into
    its score loops takes the register tiles of the widest heads (fewer
    score cells per thread, with the head dimension's own capacity): with the
    larger tiles the loops grow past what the compiler unrolls, and the
    register tiles go to local memory.
    """
    simulated = _env.simulator() if simulated is None else simulated
    dims = SIM_HEAD_DIMS if simulated else HEAD_DIMS
    capacity = next((d for d in dims if d >= head_dim), None)
    if capacity is None:
        raise ValueError(f"head dimension {head_dim} is wider than the widest tiles ({dims[-1]})")
    if simulated:
        return Tiles(4, 4, 2, 2, capacity)
    if user:
        return replace(_GPU_TILES[(kernel, HEAD_DIMS[-1])], dp=capacity)
    return _GPU_TILES[(kernel, capacity)]


@cache
def ops(t: Tiles, bf16: bool = False) -> SimpleNamespace:
    """The device helpers of tiles ``t``: products of shared-memory operands into register tiles, and loads.

    ``bf16``: the loads' sources are bfloat16 arrays viewed as uint16.

    Products, for the thread ``(tr, tc)`` (``acc`` is its register tile,
    ``row_i = tr + TR*i``, ``col_j = tc + TC*j``):

    ``scores(a, sa, b, sb, kdim, tr, tc, acc)``
        ``acc[i, j] = sum_k a[k*sa + row_i] * b[k*sb + col_j]`` (RM x CN, overwritten);
    ``accumulate_t(a, sa, b, sb, kdim, tr, tc, acc)``
        ``acc[i, n] += sum_k a[k*sa + row_i] * b[k*sb + col_n]`` (RM x DN);
    ``accumulate_n(a, sa, b, sb, kdim, tr, tc, acc)``
        ``acc[i, n] += sum_k a[k*sa + row_i] * b[col_n*sb + k]`` (RM x DN).

    Shared-memory indices in the products are unsigned 32-bit: a signed
    index costs numba's negative-index wraparound on every load.

    Loads by all threads of a block (``tid`` is the thread's index) from a
    4-D array ``src[b, h, row, c]`` (rows ``r0 + r``, ``r < nr``; columns
    ``c < nc``), widened to float32 (:func:`~npsparseattn.cuda.numba_cuda.runtime.storage`):

    ``load_by_row(src, b, h, r0, nr, cap, nc, dst, stride, tid)``
        ``dst[c*stride + r]`` for ``r < cap`` (zeros past ``nr``); consecutive
        threads take consecutive rows (conflict-free with an unpadded stride);
    ``load_by_col(src, b, h, r0, nr, nc, dst, stride, tid)``
        ``dst[c*stride + r]``, consecutive threads take consecutive columns
        (coalesced; conflict-free with a stride of ``cols + 1``); no
        division per element: these run for every key tile;
    ``load_rows(src, b, h, r0, nr, nc, dst, stride, tid)``
        ``dst[r*stride + c]``, coalesced;
    ``clear(dst, size, tid)``
        zeros, so that the parts of a tile no load writes (past a partial
        tile, past the head dimension) hold numbers: they are multiplied and
        then masked or dropped, never used.

    The helpers are inlined into the kernels (:func:`~npsparseattn.cuda.numba_cuda.runtime.device_function`),
    so the products' loops unroll over the constant tile sizes and ``acc`` stays in registers.
    """
    from numba import float32, uint32

    tr_n, tc_n, rm, cn, dn = t.tr, t.tc, t.rm, t.cn, t.dn
    threads = t.threads
    widen = storage(bf16)[0]

    @device_function
    def scores(a, sa, b, sb, kdim, tr, tc, acc):
        for i in range(rm):
            for j in range(cn):
                acc[i, j] = float32(0.0)
        ia = uint32(tr)
        ib = uint32(tc)
        for _ in range(kdim):
            for i in range(rm):
                x = a[ia + uint32(tr_n * i)]
                for j in range(cn):
                    acc[i, j] += x * b[ib + uint32(tc_n * j)]
            ia += uint32(sa)
            ib += uint32(sb)

    @device_function
    def accumulate_t(a, sa, b, sb, kdim, tr, tc, acc):
        ia = uint32(tr)
        ib = uint32(tc)
        for _ in range(kdim):
            for i in range(rm):
                x = a[ia + uint32(tr_n * i)]
                for n in range(dn):
                    acc[i, n] += x * b[ib + uint32(tc_n * n)]
            ia += uint32(sa)
            ib += uint32(sb)

    @device_function
    def accumulate_n(a, sa, b, sb, kdim, tr, tc, acc):
        ia = uint32(tr)
        ib = uint32(tc * sb)
        for _ in range(kdim):
            for i in range(rm):
                x = a[ia + uint32(tr_n * i)]
                for n in range(dn):
                    acc[i, n] += x * b[ib + uint32(tc_n * n * sb)]
            ia += uint32(sa)
            ib += uint32(1)

    @device_function
    def clear(dst, size, tid):
        for e in range(tid, size, threads):
            dst[e] = float32(0.0)

    @device_function
    def load_by_row(src, b, h, r0, nr, cap, nc, dst, stride, tid):
        for e in range(tid, cap * nc, threads):
            c = e // cap
            r = e - c * cap
            dst[c * stride + r] = widen(src[b, h, r0 + r, c]) if r < nr else float32(0.0)

    @device_function
    def load_by_col(src, b, h, r0, nr, nc, dst, stride, tid):
        if nc >= threads:  # each thread takes columns tid, tid + threads, ... of every row
            for r in range(nr):
                for c in range(tid, nc, threads):
                    dst[c * stride + r] = widen(src[b, h, r0 + r, c])
        else:  # threads // nc rows at a time, one column each (one division per call, not per element)
            c = tid % nc
            for r in range(tid // nc, nr, threads // nc):
                dst[c * stride + r] = widen(src[b, h, r0 + r, c])

    @device_function
    def load_rows(src, b, h, r0, nr, nc, dst, stride, tid):
        if nc >= threads:
            for r in range(nr):
                for c in range(tid, nc, threads):
                    dst[r * stride + c] = widen(src[b, h, r0 + r, c])
        else:
            c = tid % nc
            for r in range(tid // nc, nr, threads // nc):
                dst[r * stride + c] = widen(src[b, h, r0 + r, c])

    return SimpleNamespace(
        clear=clear,
        scores=scores,
        accumulate_t=accumulate_t,
        accumulate_n=accumulate_n,
        load_by_row=load_by_row,
        load_by_col=load_by_col,
        load_rows=load_rows,
    )
