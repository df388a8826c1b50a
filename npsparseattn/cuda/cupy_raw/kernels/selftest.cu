// Kernels that test the primitives one at a time against plain arithmetic (tests/test_raw_primitives.py).
//
// Under the host emulation they check the emulated fragment layouts and the emulator's own checks;
// on a GPU the same kernels check that the layouts the kernels assume are the hardware's.
#include "npsa_attn.cuh"

using namespace npsa;

// One warp: d = a b + c for a 16x16 (row-major), b 16x8 (row-major [k][n]), c/d 16x8 float, the
// fragments gathered straight from global memory with the PTX ISA layout (no ldmatrix).
template <class T>
__global__ void npsa_test_mma(const u16* a, const u16* b, const float* c, float* d) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  auto pair = [](const u16* p, int i, int j) {
    return static_cast<u32>(ldg(p + i)) | (static_cast<u32>(ldg(p + j)) << 16);
  };
  u32 af[4], bf[2];
  af[0] = pair(a, g * 16 + 2 * t, g * 16 + 2 * t + 1);
  af[1] = pair(a, (g + 8) * 16 + 2 * t, (g + 8) * 16 + 2 * t + 1);
  af[2] = pair(a, g * 16 + 2 * t + 8, g * 16 + 2 * t + 9);
  af[3] = pair(a, (g + 8) * 16 + 2 * t + 8, (g + 8) * 16 + 2 * t + 9);
  bf[0] = pair(b, (2 * t) * 8 + g, (2 * t + 1) * 8 + g);
  bf[1] = pair(b, (2 * t + 8) * 8 + g, (2 * t + 9) * 8 + g);
  const int idx[4] = {g * 8 + 2 * t, g * 8 + 2 * t + 1, (g + 8) * 8 + 2 * t, (g + 8) * 8 + 2 * t + 1};
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = ldg(c + idx[i]);
  mma_16816<T>(acc, af, bf);
  for (int i = 0; i < 4; ++i) stg(d + idx[i], acc[i]);
}

// One warp: 32 rows of 8 elements (`m`, row r at r * 8) go to shared memory rows of 16 elements;
// lane L gives the address of shared row rows[L]; out[L * 4 + i] is register i of lane L.
template <bool TRANS>
__global__ void npsa_test_ldmatrix(const u16* m, const int* rows, u32* out) {
  NPSA_DECLARE_SMEM(smem);
  const int lane = threadIdx.x;
  sts(smem + 32 * lane, ldg(reinterpret_cast<const u32x4*>(m) + lane));
  __syncthreads();
  u32 r[4];
  const u32 addr = smem_u32(smem) + static_cast<u32>(ldg(rows + lane)) * 32;
  if (TRANS) ldmatrix_x4_trans(r, addr);
  else ldmatrix_x4(r, addr);
  for (int i = 0; i < 4; ++i) stg(out + lane * 4 + i, r[i]);
}

// One warp: out[L * 5 + k] = the value of lane L ^ (1 << k).
__global__ void npsa_test_shfl(const float* in, float* out) {
  const int lane = threadIdx.x;
  const float v = ldg(in + lane);
  for (int k = 0; k < 5; ++k) stg(out + lane * 5 + k, shfl_xor(v, 1 << k));
}

// Two float values per lane -> pack2<T> -> to_float<T>: packed[L], back[2L], back[2L+1].
template <class T>
__global__ void npsa_test_pack(const float* in, u32* packed, float* back) {
  const int lane = threadIdx.x;
  const u32 p = pack2<T>(ldg(in + 2 * lane), ldg(in + 2 * lane + 1));
  stg(packed + lane, p);
  stg(back + 2 * lane, to_float<T>(static_cast<u16>(p & 0xffffu)));
  stg(back + 2 * lane + 1, to_float<T>(static_cast<u16>(p >> 16)));
}

// 64 threads, 64 rows of 8 elements.  Rows 0..31 are copied in commit group 0, rows 32..63 in group
// 1 (rows >= valid zero-filled).  After wait_group 1 each thread of group 0 copies its own row out
// (dst rows 0..31); after wait_group 0 and a barrier thread i copies row 63 - i (another thread's)
// to dst row 64 + i.
__global__ void npsa_test_cp_async(const u16* src, u16* dst, int valid) {
  NPSA_DECLARE_SMEM(smem);
  const int i = threadIdx.x;
  const u32 base = smem_u32(smem);
  if (i < 32) cp_async_16(base + i * 16, src + i * 8, true);
  cp_async_commit();
  if (i >= 32) cp_async_16(base + i * 16, src + i * 8, i < valid);
  cp_async_commit();
  cp_async_wait<1>();
  if (i < 32) stg(reinterpret_cast<u32x4*>(dst) + i, lds<u32x4>(smem + 16 * i));
  cp_async_wait<0>();
  __syncthreads();
  stg(reinterpret_cast<u32x4*>(dst) + 64 + i, lds<u32x4>(smem + 16 * (63 - i)));
}

