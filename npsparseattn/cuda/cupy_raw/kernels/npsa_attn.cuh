// The FlashAttention-2 loops shared by the dense (attention.cu) and block-sparse (block_sparse.cu)
// kernels.  They differ only in which tiles they visit: a *walk* yields the tiles one by one (a
// contiguous span for dense attention, the runs of a CSR/CSC layout row for block-sparse), and the
// loops below prefetch the next tile with cp.async while computing the current one.
//
// Visibility: query i sees key j iff lo <= j < hi (lo, hi: the span of the current tile, along the
// walked axis) and, when MASKED, i + off - left <= j <= i + off + right.  Scores are kept in base-2
// units (s * scale * log2 e), so the softmax needs ex2 only; lse is returned in natural log.
//
// Block: NWARPS warps.  Forward: a CTA owns BQ = 16 * MT * NWARPS query rows, warp w MT m-tiles of
// 16 rows, and walks key tiles of BK keys.  Backward: a CTA owns BK = 16 * NWARPS keys, warp w keys
// 16w..16w+15, and walks query tiles of BQ queries (over every query head of its GQA group),
// accumulating dK, dV in registers and adding dQ = dS K to a float buffer with atomics; or, for the
// deterministic backward, leaves dQ to dq_rows, whose CTAs own query rows and walk key tiles.
#pragma once
#include "npsa_tile.cuh"

