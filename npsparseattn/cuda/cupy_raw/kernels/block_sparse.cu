// Block-sparse attention over a CSR layout, forward and backward (backend "cupy" of
// `block_sparse_attention`): the loops of npsa_attn.cuh walking the runs of consecutive stored blocks
// of one layout row (forward: the row of a query block, CSR; backward: the row of a key block in the
// transposed layout, CSC).  The work is proportional to the stored blocks.
//
// A layout block of bq query rows is covered by ceil(bq / BQ) CTAs (bk keys: ceil(bk / BK) in the
// backward), so blocks that are multiples of 64 use the tensor cores fully and smaller blocks leave
// part of each CTA idle.  Layout arrays are int32: ptr (layout heads * rows + 1), run_start and
// run_stop (runs, in blocks); lheads is 1 (shared by all heads) or Hq.  The backward needs
// npsa_bwd_prep first and npsa_dq_store after, as the dense one (or, deterministic, npsa_bsa_dq).
#include "npsa_attn.cuh"

using namespace npsa;

// grid (nqb * qchunks, Hq, B) with qchunks = ceil(bq / BQ); NTHREADS threads, SparseFwdShape<D>::SMEM bytes.
template <class T, int D, bool MASKED>
__global__ void __launch_bounds__(NTHREADS, 1)
    npsa_bsa_fwd(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
                 u16* __restrict__ out, float* __restrict__ lse, const int* __restrict__ ptr,
                 const int* __restrict__ run_start, const int* __restrict__ run_stop, int lq, int lk, int hq, int hk,
                 int bq, int bk, int nqb, int lheads, int qchunks, int off, int left, int right, float c) {
  using S = SparseFwdShape<D>;
  const Mask mask{off, left, right};
  const QueryRows r = layout_rows<S::BQ, D, MASKED>(bq, qchunks, lq, lk, hq, hk, mask);
  if (r.rows <= 0) return;  // the last chunk of a partial last block
  RunWalk walk{ptr, run_start, run_stop, bk, r.lo, r.hi, S::BK, nqb, lheads, static_cast<int>(blockIdx.x) / qchunks};
  walk.reset(blockIdx.y);
  forward_rows<T, S, MASKED>(q + r.qrow * D, k + r.kbase, v + r.kbase, out + r.qrow * D, lse + r.qrow, r.i0, r.rows,
                             lk, mask, c, walk);
}

// grid (nkb * kchunks, Hk, B) with kchunks = ceil(bk / BK); NTHREADS threads, BwdShape<D>::SMEM bytes.
// ptr/run_start/run_stop: the runs of the transposed layout (rows: key blocks, runs of query blocks).
template <class T, int D, bool MASKED>
__global__ void __launch_bounds__(NTHREADS, 1)
    npsa_bsa_bwd(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
                 const u16* __restrict__ dout, const float* __restrict__ lse2, const float* __restrict__ delta,
                 float* __restrict__ dq_acc, u16* __restrict__ dk, u16* __restrict__ dv, const int* __restrict__ ptr,
                 const int* __restrict__ run_start, const int* __restrict__ run_stop, int lq, int lk, int hq, int hk,
                 int bq, int bk, int nkb, int lheads, int kchunks, int off, int left, int right, float c,
                 float scale) {
  constexpr int BK = BwdShape<D>::BK;
  const Mask mask{off, left, right};
  const int block = blockIdx.x / kchunks, j0 = block * bk + (blockIdx.x % kchunks) * BK, group = hq / hk;
  const KeyRows r = key_rows<MASKED>(j0, min(BK, min((block + 1) * bk, lk) - j0), lq, lk, hq, hk, mask);
  if (r.kvalid <= 0) return;  // the last chunk of a partial last block
  RunWalk walk{ptr, run_start, run_stop, bq, r.lo, r.hi, BwdShape<D>::BQ, nkb, lheads, block};
  float* const dq_rows_acc = dq_acc != nullptr ? dq_acc + r.qbase * lq * D : nullptr;  // null stays null
  backward_keys<T, D, MASKED>(q + r.qbase * lq * D, k + r.krow * D, v + r.krow * D, dout + r.qbase * lq * D,
                              lse2 + r.qbase * lq, delta + r.qbase * lq, dq_rows_acc, dk + r.krow * D,
                              dv + r.krow * D, j0, r.kvalid, lq, mask, c, scale,
                              HeadWalk<RunWalk>(walk, blockIdx.y * group, (blockIdx.y + 1) * group));
}

// grid (nqb * qchunks, Hq, B) with qchunks = ceil(bq / 64); NTHREADS threads, DqShape<D>::SMEM bytes: the
// deterministic dQ over the runs of the layout's rows (as npsa_bsa_fwd walks them).
template <class T, int D, bool MASKED>
__global__ void __launch_bounds__(NTHREADS, 1)
    npsa_bsa_dq(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
                const u16* __restrict__ dout, const float* __restrict__ lse2, const float* __restrict__ delta,
                u16* __restrict__ dq, const int* __restrict__ ptr, const int* __restrict__ run_start,
                const int* __restrict__ run_stop, int lq, int lk, int hq, int hk, int bq, int bk, int nqb, int lheads,
                int qchunks, int off, int left, int right, float c, float scale) {
  const Mask mask{off, left, right};
  const QueryRows r = layout_rows<DqShape<D>::BQ, D, MASKED>(bq, qchunks, lq, lk, hq, hk, mask);
  if (r.rows <= 0) return;  // the last chunk of a partial last block
  RunWalk walk{ptr, run_start, run_stop, bk, r.lo, r.hi, DqShape<D>::BK, nqb, lheads,
               static_cast<int>(blockIdx.x) / qchunks};
  walk.reset(blockIdx.y);
  dq_rows<T, D, MASKED>(q + r.qrow * D, k + r.kbase, v + r.kbase, dout + r.qrow * D, lse2 + r.qrow, delta + r.qrow,
                        dq + r.qrow * D, r.i0, r.rows, lk, mask, c, scale, walk);
}
