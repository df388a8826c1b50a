// Host emulation of the CUDA the npsparseattn kernels use, so the same .cu sources run on a CPU.
//
// Force-included (g++ -include) before the kernel sources.  A launch runs the blocks of the grid one
// after another; the threads of a block are cooperative fibers (ucontext for the first entry, then
// _setjmp/_longjmp, ~50 ns a switch), so __syncthreads() is a real barrier.  Warp-level instructions
// (mma.sync, ldmatrix, shfl) are collective: each lane deposits its operands, the last lane to arrive
// executes the instruction for the whole warp from the fragment layouts of the PTX ISA (see
// kernels/npsa_ptx.cuh), and every lane picks up its own result.  cp.async copies stay pending until
// the thread's cp.async.wait_group retires their group, so a read before the wait sees stale data.
// Shared memory is refilled with 0xFF bytes (NaN in f16, bf16 and f32) before every block.
//
// Schedules (flags of a launch): by default the threads run in index order, each until it blocks,
// round after round, so the warps of a block advance together, the blocks of the grid in index order
// (REVERSE_BLOCKS: last first, so that the order of atomic additions from different blocks changes),
// and copies land as late as allowed:
// a read that misses its wait or barrier sees the fill.  REVERSE runs them last-first; GREEDY always
// resumes the first ready thread, so one warp runs ahead to its next __syncthreads before the next
// warp starts; EAGER_COPIES lands cp.async copies at issue, so with GREEDY a copy that overwrites a
// buffer another warp still has to read (a missing barrier before the reuse) corrupts that read.  A
// race-free kernel gives the same bits under every schedule.
//
// What is checked (each failure ends the launch with a message, like a CUDA launch error):
// the launch itself (no grid dimension of 0, a block of 1..1024 threads within the block limits, the
// dynamic shared memory within the device's limit); global accesses (ldg/stg/cp.async/atomic_add)
// inside the buffers registered for the launch and aligned; shared accesses (ldmatrix, cp.async,
// lds/sts) inside the dynamic shared memory and aligned (16 bytes for ldmatrix, cp.async and vectors);
// all 32 lanes of a warp in the same collective; no thread waiting at a barrier that another thread
// can no longer reach (deadlock, or a thread that exited).
//
// Strict mode (the default; the flag RELAXED turns it off) adds, per block, the checks of
// compute-sanitizer's racecheck, initcheck and synccheck, for every schedule:
// * races: every shared-memory byte records who wrote and who read it in the current barrier
//   interval (the time between two completed __syncthreads); a read of a byte another thread wrote,
//   a write of a byte another thread wrote or read, in the same interval, is a race whatever order
//   the threads happened to run in.  A cp.async write counts from its issue to the wait that retires
//   it: any access to its bytes in between by another thread is a race, and by the issuing thread a
//   read before its wait;
// * uninitialised reads: a read of a shared byte nothing wrote since the block started;
// * barrier divergence: the threads of one barrier must all wait at the same __syncthreads.
#pragma once
#define NPSA_HOST_EMULATION 1

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) alignas(n)

using std::max;
using std::min;

struct npsa_dim3 {
  unsigned x, y, z;
};

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}