namespace npsa {

constexpr int NWARPS = 4;
constexpr int NTHREADS = NWARPS * WARP;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

struct Mask {
  int off, left, right;
};

// ALiBi and softcap, runtime arguments of the dense kernels (`attention`): the base-2 score x of a
// visible pair (i, j) becomes cap2 tanh(x / cap2) (cap2 = softcap * log2 e; 0: off), then
// x - slope2 |i + off - j| (slope2: the query head's ALiBi slope * log2 e).  `slopes` points at the
// slope of head 0 of the heads the loop counts (the CTA's own head in the forward and dQ loops, head 0
// of the batch in the key-side loop) or is null (no ALiBi).  The block-sparse kernels take
// NoScoreMods, for which the code compiles away.
struct ScoreMods {
  const float* slopes;
  float cap2;
  __device__ __forceinline__ bool on() const { return slopes != nullptr || cap2 > 0.f; }
  __device__ __forceinline__ float slope(int head) const { return slopes != nullptr ? ldg(slopes + head) : 0.f; }
};
struct NoScoreMods {
  float cap2 = 0.f;
  __device__ __forceinline__ static constexpr bool on() { return false; }
  __device__ __forceinline__ static constexpr float slope(int) { return 0.f; }
};

// The modified score of a base-2 score x at |i + off - j| = dist, and dx = d x' / d x (1 - tanh^2 under a
// softcap, else 1).  tanh through one exp2: e = 2^(-2 log2(e) |y|), tanh y = sign(y) (1 - e) / (1 + e).
__device__ __forceinline__ float modify_score(float x, float cap2, float slope2, int dist, float& dx) {
  dx = 1.f;
  if (cap2 > 0.f) {
    const float e = exp2_approx(-2.f * LOG2E * fabsf(x) / cap2);
    const float t = copysignf((1.f - e) / (1.f + e), x);
    x = cap2 * t;
    dx = 1.f - t * t;
  }
  return x - slope2 * static_cast<float>(dist);
}

// One tile of a walk: rows/columns [start, start + B) of the walked axis, of which [lo, hi) are
// visible; `head` is the query head (backward walks over the heads of a GQA group).
struct Cursor {
  int start, lo, hi, head;
};

// A contiguous span [lo, hi), tiles aligned to multiples of `step` (dense attention).
struct SpanWalk {
  int first, lo, hi, step, start;
  __device__ __forceinline__ SpanWalk(int lo_, int hi_, int step_)
      : first(lo_ < hi_ ? lo_ - lo_ % step_ : hi_), lo(lo_), hi(hi_), step(step_), start(first) {}
  __device__ __forceinline__ void reset(int) { start = first; }
  __device__ __forceinline__ bool next(Cursor& c) {
    if (start >= hi) return false;
    c.start = start, c.lo = lo, c.hi = hi;
    start += step;
    return true;
  }
};

// The runs of one CSR row: run p covers blocks [run_start[p], run_stop[p]) of `unit` tokens,
// clipped to [clip_lo, clip_hi); `row_of(h)` picks the layout row for query head h.
struct RunWalk {
  const int* ptr;
  const int* run_start;
  const int* run_stop;
  int unit, clip_lo, clip_hi, step, row_stride, heads;
  int row, p, pend, start, lo, hi;
  __device__ __forceinline__ void reset(int h) {
    const int r = (heads > 1 ? h : 0) * row_stride + row;
    p = ldg(ptr + r), pend = ldg(ptr + r + 1);
    start = hi = 0;
  }
  __device__ __forceinline__ bool next(Cursor& c) {
    while (start >= hi) {
      if (p >= pend) return false;
      lo = max(ldg(run_start + p) * unit, clip_lo);
      hi = min(ldg(run_stop + p) * unit, clip_hi);
      start = lo;
      ++p;
    }
    c.start = start, c.lo = lo, c.hi = hi;
    start += step;
    return true;
  }
};

// Every tile of `walk` for each query head in [h, h_end).
template <class W>
struct HeadWalk {
  W walk;
  int h, h_end;
  __device__ __forceinline__ HeadWalk(W w, int h0, int h1) : walk(w), h(h0), h_end(h1) { walk.reset(h); }
  __device__ __forceinline__ bool next(Cursor& c) {
    for (;;) {
      if (walk.next(c)) {
        c.head = h;
        return true;
      }
      if (++h >= h_end) return false;
      walk.reset(h);
    }
  }
};

// The query rows a CTA of a forward or dQ kernel owns and the keys they see: rows [i0, i0 + rows) of
// query head blockIdx.y of batch blockIdx.z, at row `qrow` of q (rows of D elements), the first key of
// their key head at element `kbase` of k, and the span [lo, hi) of keys any of them sees (every key
// unless MASKED).
struct QueryRows {
  int i0, rows, lo, hi;
  long long qrow, kbase;
};

template <int D, bool MASKED>
__device__ __forceinline__ QueryRows query_rows(int i0, int rows, int lq, int lk, int hq, int hk, Mask mask) {
  const int h = blockIdx.y, b = blockIdx.z;
  QueryRows r{i0, rows, 0, lk, (static_cast<long long>(b) * hq + h) * lq + i0,
              (static_cast<long long>(b) * hk + h / (hq / hk)) * lk * D};
  if (MASKED) {
    r.lo = max(0, i0 + mask.off - mask.left);
    r.hi = min(lk, i0 + rows - 1 + mask.off + mask.right + 1);
  }
  return r;
}

// Dense kernels: CTA x owns query tile x of BQ rows, or with MASKED (causal) tile gridDim.x - 1 - x, so
// the last tiles, which see the most keys, start first and the tail is shorter.
template <int BQ, int D, bool MASKED>
__device__ __forceinline__ QueryRows dense_rows(int lq, int lk, int hq, int hk, Mask mask) {
  const int i0 = (MASKED ? gridDim.x - 1 - blockIdx.x : blockIdx.x) * BQ;
  return query_rows<D, MASKED>(i0, min(BQ, lq - i0), lq, lk, hq, hk, mask);
}

// Block-sparse kernels: CTA x owns chunk x % chunks (BQ rows) of layout block x / chunks (bq rows);
// `rows` <= 0 for the chunks past a partial last block.
template <int BQ, int D, bool MASKED>
__device__ __forceinline__ QueryRows layout_rows(int bq, int chunks, int lq, int lk, int hq, int hk, Mask mask) {
  const int block = blockIdx.x / chunks, i0 = block * bq + (blockIdx.x % chunks) * BQ;
  return query_rows<D, MASKED>(i0, min(BQ, min((block + 1) * bq, lq) - i0), lq, lk, hq, hk, mask);
}

// ------------------------------------------------------------------------------------------ forward

// MT m-tiles of 16 query rows per warp: each K/V fragment read from shared memory then feeds MT
// products, so MT = 2 halves the shared-memory traffic per FLOP (at the price of registers).
// QREG: the warp's Q fragments stay in registers for the whole walk (D/4 * MT registers); otherwise
// the Q tile stays in shared memory and each k-step reloads its MT fragments with ldmatrix (FA2's
// choice at D = 128), which leaves the registers to the accumulators of two m-tiles.
template <int D, int MT, bool QREG>
struct FwdShape {
  static constexpr int HEAD_DIM = D, M_TILES = MT, BQ = 16 * MT * NWARPS, BK = 64;
  // The online softmax takes the keys of a tile in chunks of KC, the same at every shape so that the
  // dense and block-sparse kernels round alike.  PIPE (Q in registers): the tile's K and V are awaited
  // together and its chunks follow each other with no barrier between, so the scheduler can issue
  // the next chunk's S = Q K^T while this chunk's softmax runs.  Otherwise (Q reloaded from shared
  // memory, two m-tiles of accumulators in the registers) one chunk's scores are live at a time.
  static constexpr int KC = 32;
  static constexpr bool PIPE = QREG;
  static constexpr bool Q_IN_REGISTERS = QREG;
  static constexpr int KV_BYTES = Tile<D>::template bytes<BK>();
  static constexpr int Q_BYTES = QREG ? 0 : Tile<D>::template bytes<BQ>();  // the resident Q tile
  // K and V double-buffered, then the resident Q tile; the output tile of the epilogue (and, with
  // QREG, the Q tile before the first K/V load) use the K buffers
  static constexpr int SMEM = 4 * KV_BYTES + Q_BYTES;
  static_assert(BQ <= 2 * BK, "the Q and output tiles pass through the K buffers");
};

// The dense forward takes two m-tiles per warp (128 query rows per CTA) at every D, with Q in
// registers where they allow it (D <= 64) and in shared memory above; the block-sparse forward takes
// one, so that 64-row layout blocks fill a CTA.
template <int D>
using DenseFwdShape = FwdShape<D, 2, (D <= 64)>;
template <int D>
using SparseFwdShape = FwdShape<D, 1, true>;

// Softmax attention of `rows` query rows (q, out, lse point at the first) over the key tiles of
// `walk` (k, v point at key 0 of the key head); `lk` keys exist.  S is a FwdShape; warp w owns rows
// 16 MT w .. 16 MT (w + 1) - 1 of the CTA.  `mods`: ScoreMods (slope of head 0: these rows') or none.
template <class T, class S, bool MASKED, class W, class M = NoScoreMods>
__device__ __forceinline__ void forward_rows(const u16* q, const u16* k, const u16* v, u16* out, float* lse,
                                             int i0, int rows, int lk, Mask mask, float c, W walk,
                                             M mods = M()) {
  constexpr int D = S::HEAD_DIM, MT = S::M_TILES, BQ = S::BQ, BK = S::BK, KC = S::KC;
  constexpr bool PIPE = S::PIPE;
  constexpr bool QREG = S::Q_IN_REGISTERS;
  NPSA_DECLARE_SMEM(smem);
  const int tid = threadIdx.x, warp = tid / WARP, lane = tid % WARP, g = lane / 4, t = lane % 4;
  const u32 sk = smem_u32(smem), sv = sk + 2 * S::KV_BYTES, sq = QREG ? sk : sv + 2 * S::KV_BYTES;
  const int i_last = i0 + rows - 1, row0 = warp * 16 * MT;
  const bool modded = mods.on();
  const float slope2 = mods.slope(0);

  auto load_kv = [&](const Cursor& cur, int buf) {
    const int valid = min(BK, lk - cur.start);
    load_tile<BK, D, NTHREADS>(sk + buf * S::KV_BYTES, k + static_cast<long long>(cur.start) * D, D, valid, tid);
    cp_async_commit();
    load_tile<BK, D, NTHREADS>(sv + buf * S::KV_BYTES, v + static_cast<long long>(cur.start) * D, D, valid, tid);
    cp_async_commit();
  };

  // Q -> shared memory; with QREG -> registers (this warp's rows as A fragments), then its shared
  // memory goes to K and V
  load_tile<BQ, D, NTHREADS>(sq, q, D, rows, tid);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  u32 qf[MT][QREG ? D / 16 : 1][4];
  if constexpr (QREG) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) a_rows<D>(qf[mt][kk], sq, row0 + mt * 16, kk * 16, lane);
    __syncthreads();
  }

  Cursor cur, nxt;
  bool have = walk.next(cur);
  if (have) load_kv(cur, 0);

  float m[MT][2], l[MT][2];
  float o[MT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    m[mt][0] = m[mt][1] = -inf();
    l[mt][0] = l[mt][1] = 0.f;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) o[mt][nd][0] = o[mt][nd][1] = o[mt][nd][2] = o[mt][nd][3] = 0.f;
  }

  for (int buf = 0; have; buf ^= 1) {
    const bool have_next = walk.next(nxt);
    if (have_next) {
      load_kv(nxt, buf ^ 1);
    } else {
      cp_async_commit();
      cp_async_commit();
    }
    cp_async_wait<3>();  // this tile's K has landed (its V and the next tile may be in flight)
    __syncthreads();

    // The tile's keys in chunks of KC (S::KC): S = Q K^T of the chunk for this warp's rows, the online
    // softmax, P V.  A chunk narrower than the tile keeps fewer scores live (registers at D = 128).
    const u32 kt = sk + buf * S::KV_BYTES, vt = sv + buf * S::KV_BYTES;
    const bool interior = cur.start >= cur.lo && cur.start + BK <= cur.hi &&
                          (!MASKED || (cur.start >= i_last + mask.off - mask.left &&
                                       cur.start + BK - 1 <= i0 + mask.off + mask.right));
    auto chunk = [&](const int kc) {
      float s[MT][KC / 8][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nb = 0; nb < KC / 8; ++nb) s[mt][nb][0] = s[mt][nb][1] = s[mt][nb][2] = s[mt][nb][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        u32 qa[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if constexpr (QREG) {
#pragma unroll
            for (int i = 0; i < 4; ++i) qa[mt][i] = qf[mt][kk][i];
          } else {
            a_rows<D>(qa[mt], sq, row0 + mt * 16, kk * 16, lane);
          }
        }
#pragma unroll
        for (int n2 = 0; n2 < KC / 16; ++n2) {
          u32 b[2][2];
          b_rows<D>(b, kt, kc + n2 * 16, kk * 16, lane);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_16816<T>(s[mt][2 * n2], qa[mt], b[0]);
            mma_16816<T>(s[mt][2 * n2 + 1], qa[mt], b[1]);
          }
        }
      }

      // scale to base 2, modify (ALiBi, softcap), mask what is not visible: a key column in [lo, hi)
      // and, with MASKED, a diagonal col - row in [off - left, off + right] (one live value per lane:
      // its first diagonal)
      const int col0 = cur.start + kc + 2 * t, diag0 = col0 - (i0 + row0 + g);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nb = 0; nb < KC / 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float x = s[mt][nb][e] * c;
            if (modded) {
              float dx;
              const int diag = diag0 + nb * 8 + (e % 2) - mt * 16 - 8 * (e / 2);
              x = modify_score(x, mods.cap2, slope2, abs(mask.off - diag), dx);
            }
            if (!interior) {
              const int col = col0 + nb * 8 + (e % 2), diag = diag0 + nb * 8 + (e % 2) - mt * 16 - 8 * (e / 2);
              bool vis = col >= cur.lo && col < cur.hi;
              if (MASKED) vis = vis && diag >= mask.off - mask.left && diag <= mask.off + mask.right;
              if (!vis) x = -inf();
            }
            s[mt][nb][e] = x;
          }

      // online softmax: rows g (r = 0) and g + 8 (r = 1) of each m-tile; a row is spread over the 4
      // lanes of a quad
      u32 pf[MT][KC / 16][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float mx = -inf();
#pragma unroll
          for (int nb = 0; nb < KC / 8; ++nb) mx = fmaxf(mx, fmaxf(s[mt][nb][2 * r], s[mt][nb][2 * r + 1]));
          mx = fmaxf(mx, shfl_xor(mx, 1));
          mx = fmaxf(mx, shfl_xor(mx, 2));
          const float m_new = fmaxf(m[mt][r], mx);
          const float base = m_new == -inf() ? 0.f : m_new;  // a row that has seen no key yet stays empty
          const float alpha = exp2_approx(m[mt][r] - base);
          m[mt][r] = m_new;
          float sum = 0.f;
#pragma unroll
          for (int nb = 0; nb < KC / 8; ++nb) {
            s[mt][nb][2 * r] = exp2_approx(s[mt][nb][2 * r] - base);
            s[mt][nb][2 * r + 1] = exp2_approx(s[mt][nb][2 * r + 1] - base);
            sum += s[mt][nb][2 * r] + s[mt][nb][2 * r + 1];
          }
          l[mt][r] = l[mt][r] * alpha + sum;  // partial: this lane's columns; the quad is summed at the end
#pragma unroll
          for (int nd = 0; nd < D / 8; ++nd) o[mt][nd][2 * r] *= alpha, o[mt][nd][2 * r + 1] *= alpha;
        }
        c_to_a<T, KC>(pf[mt], s[mt]);
      }

      if (!PIPE && kc == 0) {
        cp_async_wait<2>();  // this tile's V
        __syncthreads();
      }
