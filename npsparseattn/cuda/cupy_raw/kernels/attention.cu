// Dense tiled attention, forward and backward (backend "cupy" of `attention`), and the two small
// kernels every backward uses (also block_sparse.cu's).
//
// Arrays are C-contiguous: q (B, Hq, Lq, D), k and v (B, Hk, Lk, D), out (B, Hq, Lq, D),
// lse (B, Hq, Lq) float.  T is npsa::f16 or npsa::bf16 (storage u16).  `c` is scale * log2(e).
// MASKED = false ignores left/right (no causal mask, no window): only partial tiles are masked.
// slopes (B, Hq) float, the ALiBi slopes times log2(e), or null; cap2 = softcap * log2(e), 0: off
// (npsa_attn.cuh's ScoreMods).
#include "npsa_attn.cuh"

using namespace npsa;

// grid (ceil(Lq / BQ), Hq, B), NTHREADS threads, DenseFwdShape<D>::SMEM bytes of dynamic shared memory.
template <class T, int D, bool MASKED>
__global__ void __launch_bounds__(NTHREADS, 1)
    npsa_attn_fwd(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
                  u16* __restrict__ out, float* __restrict__ lse, int lq, int lk, int hq, int hk, int off, int left,
                  int right, float c, const float* __restrict__ slopes, float cap2) {
  using S = DenseFwdShape<D>;
  const Mask mask{off, left, right};
  const QueryRows r = dense_rows<S::BQ, D, MASKED>(lq, lk, hq, hk, mask);
  const ScoreMods mods{slopes != nullptr ? slopes + static_cast<long long>(blockIdx.z) * hq + blockIdx.y : nullptr, cap2};
  forward_rows<T, S, MASKED>(q + r.qrow * D, k + r.kbase, v + r.kbase, out + r.qrow * D, lse + r.qrow, r.i0, r.rows,
                             lk, mask, c, SpanWalk(r.lo, r.hi, S::BK), mods);
}

// grid (ceil(Lk / BK), Hk, B), NTHREADS threads, BwdShape<D>::SMEM bytes.  Run npsa_bwd_prep first.
// A null dq_acc: dK and dV only (the deterministic backward computes dQ with npsa_attn_dq).
template <class T, int D, bool MASKED>
__global__ void __launch_bounds__(NTHREADS, 1)
    npsa_attn_bwd(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
                  const u16* __restrict__ dout, const float* __restrict__ lse2, const float* __restrict__ delta,
                  float* __restrict__ dq_acc, u16* __restrict__ dk, u16* __restrict__ dv, int lq, int lk, int hq,
                  int hk, int off, int left, int right, float c, float scale, const float* __restrict__ slopes,
                  float cap2) {
  constexpr int BK = BwdShape<D>::BK;
  const Mask mask{off, left, right};
  const int j0 = blockIdx.x * BK, group = hq / hk;
  const KeyRows r = key_rows<MASKED>(j0, min(BK, lk - j0), lq, lk, hq, hk, mask);
  float* const dq_rows_acc = dq_acc != nullptr ? dq_acc + r.qbase * lq * D : nullptr;  // null stays null
  backward_keys<T, D, MASKED>(q + r.qbase * lq * D, k + r.krow * D, v + r.krow * D, dout + r.qbase * lq * D,
                              lse2 + r.qbase * lq, delta + r.qbase * lq, dq_rows_acc, dk + r.krow * D,
                              dv + r.krow * D, j0, r.kvalid, lq, mask, c, scale,
                              HeadWalk<SpanWalk>(SpanWalk(r.lo, r.hi, BwdShape<D>::BQ), blockIdx.y * group,
                                                 (blockIdx.y + 1) * group),
                              ScoreMods{slopes != nullptr ? slopes + r.qbase : nullptr, cap2});
}