namespace npsa_emu {

enum State { READY, AT_SYNC, AT_WARP, DONE };
enum Op { OP_NONE, OP_LDMATRIX_X4, OP_LDMATRIX_X4_TRANS, OP_MMA_F16, OP_MMA_BF16, OP_SHFL_XOR };
inline const char* op_name(int op) {
  static const char* names[] = {"none", "ldmatrix.x4", "ldmatrix.x4.trans", "mma.f16", "mma.bf16", "shfl.bfly"};
  return names[op];
}

constexpr int SLOT = 64;  // bytes of one lane's operands or results in a warp collective

struct PendingCopy {
  unsigned dst;
  int group;
  unsigned char data[16];
};

// Per shared-memory byte, for the strict checks: who wrote and who read it in which barrier interval
// (epoch), whose cp.async is still writing it, and whether anything wrote it.  Threads are stored
// as index + 1 (0: none); MANY readers as 0xFFFF.  All zero at the start of a block.
struct Shadow {
  uint32_t w_epoch, r_epoch;
  uint16_t writer, reader, pending;
  uint8_t init, pad;
};
constexpr uint16_t MANY = 0xFFFF;

struct Fiber {
  jmp_buf jb;
  ucontext_t uc;
  char* stack;
  State state;
  bool started;
  npsa_dim3 tid;
  unsigned flat;
  int committed;  // cp.async groups committed so far; the open group has this id
  std::vector<PendingCopy> copies;
};

struct Warp {
  int arrived, gen, op;
  alignas(16) unsigned char in[2][32][SLOT];
  alignas(16) unsigned char out[2][32][SLOT];
};

struct Range {
  uintptr_t lo, hi;
};

struct Launch {
  npsa_dim3 grid, block, bid;
  unsigned nthreads = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<unsigned char> smem;
  std::vector<Range> ranges;
  int sync_arrived = 0;
  bool failed = false;
  std::string error;
  std::function<void()> body;
  jmp_buf sched;
  ucontext_t sched_uc;
  Fiber* cur = nullptr;
  bool reverse = false, greedy = false, eager_copies = false, strict = true, reverse_blocks = false;
  unsigned max_smem = 166912;  // bytes of dynamic shared memory a block may have (sm_80; sm_90: 232448)
  uint32_t epoch = 1;          // the current barrier interval of the block
  unsigned warp_base = 0;      // first thread of the warp whose collective is executing
  const char* sync_file = nullptr;
  int sync_line = 0;
  std::vector<Shadow> shadow;
};

enum ScheduleFlags { REVERSE = 1, GREEDY = 2, EAGER_COPIES = 4, RELAXED = 8, REVERSE_BLOCKS = 16 };

inline Launch* L = nullptr;
constexpr size_t STACK = 256 * 1024;

// Fiber stacks: one pool, grown on demand, each stack with a guard page below it.
inline std::vector<char*>& stack_pool() {
  static std::vector<char*> pool;
  return pool;
}

inline char* stack_for(unsigned i) {
  auto& pool = stack_pool();
  while (pool.size() <= i) {
    const size_t page = 4096;
    void* p = mmap(nullptr, STACK + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    mprotect(p, page, PROT_NONE);
    pool.push_back(static_cast<char*>(p) + page);
  }
  return pool[i];
}

inline void yield() {
  if (!_setjmp(L->cur->jb)) _longjmp(L->sched, 1);
}

// End the launch with `msg` (the first failure wins); never returns to the caller.
[[noreturn]] inline void fail(const std::string& msg) {
  if (!L->failed) {
    char where[96];
    std::snprintf(where, sizeof where, " (block %u,%u,%u thread %u)", L->bid.x, L->bid.y, L->bid.z,
                  L->cur ? L->cur->flat : 0u);
    L->error = msg + where;
    L->failed = true;
  }
  L->cur->state = DONE;
  _longjmp(L->sched, 1);
}

inline void check_global(const void* p, size_t n, size_t align, const char* what) {
  uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a % align) fail(std::string(what) + ": misaligned global address");
  for (const Range& r : L->ranges)
    if (a >= r.lo && a + n <= r.hi) return;
  char buf[128];
  std::snprintf(buf, sizeof buf, "%s: global address %#lx (+%zu bytes) outside every buffer of the launch", what,
                static_cast<unsigned long>(a), n);
  fail(buf);
}

inline unsigned char* shared_at(unsigned addr, size_t n, size_t align, const char* what) {
  if (addr % align) fail(std::string(what) + ": misaligned shared address");
  if (static_cast<size_t>(addr) + n > L->smem.size()) fail(std::string(what) + ": shared address out of range");
  return L->smem.data() + addr;
}

// ---- the strict checks of shared memory (see the top of this file)

[[noreturn]] inline void race(const char* kind, const char* what, unsigned byte, unsigned first, unsigned second) {
  char buf[240];
  std::snprintf(buf, sizeof buf,
                "shared-memory race (%s) at byte %u: threads %u and %u in one barrier interval (%s)", kind,
                byte, first, second, what);
  fail(buf);
}

// Thread `t` reads bytes [addr, addr + n) of shared memory.
inline void on_read(unsigned addr, size_t n, unsigned t, const char* what) {
  if (!L->strict) return;
  const uint16_t me = static_cast<uint16_t>(t + 1);
  for (size_t i = 0; i < n; ++i) {
    Shadow& s = L->shadow[addr + i];
    if (s.pending == me)
      fail(std::string(what) + ": reads shared memory its own cp.async has not landed yet (no cp.async.wait_group)");
    if (s.pending) race("cp.async write/read", what, addr + i, s.pending - 1u, t);
    if (!s.init) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "%s: reads uninitialised shared memory at byte %u (nothing wrote it in this block)",
                    what, addr + static_cast<unsigned>(i));
      fail(buf);
    }
    if (s.w_epoch == L->epoch && s.writer != me) race("write/read", what, addr + i, s.writer - 1u, t);
    if (s.r_epoch != L->epoch) s.r_epoch = L->epoch, s.reader = me;
    else if (s.reader != me) s.reader = MANY;
  }
}