#pragma unroll
      for (int kk = 0; kk < KC / 16; ++kk) {
#pragma unroll
        for (int n2 = 0; n2 < D / 16; ++n2) {
          u32 b[2][2];
          b_cols<D>(b, vt, kc + kk * 16, n2 * 16, lane);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_16816<T>(o[mt][2 * n2], pf[mt][kk], b[0]);
            mma_16816<T>(o[mt][2 * n2 + 1], pf[mt][kk], b[1]);
          }
        }
      }
    };
    if constexpr (PIPE) {
      // the tile's V too before its first chunk: no barrier between the chunks, so the scheduler may
      // issue the next chunk's S = Q K^T while this chunk's softmax runs
      cp_async_wait<2>();
      __syncthreads();
#pragma unroll
      for (int kc = 0; kc < BK; kc += KC) chunk(kc);
    } else {
#pragma unroll 1  // one chunk's scores live at a time (unrolled, the scheduler would overlap the next chunk's)
      for (int kc = 0; kc < BK; kc += KC) chunk(kc);
    }
    __syncthreads();  // this buffer is free for the tile after next
    cur = nxt;
    have = have_next;
  }

  // epilogue: normalise, stage the output tile in shared memory (the K buffers), store 16-byte rows.
  // No barrier first: the loop's last barrier (or, with no tile, the one after the Q load or the Q
  // fragments) came after every read of the buffers, and only empty cp.async groups are still open.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = l[mt][r];
      sum += shfl_xor(sum, 1);
      sum += shfl_xor(sum, 2);
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      const int row = row0 + mt * 16 + g + 8 * r;
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd)
        sts(smem + Tile<D>::at(row, nd * 8 + 2 * t), pack2<T>(o[mt][nd][2 * r] * inv, o[mt][nd][2 * r + 1] * inv));
      if (t == 0 && row < rows) stg(lse + row, sum > 0.f ? (m[mt][r] + log2f(sum)) * LN2 : -inf());
    }
  __syncthreads();
  constexpr int CHUNKS = D / 8;
  for (int ch = tid; ch < BQ * CHUNKS; ch += NTHREADS) {
    const int r = ch / CHUNKS, col = (ch % CHUNKS) * 8;
    if (r < rows)
      stg(reinterpret_cast<u32x4*>(out + static_cast<long long>(r) * D + col), lds<u32x4>(smem + Tile<D>::at(r, col)));
  }
}

