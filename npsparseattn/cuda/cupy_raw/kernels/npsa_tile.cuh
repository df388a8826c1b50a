// Shared-memory tiles of 16-bit elements and the tensor-core fragments read from them.
//
// A tile holds ROWS rows of D elements with a row stride of D + 8 elements: the 16 padding bytes
// shift consecutive rows by four banks, so the eight row addresses of one ldmatrix hit eight
// different 16-byte bank groups (no conflicts) for every D that is a multiple of 16.  All tiles are
// loaded from global memory with 16-byte cp.async chunks; rows past the valid ones are zero-filled.
//
// Fragment loaders (names say which mma operand they produce and how the tile is laid out):
//   a_rows   A[m][k] = tile[m0 + m][k0 + k]          (16x16, e.g. Q or K rows)
//   a_cols   A[m][k] = tile[k0 + k][m0 + m]          (16x16, e.g. dS from a stored dS^T)
//   b_rows   B[k][n] = tile[n0 + n][k0 + k]          (two 16x8 B operands, n0..n0+15; e.g. K in Q K^T)
//   b_cols   B[k][n] = tile[k0 + k][n0 + n]          (two 16x8 B operands, n0..n0+15; e.g. V in P V)
#pragma once
#include "npsa_ptx.cuh"

namespace npsa {

constexpr int WARP = 32;

template <int D>
struct Tile {
  static constexpr int STRIDE = D + 8;  // elements per row in shared memory
  static_assert(D % 16 == 0, "head dimension must be a multiple of 16");

  template <int ROWS>
  __host__ __device__ static constexpr int bytes() {
    return ROWS * STRIDE * 2;
  }

  // Byte offset of element (row, col) from the tile start.
  static __device__ __forceinline__ u32 at(int row, int col) { return static_cast<u32>((row * STRIDE + col) * 2); }
};

// Rows [0, ROWS) of a global matrix (row stride `ld` elements) into the tile at shared address
// `dst`; rows >= `valid` are zero-filled without touching global memory.  One commit group is not
// closed here: the caller commits.
template <int ROWS, int D, int NTHREADS>
__device__ __forceinline__ void load_tile(u32 dst, const u16* src, int ld, int valid, int tid) {
  constexpr int CHUNKS = D / 8;
#pragma unroll
  for (int c = tid; c < ROWS * CHUNKS; c += NTHREADS) {
    const int r = c / CHUNKS, k = (c % CHUNKS) * 8;
    const bool ok = r < valid;
    cp_async_16(dst + Tile<D>::at(r, k), src + static_cast<long long>(ok ? r : 0) * ld + k, ok);
  }
}

template <int D>
__device__ __forceinline__ void a_rows(u32 (&a)[4], u32 tile, int m0, int k0, int lane) {
  ldmatrix_x4(a, tile + Tile<D>::at(m0 + (lane % 16), k0 + (lane / 16) * 8));
}

template <int D>
__device__ __forceinline__ void a_cols(u32 (&a)[4], u32 tile, int m0, int k0, int lane) {
  const int mat = lane / 8;
  ldmatrix_x4_trans(a, tile + Tile<D>::at(k0 + lane % 8 + 8 * (mat / 2), m0 + 8 * (mat % 2)));
}

// b[0] is the operand for columns n0..n0+7, b[1] for n0+8..n0+15.
template <int D>
__device__ __forceinline__ void b_rows(u32 (&b)[2][2], u32 tile, int n0, int k0, int lane) {
  u32 r[4];
  ldmatrix_x4(r, tile + Tile<D>::at(n0 + lane % 8 + 8 * (lane / 16), k0 + 8 * ((lane / 8) % 2)));
  b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
}

template <int D>
__device__ __forceinline__ void b_cols(u32 (&b)[2][2], u32 tile, int k0, int n0, int lane) {
  u32 r[4];
  ldmatrix_x4_trans(r, tile + Tile<D>::at(k0 + lane % 8 + 8 * ((lane / 8) % 2), n0 + 8 * (lane / 16)));
  b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
}

// An accumulator tile c[N/8][4] (16 x N, float) as the A operands of the next product (16 x N,
// k = N), rounded to T: the C layout of n-blocks 2j and 2j+1 is the A layout of k-step j.
template <class T, int N>
__device__ __forceinline__ void c_to_a(u32 (&a)[N / 16][4], const float (&c)[N / 8][4]) {
#pragma unroll
  for (int j = 0; j < N / 16; ++j) {
    a[j][0] = pack2<T>(c[2 * j][0], c[2 * j][1]);
    a[j][1] = pack2<T>(c[2 * j][2], c[2 * j][3]);
    a[j][2] = pack2<T>(c[2 * j + 1][0], c[2 * j + 1][1]);
    a[j][3] = pack2<T>(c[2 * j + 1][2], c[2 * j + 1][3]);
  }
}

__device__ __forceinline__ float inf() { return __uint_as_float(0x7f800000u); }

}  // namespace npsa