// Thread `t` writes bytes [addr, addr + n) of shared memory (a cp.async: from its issue; `pending` until
// the wait that retires it).
inline void on_write(unsigned addr, size_t n, unsigned t, const char* what, bool pending = false) {
  if (!L->strict) return;
  const uint16_t me = static_cast<uint16_t>(t + 1);
  for (size_t i = 0; i < n; ++i) {
    Shadow& s = L->shadow[addr + i];
    if (s.pending) race("cp.async write/write", what, addr + i, s.pending - 1u, t);
    if (s.w_epoch == L->epoch && s.writer != me) race("write/write", what, addr + i, s.writer - 1u, t);
    if (s.r_epoch == L->epoch && s.reader != me) {
      race("read/write", what, addr + i, s.reader == MANY ? t : s.reader - 1u, t);
    }
    s.w_epoch = L->epoch, s.writer = me, s.init = 1;
    if (pending) s.pending = me;
  }
}

// A cp.async of thread `t` lands: its bytes are written now, in this interval.
inline void on_landed(unsigned addr, size_t n, unsigned t) {
  if (!L->strict) return;
  for (size_t i = 0; i < n; ++i) {
    Shadow& s = L->shadow[addr + i];
    s.pending = 0, s.w_epoch = L->epoch, s.writer = static_cast<uint16_t>(t + 1), s.init = 1;
  }
}

inline void syncthreads(const char* file, int line) {
  if (L->strict) {
    if (L->sync_arrived == 0) {
      L->sync_file = file, L->sync_line = line;
    } else if (L->sync_line != line || std::strcmp(L->sync_file, file) != 0) {
      char buf[600];
      std::snprintf(buf, sizeof buf, "barrier divergence: threads wait at the __syncthreads of %s:%d and of %s:%d",
                    L->sync_file, L->sync_line, file, line);
      fail(buf);
    }
  }
  if (++L->sync_arrived == static_cast<int>(L->nthreads)) {
    L->sync_arrived = 0;
    ++L->epoch;
    for (Fiber& f : L->fibers)
      if (f.state == AT_SYNC) f.state = READY;
    return;
  }
  L->cur->state = AT_SYNC;
  yield();
}

// A warp-collective instruction: every lane passes `in`; the last lane to arrive runs
// `exec(ins, outs)` for all 32 lanes; each lane returns its own `out`.
template <class In, class Out, class Exec>
inline Out warp_collective(int op, const In& in, Exec exec) {
  static_assert(sizeof(In) <= SLOT && sizeof(Out) <= SLOT, "collective payload too large");
  Fiber* me = L->cur;
  Warp& w = L->warps[me->flat / 32];
  const unsigned lane = me->flat % 32;
  if (w.arrived == 0) {
    w.op = op;
  } else if (w.op != op) {
    fail(std::string("warp divergence: lanes execute ") + op_name(w.op) + " and " + op_name(op));
  }
  const int slot = w.gen & 1;
  std::memcpy(w.in[slot][lane], &in, sizeof(In));
  if (++w.arrived == 32) {
    In ins[32];
    Out outs[32];
    for (int l = 0; l < 32; ++l) std::memcpy(&ins[l], w.in[slot][l], sizeof(In));
    L->warp_base = me->flat - lane;
    exec(ins, outs);
    for (int l = 0; l < 32; ++l) std::memcpy(w.out[slot][l], &outs[l], sizeof(Out));
    w.arrived = 0;
    ++w.gen;
    const unsigned first = me->flat - lane;
    for (unsigned l = 0; l < 32; ++l)
      if (L->fibers[first + l].state == AT_WARP) L->fibers[first + l].state = READY;
  } else {
    me->state = AT_WARP;
    yield();
  }
  Out out;
  std::memcpy(&out, w.out[slot][lane], sizeof(Out));
  return out;
}