// ----------------------------------------------------------------------------------------- backward

// The keys a CTA of a key-side backward kernel owns and the queries that see them: keys
// [j0, j0 + kvalid) of key head blockIdx.y of batch blockIdx.z, at row `krow` of k, the first query
// head of the batch at row `qbase` of the heads of q, and the span [lo, hi) of queries any of the keys
// is seen by (every query unless MASKED).
struct KeyRows {
  int j0, kvalid, lo, hi;
  long long krow, qbase;
};

template <bool MASKED>
__device__ __forceinline__ KeyRows key_rows(int j0, int kvalid, int lq, int lk, int hq, int hk, Mask mask) {
  const int hkv = blockIdx.y, b = blockIdx.z;
  KeyRows r{j0, kvalid, 0, lq, (static_cast<long long>(b) * hk + hkv) * lk + j0, static_cast<long long>(b) * hq};
  if (MASKED) {
    r.lo = max(0, j0 - mask.off - mask.right);
    r.hi = min(lq, j0 + kvalid - 1 - mask.off + mask.left + 1);
  }
  return r;
}

template <int D>
struct BwdShape {
  static constexpr int BK = 16 * NWARPS;      // keys per CTA
  static constexpr int BQ = D <= 64 ? 64 : 32;  // queries per step (registers: dK and dV live in them)
  static constexpr int KV_BYTES = Tile<D>::template bytes<BK>();
  static constexpr int Q_BYTES = Tile<D>::template bytes<BQ>();
  static constexpr int DS_BYTES = Tile<BQ>::template bytes<BK>();  // dS^T, keys x queries
  static constexpr int ROW_BYTES = 2 * BQ * 4;                      // lse2 and delta of one tile
  static constexpr int SMEM = 2 * KV_BYTES + 4 * Q_BYTES + 2 * ROW_BYTES + DS_BYTES;
};

