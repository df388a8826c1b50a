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
  constexpr int BQ = SparseFwdShape<D>::BQ, BK = SparseFwdShape<D>::BK;
  const int h = blockIdx.y, b = blockIdx.z, block = blockIdx.x / qchunks;
  const int i0 = block * bq + (blockIdx.x % qchunks) * BQ;
  const int rows = min(BQ, min((block + 1) * bq, lq) - i0);
  if (rows <= 0) return;  // the last chunk of a partial last block
  const int hkv = h / (hq / hk);
  const long long qrow = (static_cast<long long>(b) * hq + h) * lq + i0;
  const long long kbase = (static_cast<long long>(b) * hk + hkv) * lk * D;
  int lo = 0, hi = lk;
  if (MASKED) {
    lo = max(0, i0 + off - left);
    hi = min(lk, i0 + rows - 1 + off + right + 1);
  }
  RunWalk walk{ptr, run_start, run_stop, bk, lo, hi, BK, nqb, lheads, block};
  walk.reset(h);
  forward_rows<T, SparseFwdShape<D>, MASKED>(q + qrow * D, k + kbase, v + kbase, out + qrow * D, lse + qrow, i0,
                                             rows, lk, Mask{off, left, right}, c, walk);
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
  constexpr int BK = BwdShape<D>::BK, BQ = BwdShape<D>::BQ;
  const int hkv = blockIdx.y, b = blockIdx.z, block = blockIdx.x / kchunks;
  const int j0 = block * bk + (blockIdx.x % kchunks) * BK;
  const int kvalid = min(BK, min((block + 1) * bk, lk) - j0);
  if (kvalid <= 0) return;
  const int group = hq / hk;
  const long long krow = (static_cast<long long>(b) * hk + hkv) * lk + j0;
  const long long qbase = static_cast<long long>(b) * hq;
  int lo = 0, hi = lq;
  if (MASKED) {
    lo = max(0, j0 - off - right);
    hi = min(lq, j0 + kvalid - 1 - off + left + 1);
  }
  RunWalk walk{ptr, run_start, run_stop, bq, lo, hi, BQ, nkb, lheads, block};
  backward_keys<T, D, MASKED>(q + qbase * lq * D, k + krow * D, v + krow * D, dout + qbase * lq * D,
                              lse2 + qbase * lq, delta + qbase * lq, dq_acc + qbase * lq * D, dk + krow * D,
                              dv + krow * D, j0, kvalid, lq, Mask{off, left, right}, c, scale,
                              HeadWalk<RunWalk>(walk, hkv * group, (hkv + 1) * group));
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
  constexpr int BQ = DqShape<D>::BQ, BK = DqShape<D>::BK;
  const int h = blockIdx.y, b = blockIdx.z, block = blockIdx.x / qchunks;
  const int i0 = block * bq + (blockIdx.x % qchunks) * BQ;
  const int rows = min(BQ, min((block + 1) * bq, lq) - i0);
  if (rows <= 0) return;  // the last chunk of a partial last block
  const int hkv = h / (hq / hk);
  const long long qrow = (static_cast<long long>(b) * hq + h) * lq + i0;
  const long long kbase = (static_cast<long long>(b) * hk + hkv) * lk * D;
  int lo = 0, hi = lk;
  if (MASKED) {
    lo = max(0, i0 + off - left);
    hi = min(lk, i0 + rows - 1 + off + right + 1);
  }
  RunWalk walk{ptr, run_start, run_stop, bk, lo, hi, BK, nqb, lheads, block};
  walk.reset(h);
  dq_rows<T, D, MASKED>(q + qrow * D, k + kbase, v + kbase, dout + qrow * D, lse2 + qrow, delta + qrow, dq + qrow * D,
                        i0, rows, lk, Mask{off, left, right}, c, scale, walk);
}