inline void fiber_entry() {
  L->body();
  L->cur->state = DONE;
  _longjmp(L->sched, 1);
}

inline void run_fiber(Fiber& f) {
  L->cur = &f;
  if (!_setjmp(L->sched)) {
    if (!f.started) {
      f.started = true;
      swapcontext(&L->sched_uc, &f.uc);
    } else {
      _longjmp(f.jb, 1);
    }
  }
  L->cur = nullptr;
}

inline std::string deadlock_report() {
  int sync = 0, warp = 0, done = 0;
  for (Fiber& f : L->fibers) {
    sync += f.state == AT_SYNC;
    warp += f.state == AT_WARP;
    done += f.state == DONE;
  }
  char buf[200];
  std::snprintf(buf, sizeof buf,
                "deadlock: %d threads wait at __syncthreads, %d at a warp collective, %d have exited "
                "(block %u,%u,%u)",
                sync, warp, done, L->bid.x, L->bid.y, L->bid.z);
  return buf;
}

// Run one block to completion; false on failure (L->error says why).
inline bool run_block() {
  std::memset(L->smem.data(), 0xFF, L->smem.size());  // NaN in f16, bf16 and f32: a stale read shows
  if (L->strict) std::memset(L->shadow.data(), 0, L->shadow.size() * sizeof(Shadow));
  L->epoch = 1;
  L->sync_arrived = 0;
  for (Warp& w : L->warps) w.arrived = w.gen = w.op = 0;
  for (Fiber& f : L->fibers) {
    f.state = READY;
    f.started = false;
    f.committed = 0;
    f.copies.clear();
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = f.stack;
    f.uc.uc_stack.ss_size = STACK;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, fiber_entry, 0);
  }
  const int n = static_cast<int>(L->nthreads);
  for (;;) {
    bool progressed = false;
    for (int k = 0; k < n; ++k) {
      Fiber& f = L->fibers[L->reverse ? n - 1 - k : k];
      if (f.state != READY) continue;
      run_fiber(f);
      if (L->failed) return false;
      progressed = true;
      if (L->greedy) break;  // rescan from the first thread
    }
    if (!progressed) {
      for (Fiber& f : L->fibers)
        if (f.state != DONE) {
          L->error = deadlock_report();
          L->failed = true;
          return false;
        }
      return true;
    }
  }
}

inline bool run_grid(const unsigned* grid, const unsigned* block, unsigned smem_bytes) {
  L->grid = {grid[0], grid[1], grid[2]};
  L->block = {block[0], block[1], block[2]};
  L->nthreads = block[0] * block[1] * block[2];
  char buf[200];
  if (!grid[0] || !grid[1] || !grid[2] || grid[1] > 65535 || grid[2] > 65535 || grid[0] > 2147483647u) {
    std::snprintf(buf, sizeof buf, "grid (%u, %u, %u): every dimension must be 1 or more (at most 2^31-1, 65535, 65535)",
                  grid[0], grid[1], grid[2]);
    L->error = buf;
    return false;
  }
  if (L->nthreads == 0 || L->nthreads % 32 || L->nthreads > 1024 || block[2] > 64) {
    L->error = "block size must be a positive multiple of 32, at most 1024 (z at most 64)";
    return false;
  }
  if (smem_bytes > L->max_smem) {
    std::snprintf(buf, sizeof buf, "%u bytes of dynamic shared memory, more than the device's %u", smem_bytes,
                  L->max_smem);
    L->error = buf;
    return false;
  }
  L->fibers.assign(L->nthreads, Fiber{});
  L->warps.assign(L->nthreads / 32, Warp{});
  L->smem.assign(smem_bytes, 0);
  if (L->strict) L->shadow.assign(smem_bytes, Shadow{});
  for (unsigned i = 0; i < L->nthreads; ++i) {
    Fiber& f = L->fibers[i];
    f.stack = stack_for(i);
    if (!f.stack) {
      L->error = "cannot allocate a fiber stack";
      return false;
    }
    f.flat = i;
    f.tid = {i % block[0], (i / block[0]) % block[1], i / (block[0] * block[1])};
  }
  const unsigned long long blocks = 1ull * grid[0] * grid[1] * grid[2];
  for (unsigned long long i = 0; i < blocks; ++i) {
    const unsigned long long b = L->reverse_blocks ? blocks - 1 - i : i;
    L->bid = {static_cast<unsigned>(b % grid[0]), static_cast<unsigned>(b / grid[0] % grid[1]),
              static_cast<unsigned>(b / grid[0] / grid[1])};
    if (!run_block()) return false;
  }
  return true;
}