// Gradients of `kvalid` keys (k, v, dk, dv point at the first) from every query tile of `walk`.
// Per query head h (cursor.head): q + h * lq * D, dout likewise, lse2 + h * lq, delta likewise,
// dq_acc + h * lq * D (float, atomically accumulated, unscaled).  A null dq_acc (the same in every
// thread) leaves dQ to dq_rows: dK and dV only.  `mods`: ScoreMods (slope of head 0 of the batch) or none.
template <class T, int D, bool MASKED, class W, class M = NoScoreMods>
__device__ __forceinline__ void backward_keys(const u16* q, const u16* k, const u16* v, const u16* dout,
                                              const float* lse2, const float* delta, float* dq_acc, u16* dk, u16* dv,
                                              int j0, int kvalid, int lq, Mask mask, float c, float scale, W walk,
                                              M mods = M()) {
  using S = BwdShape<D>;
  constexpr int BK = S::BK, BQ = S::BQ;
  NPSA_DECLARE_SMEM(smem);
  const int tid = threadIdx.x, warp = tid / WARP, lane = tid % WARP, g = lane / 4, t = lane % 4;
  const u32 s_k = smem_u32(smem), s_v = s_k + S::KV_BYTES, s_q = s_v + S::KV_BYTES;
  const u32 s_do = s_q + 2 * S::Q_BYTES, s_ds = s_do + 2 * S::Q_BYTES;
  float* rowvals = reinterpret_cast<float*>(smem + 2 * S::KV_BYTES + 4 * S::Q_BYTES + S::DS_BYTES);
  const long long lq_d = static_cast<long long>(lq) * D;
  const bool with_dq = dq_acc != nullptr;
  const bool modded = mods.on();

  auto load_queries = [&](const Cursor& cur, int buf) {
    const int valid = min(BQ, lq - cur.start);
    const long long at = cur.head * lq_d + static_cast<long long>(cur.start) * D;
    load_tile<BQ, D, NTHREADS>(s_q + buf * S::Q_BYTES, q + at, D, valid, tid);
    load_tile<BQ, D, NTHREADS>(s_do + buf * S::Q_BYTES, dout + at, D, valid, tid);
    cp_async_commit();
    if (tid < BQ) {  // padding rows: lse2 = +inf makes P = 0
      const long long row = static_cast<long long>(cur.head) * lq + cur.start + tid;
      const bool ok = tid < valid;
      sts(rowvals + buf * 2 * BQ + tid, ok ? ldg(lse2 + row) : inf());
      sts(rowvals + buf * 2 * BQ + BQ + tid, ok ? ldg(delta + row) : 0.f);
    }
  };

  load_tile<BK, D, NTHREADS>(s_k, k, D, kvalid, tid);
  load_tile<BK, D, NTHREADS>(s_v, v, D, kvalid, tid);
  cp_async_commit();
  Cursor cur, nxt;
  bool have = walk.next(cur);
  if (have) load_queries(cur, 0);
  else cp_async_commit();

  float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[nd][e] = dv_acc[nd][e] = 0.f;

  const int key_row = j0 + warp * 16 + g;  // this lane's keys: key_row and key_row + 8
  for (int buf = 0; have; buf ^= 1) {
    const bool have_next = walk.next(nxt);
    if (have_next) load_queries(nxt, buf ^ 1);
    else cp_async_commit();
    cp_async_wait<1>();  // K, V and this tile's Q, dO have landed
    __syncthreads();
    const u32 tq = s_q + buf * S::Q_BYTES, tdo = s_do + buf * S::Q_BYTES;
    const float* l2 = rowvals + buf * 2 * BQ;
    const float* dl = l2 + BQ;

    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys
    float p[BQ / 8][4], ds[BQ / 8][4];
#pragma unroll
    for (int nb = 0; nb < BQ / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) p[nb][e] = ds[nb][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      u32 ka[4], va[4];
      a_rows<D>(ka, s_k, warp * 16, kk * 16, lane);
      a_rows<D>(va, s_v, warp * 16, kk * 16, lane);
#pragma unroll
      for (int n2 = 0; n2 < BQ / 16; ++n2) {
        u32 b[2][2];
        b_rows<D>(b, tq, n2 * 16, kk * 16, lane);
        mma_16816<T>(p[2 * n2], ka, b[0]);
        mma_16816<T>(p[2 * n2 + 1], ka, b[1]);
        b_rows<D>(b, tdo, n2 * 16, kk * 16, lane);
        mma_16816<T>(ds[2 * n2], va, b[0]);
        mma_16816<T>(ds[2 * n2 + 1], va, b[1]);
      }
    }

    // P^T = 2^(x - lse2) with x = c S^T (modified), dS^T = P^T (dP^T - delta) dx/dS; masked entries are 0
    const bool interior = kvalid == BK && cur.start >= cur.lo && cur.start + BQ <= cur.hi &&
                          (!MASKED || (j0 >= cur.start + BQ - 1 + mask.off - mask.left &&
                                       j0 + BK - 1 <= cur.start + mask.off + mask.right));
    const float slope2 = mods.slope(cur.head);
#pragma unroll
    for (int nb = 0; nb < BQ / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nb * 8 + 2 * t + (e % 2);
        float x = p[nb][e] * c, dx = 1.f;
        if (modded) x = modify_score(x, mods.cap2, slope2, abs(cur.start + col + mask.off - key_row - 8 * (e / 2)), dx);
        float pe = exp2_approx(x - lds<float>(l2 + col));
        if (!interior) {
          const int key = key_row + 8 * (e / 2), query = cur.start + col;
          bool vis = key < j0 + kvalid && query >= cur.lo && query < cur.hi;
          if (MASKED) vis = vis && key >= query + mask.off - mask.left && key <= query + mask.off + mask.right;
          if (!vis) pe = 0.f;
        }
        p[nb][e] = pe;
        ds[nb][e] = pe * (ds[nb][e] - lds<float>(dl + col));
        if (modded) ds[nb][e] *= dx;
      }

    // dV += P^T dO, dK += dS^T Q
    u32 pa[BQ / 16][4], sa[BQ / 16][4];
    c_to_a<T, BQ>(pa, p);
    c_to_a<T, BQ>(sa, ds);
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) {
#pragma unroll
      for (int n2 = 0; n2 < D / 16; ++n2) {
        u32 b[2][2];
        b_cols<D>(b, tdo, kk * 16, n2 * 16, lane);
        mma_16816<T>(dv_acc[2 * n2], pa[kk], b[0]);
        mma_16816<T>(dv_acc[2 * n2 + 1], pa[kk], b[1]);
        b_cols<D>(b, tq, kk * 16, n2 * 16, lane);
        mma_16816<T>(dk_acc[2 * n2], sa[kk], b[0]);
        mma_16816<T>(dk_acc[2 * n2 + 1], sa[kk], b[1]);
      }
    }

    // dS^T (rounded to T, as the dK product used it) to shared memory for dQ = dS K
    unsigned char* dst = smem + (s_ds - s_k);
    if (with_dq) {
#pragma unroll
      for (int kk = 0; kk < BQ / 16; ++kk)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = warp * 16 + g + 8 * (e % 2), col = kk * 16 + 8 * (e / 2) + 2 * t;
          sts(dst + Tile<BQ>::at(row, col), sa[kk][e]);
        }
    }
    __syncthreads();  // dS^T is complete; without dQ: every read of this tile's buffers is done
    if (!with_dq) {
      cur = nxt;
      have = have_next;
      continue;
    }

    // dQ (BQ x D) = dS K: query m-tile warp % MT, columns split over the NWARPS / MT warps sharing it
    constexpr int MT = BQ / 16, SPLIT = NWARPS / MT, DN = D / SPLIT;
    static_assert(NWARPS % MT == 0 && DN % 16 == 0, "dQ tiling");
    const int mt = warp % MT, n0 = (warp / MT) * DN;
    float dq[DN / 8][4];