// One warp, the tile helpers of npsa_tile.cuh composed as the attention kernels compose them:
//   c1 (16x16) = a (16xD) bt^T (bt: 16xD, rows >= bt_valid read as zero)       [a_rows, b_rows]
//   c2 (16xD)  = round_T(c1) v (v: 16xD)                                       [c_to_a, b_cols]
//   c3 (16xD)  = bt[:, :16]^T v                                                [a_cols, b_cols]
template <class T, int D>
__global__ void npsa_test_tiles(const u16* a, const u16* bt, int bt_valid, const u16* v, float* c1, float* c2,
                                float* c3) {
  NPSA_DECLARE_SMEM(smem);
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  const u32 sa = smem_u32(smem), sb = sa + Tile<D>::template bytes<16>(), sv = sb + Tile<D>::template bytes<16>();
  load_tile<16, D, WARP>(sa, a, D, 16, lane);
  load_tile<16, D, WARP>(sb, bt, D, bt_valid, lane);
  load_tile<16, D, WARP>(sv, v, D, 16, lane);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  float s[2][4] = {};
  for (int k = 0; k < D; k += 16) {
    u32 af[4], bf[2][2];
    a_rows<D>(af, sa, 0, k, lane);
    b_rows<D>(bf, sb, 0, k, lane);
    mma_16816<T>(s[0], af, bf[0]);
    mma_16816<T>(s[1], af, bf[1]);
  }
  u32 p[1][4];
  c_to_a<T, 16>(p, s);
  float o[D / 8][4] = {};
  float o3[D / 8][4] = {};
  u32 at[4];
  a_cols<D>(at, sb, 0, 0, lane);
  for (int n = 0; n < D; n += 16) {
    u32 bf[2][2];
    b_cols<D>(bf, sv, 0, n, lane);
    mma_16816<T>(o[n / 8], p[0], bf[0]);
    mma_16816<T>(o[n / 8 + 1], p[0], bf[1]);
    mma_16816<T>(o3[n / 8], at, bf[0]);
    mma_16816<T>(o3[n / 8 + 1], at, bf[1]);
  }
  for (int nb = 0; nb < 2; ++nb)
    for (int i = 0; i < 4; ++i) stg(c1 + (g + 8 * (i / 2)) * 16 + nb * 8 + 2 * t + (i % 2), s[nb][i]);
  for (int nb = 0; nb < D / 8; ++nb)
    for (int i = 0; i < 4; ++i) {
      const int at_ = (g + 8 * (i / 2)) * D + nb * 8 + 2 * t + (i % 2);
      stg(c2 + at_, o[nb][i]);
      stg(c3 + at_, o3[nb][i]);
    }
}

// The launch geometry of the attention kernels for head dimension D, for the Python side to check
// its own copy against: dense forward BQ, BK, shared bytes; block-sparse forward BQ, BK, shared
// bytes; backward BK, BQ, shared bytes; threads; deterministic dQ BQ, shared bytes.
template <int D>
__global__ void npsa_test_shapes(int* out) {
  if (threadIdx.x != 0) return;
  const int values[12] = {DenseFwdShape<D>::BQ,  DenseFwdShape<D>::BK,   DenseFwdShape<D>::SMEM,
                          SparseFwdShape<D>::BQ, SparseFwdShape<D>::BK,  SparseFwdShape<D>::SMEM,
                          BwdShape<D>::BK,       BwdShape<D>::BQ,        BwdShape<D>::SMEM,
                          NTHREADS,              DqShape<D>::BQ,         DqShape<D>::SMEM};
  for (int i = 0; i < 12; ++i) stg(out + i, values[i]);
}

// Programs that break a rule, for the emulator's checks (MODE), each the planted bug of one check:
//   0 global load past the buffer (memcheck)
//   1 misaligned ldmatrix address
//   2 __syncthreads in half the block (a deadlock)
//   3 lanes of one warp in different collectives
//   4 shared memory read before its cp.async.wait_group (out[i] = what thread i saw: without the strict
//     checks, the fill)
//   5 a race: thread i writes shared word i and reads word i + 1 with no barrier between (racecheck)
//   6 a read of shared memory nothing wrote (initcheck; without the strict checks it reads the fill)
//   7 a cp.async whose global source is 2 bytes off a 16-byte boundary
//   8 two different __syncthreads: the first warp at one, the others at another (synccheck)
//   9 a misaligned 16-byte shared-memory load
// Launched with 32 or 64 threads and 512 bytes of shared memory; `in` holds 8 * threads + 8 elements.
template <int MODE>
__global__ void npsa_test_fault(const u16* in, u16* out) {
  NPSA_DECLARE_SMEM(smem);
  const int i = threadIdx.x;
  if (MODE == 0) stg(out + i, ldg(in + 8 * blockDim.x + 8 + i));
  if (MODE == 1) {
    u32 r[4];
    ldmatrix_x4(r, smem_u32(smem) + 8);
    stg(out + i, static_cast<u16>(r[0]));
  }
  if (MODE == 2 && i < 32) __syncthreads();
  if (MODE == 3) {
    if (i % 2) stg(out + i, static_cast<u16>(shfl_xor(1.0f, 1)));
    else {
      u32 r[4];
      ldmatrix_x4(r, smem_u32(smem));
      stg(out + i, static_cast<u16>(r[0]));
    }
  }
  if (MODE == 4) {
    cp_async_16(smem_u32(smem) + 16 * i, in + 8 * i, true);
    cp_async_commit();
    stg(out + i, static_cast<u16>(lds<u32>(smem + 16 * i)));
    cp_async_wait<0>();
  }
  if (MODE == 5) {
    sts(smem + 4 * i, static_cast<u32>(ldg(in + i)));
    __syncthreads();
    sts(smem + 4 * i, static_cast<u32>(i));
    stg(out + i, static_cast<u16>(lds<u32>(smem + 4 * ((i + 1) % blockDim.x))));  // missing barrier
  }
  if (MODE == 6) stg(out + i, static_cast<u16>(lds<u32>(smem + 256 + 4 * (i % 64))));
  if (MODE == 7) {
    cp_async_16(smem_u32(smem) + 16 * i, in + 8 * i + 1, true);
    cp_async_commit();
    cp_async_wait<0>();
  }
  if (MODE == 8) {
    if (i < 32) __syncthreads();
    else __syncthreads();
  }
  if (MODE == 9) {
    sts(smem + 16 * i, lds<u32x4>(smem + 8));
  }
}