// ---- kernel parameters, unpacked from a cuLaunchKernel-style array of pointers to values

template <class A>
constexpr char type_code() {
  using B = std::remove_cv_t<A>;
  if constexpr (std::is_pointer_v<B>) return 'p';
  else if constexpr (std::is_same_v<B, int>) return 'i';
  else if constexpr (std::is_same_v<B, unsigned>) return 'u';
  else if constexpr (std::is_same_v<B, float>) return 'f';
  else if constexpr (std::is_same_v<B, long long>) return 'l';
  else return '?';
}

template <class... A>
inline std::string signature() {
  return std::string{type_code<A>()...};
}

template <class... A, size_t... I>
inline std::tuple<std::remove_cv_t<A>...> unpack(void** args, std::index_sequence<I...>) {
  return std::tuple<std::remove_cv_t<A>...>{*static_cast<std::remove_cv_t<A>*>(args[I])...};
}

template <class... A>
inline bool launch(void (*kernel)(A...), const unsigned* grid, const unsigned* block, unsigned smem, void** args) {
  auto values = unpack<A...>(args, std::index_sequence_for<A...>{});
  L->body = [&]() { std::apply(kernel, values); };
  return run_grid(grid, block, smem);
}

struct Entry {
  const char* name;
  bool (*launch)(const unsigned*, const unsigned*, unsigned, void**);
  std::string (*signature)();
};

template <auto K>
struct EntryOf;

template <class... A, void (*K)(A...)>
struct EntryOf<K> {
  static bool launch(const unsigned* g, const unsigned* b, unsigned s, void** a) { return npsa_emu::launch(K, g, b, s, a); }
  static std::string signature() { return npsa_emu::signature<A...>(); }
};

}  // namespace npsa_emu

// ---- the CUDA built-ins the kernels use

#define threadIdx (npsa_emu::L->cur->tid)
#define blockIdx (npsa_emu::L->bid)
#define blockDim (npsa_emu::L->block)
#define gridDim (npsa_emu::L->grid)
#define __syncthreads() npsa_emu::syncthreads(__FILE__, __LINE__)
#define NPSA_DECLARE_SMEM(name) unsigned char* name = npsa_emu::L->smem.data()

// ---- the primitives of kernels/npsa_ptx.cuh, emulated

typedef unsigned short u16;
typedef unsigned int u32;

namespace npsa {

struct f16;
struct bf16;

inline u32 smem_u32(const void* p) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  const unsigned char* base = npsa_emu::L->smem.data();
  if (c < base || c > base + npsa_emu::L->smem.size()) npsa_emu::fail("smem_u32: not a shared-memory pointer");
  return static_cast<u32>(c - base);
}