#pragma unroll
    for (int nd = 0; nd < DN / 8; ++nd) dq[nd][0] = dq[nd][1] = dq[nd][2] = dq[nd][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      u32 a[4];
      a_cols<BQ>(a, s_ds, mt * 16, kk * 16, lane);
#pragma unroll
      for (int n2 = 0; n2 < DN / 16; ++n2) {
        u32 b[2][2];
        b_cols<D>(b, s_k, kk * 16, n0 + n2 * 16, lane);
        mma_16816<T>(dq[2 * n2], a, b[0]);
        mma_16816<T>(dq[2 * n2 + 1], a, b[1]);
      }
    }
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
      const int query = cur.start + mt * 16 + g + 8 * e2;
      if (query < cur.lo || query >= cur.hi) continue;  // hi <= lq
      float* row = dq_acc + cur.head * lq_d + static_cast<long long>(query) * D + n0 + 2 * t;
#pragma unroll
      for (int nd = 0; nd < DN / 8; ++nd) {
        atomic_add(row + nd * 8, dq[nd][2 * e2]);
        atomic_add(row + nd * 8 + 1, dq[nd][2 * e2 + 1]);
      }
    }
    // No barrier here: the next iteration refills only buffers last read before the barrier above,
    // and writes dS^T only after its own first barrier, which every warp reaches after its dQ.
    cur = nxt;
    have = have_next;
  }
  cp_async_wait<0>();