// grid (ceil(Lq / 64), Hq, B), NTHREADS threads, DqShape<D>::SMEM bytes: dq = T(scale * dS K) without
// atomics (the deterministic backward: npsa_bwd_prep, then npsa_attn_bwd with a null dq_acc, then this).
template <class T, int D, bool MASKED>
__global__ void __launch_bounds__(NTHREADS, 1)
    npsa_attn_dq(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
                 const u16* __restrict__ dout, const float* __restrict__ lse2, const float* __restrict__ delta,
                 u16* __restrict__ dq, int lq, int lk, int hq, int hk, int off, int left, int right, float c,
                 float scale, const float* __restrict__ slopes, float cap2) {
  const Mask mask{off, left, right};
  const QueryRows r = dense_rows<DqShape<D>::BQ, D, MASKED>(lq, lk, hq, hk, mask);
  const ScoreMods mods{slopes != nullptr ? slopes + static_cast<long long>(blockIdx.z) * hq + blockIdx.y : nullptr, cap2};
  dq_rows<T, D, MASKED>(q + r.qrow * D, k + r.kbase, v + r.kbase, dout + r.qrow * D, lse2 + r.qrow, delta + r.qrow,
                        dq + r.qrow * D, r.i0, r.rows, lk, mask, c, scale, SpanWalk(r.lo, r.hi, DqShape<D>::BK), mods);
}

// Per query row (`rows` = B * Hq * Lq of them): delta = sum(dout * out), lse2 = lse * log2(e)
// (+inf for an empty row, so that its P is 0), and the row of dq_acc set to zero (if there is one).
// grid ceil(rows / 32), NTHREADS threads (4 per row), no shared memory.
template <class T, int D>
__global__ void __launch_bounds__(NTHREADS, 1)
    npsa_bwd_prep(const u16* __restrict__ out, const u16* __restrict__ dout, const float* __restrict__ lse,
                  float* __restrict__ lse2, float* __restrict__ delta, float* __restrict__ dq_acc, int rows) {
  constexpr int PER = D / 32;  // 16-byte chunks per thread
  const int tid = threadIdx.x, part = tid % 4;
  const long long row = static_cast<long long>(blockIdx.x) * (NTHREADS / 4) + tid / 4;
  const bool ok = row < rows;
  float sum = 0.f;
  if (ok) {
    for (int i = 0; i < PER; ++i) {
      const long long at = row * D + (part * PER + i) * 8;
      const u32x4 a = ldg(reinterpret_cast<const u32x4*>(out + at));
      const u32x4 b = ldg(reinterpret_cast<const u32x4*>(dout + at));
      const u32 aw[4] = {a.x, a.y, a.z, a.w}, bw[4] = {b.x, b.y, b.z, b.w};
      for (int w = 0; w < 4; ++w) {
        sum += to_float<T>(static_cast<u16>(aw[w] & 0xffffu)) * to_float<T>(static_cast<u16>(bw[w] & 0xffffu));
        sum += to_float<T>(static_cast<u16>(aw[w] >> 16)) * to_float<T>(static_cast<u16>(bw[w] >> 16));
      }
      if (dq_acc != nullptr) {
        const u32x4 zero = {0u, 0u, 0u, 0u};
        stg(reinterpret_cast<u32x4*>(dq_acc + at), zero);
        stg(reinterpret_cast<u32x4*>(dq_acc + at + 4), zero);
      }
    }
  }
  sum += shfl_xor(sum, 1);
  sum += shfl_xor(sum, 2);
  if (ok && part == 0) {
    const float x = ldg(lse + row);
    stg(delta + row, sum);
    stg(lse2 + row, x == -inf() ? inf() : x * LOG2E);
  }
}

// dq = T(dq_acc * scale), 8 elements per thread; `n` elements in all (a multiple of 8).
// grid ceil(n / 8 / NTHREADS), NTHREADS threads.
template <class T>
__global__ void __launch_bounds__(NTHREADS, 1)
    npsa_dq_store(const float* __restrict__ dq_acc, u16* __restrict__ dq, long long n, float scale) {
  const long long at = (static_cast<long long>(blockIdx.x) * NTHREADS + threadIdx.x) * 8;
  if (at >= n) return;
  const u32x4 a = ldg(reinterpret_cast<const u32x4*>(dq_acc + at));
  const u32x4 b = ldg(reinterpret_cast<const u32x4*>(dq_acc + at + 4));
  const u32x4 r = {pack2<T>(__uint_as_float(a.x) * scale, __uint_as_float(a.y) * scale),
                   pack2<T>(__uint_as_float(a.z) * scale, __uint_as_float(a.w) * scale),
                   pack2<T>(__uint_as_float(b.x) * scale, __uint_as_float(b.y) * scale),
                   pack2<T>(__uint_as_float(b.z) * scale, __uint_as_float(b.w) * scale)};
  stg(reinterpret_cast<u32x4*>(dq + at), r);
}