namespace detail {

inline u16 f16_bits(float x) {
  _Float16 h = static_cast<_Float16>(x);  // round to nearest even
  u16 b;
  std::memcpy(&b, &h, 2);
  return b;
}

inline float f16_value(u16 b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}

inline u16 bf16_bits(float x) {
  u32 u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<u16>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                                  // round to nearest even
  return static_cast<u16>(u >> 16);
}

inline float bf16_value(u16 b) { return __uint_as_float(static_cast<u32>(b) << 16); }

template <class T>
inline float element(u32 reg, int half) {
  const u16 b = static_cast<u16>(half ? reg >> 16 : reg & 0xffffu);
  if constexpr (std::is_same_v<T, f16>) return f16_value(b);
  else return bf16_value(b);
}

struct LdIn {
  u32 addr;
};
struct Regs4 {
  u32 r[4];
};

// ldmatrix .m8n8 .x4 .b16: lanes 8m..8m+7 address the rows of matrix m.
template <bool TRANS>
inline void ldmatrix_exec(const LdIn* in, Regs4* out) {
  u16 m[4][8][8];
  for (int mat = 0; mat < 4; ++mat)
    for (int row = 0; row < 8; ++row) {
      const unsigned addr = in[mat * 8 + row].addr;
      const unsigned char* p = npsa_emu::shared_at(addr, 16, 16, "ldmatrix");
      npsa_emu::on_read(addr, 16, npsa_emu::L->warp_base + mat * 8 + row, "ldmatrix");
      std::memcpy(m[mat][row], p, 16);
    }
  for (int lane = 0; lane < 32; ++lane)
    for (int mat = 0; mat < 4; ++mat) {
      const int r = lane / 4, c = 2 * (lane % 4);
      const u16 lo = TRANS ? m[mat][c][r] : m[mat][r][c];
      const u16 hi = TRANS ? m[mat][c + 1][r] : m[mat][r][c + 1];
      out[lane].r[mat] = static_cast<u32>(lo) | (static_cast<u32>(hi) << 16);
    }
}

struct MmaIn {
  u32 a[4];
  u32 b[2];
  float c[4];
};
struct MmaOut {
  float d[4];
};

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A B + C, the fragment layouts of npsa_ptx.cuh.
template <class T>
inline void mma_exec(const MmaIn* in, MmaOut* out) {
  float a[16][16], b[16][8], c[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 8; ++i) {
      const int row = g + ((i / 2) % 2) * 8;  // a0,a1,a4,a5: row g; a2,a3,a6,a7: row g+8
      const int col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
      a[row][col] = element<T>(in[lane].a[i / 2], i & 1);
    }
    for (int i = 0; i < 4; ++i) {
      const int row = 2 * t + (i & 1) + (i >= 2 ? 8 : 0);
      b[row][g] = element<T>(in[lane].b[i / 2], i & 1);
    }
    for (int i = 0; i < 4; ++i) c[g + (i >= 2 ? 8 : 0)][2 * t + (i & 1)] = in[lane].c[i];
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
      double acc = 0.0;  // products of 16-bit values are exact in double; one rounding at the end
      for (int k = 0; k < 16; ++k) acc += static_cast<double>(a[row][k]) * b[k][col];
      out[lane].d[i] = static_cast<float>(acc + c[row][col]);
    }
  }
}

struct ShflIn {
  float v;
  int mask;
};

inline void shfl_exec(const ShflIn* in, float* out) {
  for (int lane = 0; lane < 32; ++lane) {
    if (in[lane].mask != in[0].mask) npsa_emu::fail("shfl.bfly: lanes pass different lane masks");
    out[lane] = in[lane ^ (in[0].mask & 31)].v;
  }
}

}  // namespace detail

inline void ldmatrix_x4(u32 (&r)[4], u32 addr) {
  auto out = npsa_emu::warp_collective<detail::LdIn, detail::Regs4>(npsa_emu::OP_LDMATRIX_X4, detail::LdIn{addr},
                                                                    detail::ldmatrix_exec<false>);
  for (int i = 0; i < 4; ++i) r[i] = out.r[i];
}

inline void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
  auto out = npsa_emu::warp_collective<detail::LdIn, detail::Regs4>(npsa_emu::OP_LDMATRIX_X4_TRANS,
                                                                    detail::LdIn{addr}, detail::ldmatrix_exec<true>);
  for (int i = 0; i < 4; ++i) r[i] = out.r[i];
}

template <class T>
inline void mma_16816(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
  detail::MmaIn in;
  for (int i = 0; i < 4; ++i) in.a[i] = a[i], in.c[i] = d[i];
  in.b[0] = b[0], in.b[1] = b[1];
  const int op = std::is_same_v<T, f16> ? npsa_emu::OP_MMA_F16 : npsa_emu::OP_MMA_BF16;
  auto out = npsa_emu::warp_collective<detail::MmaIn, detail::MmaOut>(op, in, detail::mma_exec<T>);
  for (int i = 0; i < 4; ++i) d[i] = out.d[i];
}