#pragma unroll
  for (int e2 = 0; e2 < 2; ++e2) {
    const int r = warp * 16 + g + 8 * e2;
    if (r >= kvalid) continue;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      const long long at = static_cast<long long>(r) * D + nd * 8 + 2 * t;
      stg(reinterpret_cast<u32*>(dk + at), pack2<T>(dk_acc[nd][2 * e2] * scale, dk_acc[nd][2 * e2 + 1] * scale));
      stg(reinterpret_cast<u32*>(dv + at), pack2<T>(dv_acc[nd][2 * e2], dv_acc[nd][2 * e2 + 1]));
    }
  }
}

// ------------------------------------------------------------------------ deterministic dQ

// dQ without atomics (the `deterministic` backward): a CTA owns BQ query rows (warp w: rows
// 16w..16w+15) and walks the key tiles they see, recomputing S = Q K^T, dP = dO V^T,
// P = 2^(c S - lse2) and dS = P (dP - delta), and accumulates dQ = dS K in registers, in the order
// of the walk.  K and V are double-buffered; Q and dO stay in shared memory.
template <int D>
struct DqShape {
  static constexpr int BQ = 16 * NWARPS, BK = 64;
  static constexpr int KV_BYTES = Tile<D>::template bytes<BK>();
  static constexpr int Q_BYTES = Tile<D>::template bytes<BQ>();
  static constexpr int SMEM = 4 * KV_BYTES + 2 * Q_BYTES;
};

