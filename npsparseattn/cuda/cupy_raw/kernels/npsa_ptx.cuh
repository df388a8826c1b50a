// The warp-level PTX the attention kernels use: one small inline function per instruction.
//
// Everything the kernels do below plain C++ goes through this file: tensor-core mma.sync m16n8k16,
// ldmatrix, cp.async, the f16/bf16 conversions, ex2.approx, warp shuffles, the float atomic add,
// global loads/stores (ldg/stg) and shared-memory loads/stores (lds/sts; the emulation checks their
// alignment, bounds and races, so the kernels never dereference a shared-memory pointer themselves).  The host emulation (npsparseattn/cuda/emulate/npsa_host.h, force-included
// before this file when NPSA_HOST_EMULATION is defined) implements the same functions from the
// fragment layouts of the PTX ISA, so the kernels compile unchanged for the GPU (NVRTC) and the host.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), with
// g = lane / 4 and t = lane % 4:
//   A (16x16, row-major), 4 x 32-bit registers, 2 elements each (low half = lower column):
//     reg 0: A[g][2t..2t+1]   reg 1: A[g+8][2t..2t+1]   reg 2: A[g][2t+8..]   reg 3: A[g+8][2t+8..]
//   B (16x8, "col"), 2 registers:  reg 0: B[2t..2t+1][g]   reg 1: B[2t+8..2t+9][g]
//   C/D (16x8, float), 4 values:   c0,c1: C[g][2t..2t+1]    c2,c3: C[g+8][2t..2t+1]
// ldmatrix .m8n8 .b16: lanes 8m..8m+7 give the row addresses of matrix m; lane L receives in
//   register m the elements M_m[L/4][2(L%4) .. 2(L%4)+1]; with .trans, M_m[2(L%4)][L/4] (low half)
//   and M_m[2(L%4)+1][L/4] (high half).
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;

namespace npsa {

struct f16 {};   // IEEE binary16 elements (storage: u16)
struct bf16 {};  // bfloat16 elements (storage: u16)

struct alignas(16) u32x4 {  // 16 bytes: one cp.async chunk, one vector load/store
  u32 x, y, z, w;
};

}  // namespace npsa

#ifndef NPSA_HOST_EMULATION

#define NPSA_DECLARE_SMEM(name) extern __shared__ __align__(128) unsigned char name[]

namespace npsa {

// Shared-window address of a generic pointer into shared memory (what ldmatrix/cp.async take).
__device__ __forceinline__ u32 smem_u32(const void* p) {
  u32 r;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
  return r;
}

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a * b on the tensor cores, float accumulation.
template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<f16>(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<bf16>(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 16 bytes global -> shared, asynchronous; zero-filled (no global read) when !full.
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, bool full) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(full ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

// Two floats -> one register of two 16-bit elements, round to nearest even; lo in the low half.
template <class T>
__device__ __forceinline__ u32 pack2(float lo, float hi);

template <>
__device__ __forceinline__ u32 pack2<f16>(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

template <>
__device__ __forceinline__ u32 pack2<bf16>(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

template <class T>
__device__ __forceinline__ float to_float(u16 x);

template <>
__device__ __forceinline__ float to_float<f16>(u16 x) {
  float r;
  asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(x));
  return r;
}

template <>
__device__ __forceinline__ float to_float<bf16>(u16 x) {
  return __uint_as_float(static_cast<u32>(x) << 16);
}

// 2^x (approximate, flushes subnormals; 2^-inf = 0).
__device__ __forceinline__ float exp2_approx(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

// The value of `v` held by lane (this lane ^ mask), across the whole warp.
__device__ __forceinline__ float shfl_xor(float v, int mask) {
  float r;
  asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;" : "=f"(r) : "f"(v), "r"(mask));
  return r;
}

__device__ __forceinline__ void atomic_add(float* p, float v) {
  asm volatile("red.global.add.f32 [%0], %1;" ::"l"(p), "f"(v) : "memory");
}

template <class V>
__device__ __forceinline__ V ldg(const V* p) {
  return *p;
}

template <class V>
__device__ __forceinline__ void stg(V* p, V v) {
  *p = v;
}

// A V (u32, float, u32x4) at a generic pointer into the dynamic shared memory, aligned to sizeof(V).
template <class V>
__device__ __forceinline__ V lds(const void* p) {
  return *reinterpret_cast<const V*>(p);
}

template <class V>
__device__ __forceinline__ void sts(void* p, V v) {
  *reinterpret_cast<V*>(p) = v;
}

}  // namespace npsa

#endif  // NPSA_HOST_EMULATION