inline void cp_async_16(u32 dst, const void* src, bool full) {
  npsa_emu::shared_at(dst, 16, 16, "cp.async destination");
  npsa_emu::Fiber* f = npsa_emu::L->cur;
  npsa_emu::PendingCopy c{dst, f->committed, {}};
  if (full) {
    npsa_emu::check_global(src, 16, 16, "cp.async source");
    std::memcpy(c.data, src, 16);
  }
  const bool eager = npsa_emu::L->eager_copies;
  npsa_emu::on_write(dst, 16, f->flat, "cp.async", !eager);
  if (eager) std::memcpy(npsa_emu::L->smem.data() + dst, c.data, 16);
  else f->copies.push_back(c);
}

inline void cp_async_commit() { ++npsa_emu::L->cur->committed; }

template <int N>
inline void cp_async_wait() {
  npsa_emu::Fiber* f = npsa_emu::L->cur;
  std::vector<npsa_emu::PendingCopy> still;
  for (const npsa_emu::PendingCopy& c : f->copies) {
    if (c.group < f->committed - N) {
      std::memcpy(npsa_emu::L->smem.data() + c.dst, c.data, 16);
      npsa_emu::on_landed(c.dst, 16, f->flat);
    } else {
      still.push_back(c);
    }
  }
  f->copies.swap(still);
}

template <class T>
inline u32 pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, f16>)
    return static_cast<u32>(detail::f16_bits(lo)) | (static_cast<u32>(detail::f16_bits(hi)) << 16);
  else return static_cast<u32>(detail::bf16_bits(lo)) | (static_cast<u32>(detail::bf16_bits(hi)) << 16);
}

template <class T>
inline float to_float(u16 x) {
  if constexpr (std::is_same_v<T, f16>) return detail::f16_value(x);
  else return detail::bf16_value(x);
}

inline float exp2_approx(float x) { return std::exp2(x); }

inline float shfl_xor(float v, int mask) {
  return npsa_emu::warp_collective<detail::ShflIn, float>(npsa_emu::OP_SHFL_XOR, detail::ShflIn{v, mask},
                                                          detail::shfl_exec);
}

inline void atomic_add(float* p, float v) {
  npsa_emu::check_global(p, sizeof(float), sizeof(float), "atomic_add");
  *p += v;
}

template <class V>
inline V ldg(const V* p) {
  npsa_emu::check_global(p, sizeof(V), alignof(V), "global load");
  return *p;
}

template <class V>
inline void stg(V* p, V v) {
  npsa_emu::check_global(p, sizeof(V), alignof(V), "global store");
  *p = v;
}

// The offset of a generic pointer into the dynamic shared memory, checked for range and alignment.
inline unsigned shared_offset(const void* p, size_t n, size_t align, const char* what) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  const unsigned char* base = npsa_emu::L->smem.data();
  if (c < base || c + n > base + npsa_emu::L->smem.size()) npsa_emu::fail(std::string(what) + ": address outside the shared memory");
  const unsigned addr = static_cast<unsigned>(c - base);
  if (addr % align) npsa_emu::fail(std::string(what) + ": misaligned shared address");
  return addr;
}

template <class V>
inline V lds(const void* p) {
  const unsigned addr = shared_offset(p, sizeof(V), sizeof(V), "shared load");
  npsa_emu::on_read(addr, sizeof(V), npsa_emu::L->cur->flat, "shared load");
  V v;
  std::memcpy(&v, npsa_emu::L->smem.data() + addr, sizeof(V));
  return v;
}

template <class V>
inline void sts(void* p, V v) {
  const unsigned addr = shared_offset(p, sizeof(V), sizeof(V), "shared store");
  npsa_emu::on_write(addr, sizeof(V), npsa_emu::L->cur->flat, "shared store");
  std::memcpy(npsa_emu::L->smem.data() + addr, &v, sizeof(V));
}

}  // namespace npsa