// dQ of `rows` query rows of one head (q, dout, dq, lse2, delta point at the first) over the key
// tiles of `walk` (k, v point at key 0 of the key head); `lk` keys exist.  dq = T(scale * dS K).
// `mods`: ScoreMods (slope of head 0: these rows') or none.
template <class T, int D, bool MASKED, class W, class M = NoScoreMods>
__device__ __forceinline__ void dq_rows(const u16* q, const u16* k, const u16* v, const u16* dout, const float* lse2,
                                        const float* delta, u16* dq, int i0, int rows, int lk, Mask mask, float c,
                                        float scale, W walk, M mods = M()) {
  using S = DqShape<D>;
  constexpr int BQ = S::BQ, BK = S::BK;
  NPSA_DECLARE_SMEM(smem);
  const int tid = threadIdx.x, warp = tid / WARP, lane = tid % WARP, g = lane / 4, t = lane % 4;
  const u32 sk = smem_u32(smem), sv = sk + 2 * S::KV_BYTES, sq = sv + 2 * S::KV_BYTES, sdo = sq + S::Q_BYTES;
  const int i_last = i0 + rows - 1, row0 = warp * 16;
  const bool modded = mods.on();
  const float slope2 = mods.slope(0);

  auto load_kv = [&](const Cursor& cur, int buf) {
    const int valid = min(BK, lk - cur.start);
    load_tile<BK, D, NTHREADS>(sk + buf * S::KV_BYTES, k + static_cast<long long>(cur.start) * D, D, valid, tid);
    load_tile<BK, D, NTHREADS>(sv + buf * S::KV_BYTES, v + static_cast<long long>(cur.start) * D, D, valid, tid);
    cp_async_commit();
  };

  load_tile<BQ, D, NTHREADS>(sq, q, D, rows, tid);
  load_tile<BQ, D, NTHREADS>(sdo, dout, D, rows, tid);
  cp_async_commit();
  // this lane's rows g and g + 8 of its warp: lse2 (+inf past the valid rows, so their P is 0), delta
  float l2[2], dl[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + g + 8 * r;
    l2[r] = row < rows ? ldg(lse2 + row) : inf();
    dl[r] = row < rows ? ldg(delta + row) : 0.f;
  }

  Cursor cur, nxt;
  bool have = walk.next(cur);
  if (have) load_kv(cur, 0);

  float acc[D / 8][4];
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd) acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.f;

  for (int buf = 0; have; buf ^= 1) {
    const bool have_next = walk.next(nxt);
    if (have_next) load_kv(nxt, buf ^ 1);
    else cp_async_commit();
    cp_async_wait<1>();  // Q, dO and this tile's K and V have landed
    __syncthreads();
    const u32 kt = sk + buf * S::KV_BYTES, vt = sv + buf * S::KV_BYTES;

    // S = Q K^T and dP = dO V^T for this warp's 16 rows
    float s[BK / 8][4], dp[BK / 8][4];
#pragma unroll
    for (int nb = 0; nb < BK / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nb][e] = dp[nb][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      u32 qa[4], da[4];
      a_rows<D>(qa, sq, row0, kk * 16, lane);
      a_rows<D>(da, sdo, row0, kk * 16, lane);
#pragma unroll
      for (int n2 = 0; n2 < BK / 16; ++n2) {
        u32 b[2][2];
        b_rows<D>(b, kt, n2 * 16, kk * 16, lane);
        mma_16816<T>(s[2 * n2], qa, b[0]);
        mma_16816<T>(s[2 * n2 + 1], qa, b[1]);
        b_rows<D>(b, vt, n2 * 16, kk * 16, lane);
        mma_16816<T>(dp[2 * n2], da, b[0]);
        mma_16816<T>(dp[2 * n2 + 1], da, b[1]);
      }
    }

    // P = 2^(c S - lse2), dS = P (dP - delta); masked entries 0 (the diagonal rule of forward_rows)
    const bool interior = cur.start >= cur.lo && cur.start + BK <= cur.hi &&
                          (!MASKED || (cur.start >= i_last + mask.off - mask.left &&
                                       cur.start + BK - 1 <= i0 + mask.off + mask.right));
    const int col0 = cur.start + 2 * t, diag0 = col0 - (i0 + row0 + g);
#pragma unroll
    for (int nb = 0; nb < BK / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nb][e] * c, dx = 1.f;
        if (modded) x = modify_score(x, mods.cap2, slope2, abs(mask.off - (diag0 + nb * 8 + (e % 2) - 8 * (e / 2))), dx);
        float pe = exp2_approx(x - l2[e / 2]);
        if (!interior) {
          const int col = col0 + nb * 8 + (e % 2), diag = diag0 + nb * 8 + (e % 2) - 8 * (e / 2);
          bool vis = col >= cur.lo && col < cur.hi;
          if (MASKED) vis = vis && diag >= mask.off - mask.left && diag <= mask.off + mask.right;
          if (!vis) pe = 0.f;
        }
        s[nb][e] = pe * (dp[nb][e] - dl[e / 2]);
        if (modded) s[nb][e] *= dx;
      }

    // dQ += dS K, dS rounded to T as the key-side kernel rounds it
    u32 dsa[BK / 16][4];
    c_to_a<T, BK>(dsa, s);
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
#pragma unroll
      for (int n2 = 0; n2 < D / 16; ++n2) {
        u32 b[2][2];
        b_cols<D>(b, kt, kk * 16, n2 * 16, lane);
        mma_16816<T>(acc[2 * n2], dsa[kk], b[0]);
        mma_16816<T>(acc[2 * n2 + 1], dsa[kk], b[1]);
      }
    }
    __syncthreads();  // this buffer is free for the tile after next
    cur = nxt;
    have = have_next;
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + g + 8 * r;
    if (row >= rows) continue;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd)
      stg(reinterpret_cast<u32*>(dq + static_cast<long long>(row) * D + nd * 8 + 2 * t),
          pack2<T>(acc[nd][2 * r] * scale, acc[nd][2 * r + 1] * scale));
  }
}

}  // namespace npsa
