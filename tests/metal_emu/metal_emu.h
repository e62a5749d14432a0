// CPU emulation of the subset of the Metal Shading Language that the regla
// kernels use, so that the exact kernel text handed to mx.fast.metal_kernel can be
// compiled by g++ and run on a machine without a GPU.
//
// Execution model. Every GPU thread of a threadgroup is a fiber (its own stack);
// one OS thread runs all fibers of one threadgroup at a time, several OS threads
// run different threadgroups. A fiber runs until it reaches a synchronisation
// point (threadgroup_barrier, simdgroup_barrier or any simdgroup collective:
// simd_sum, simd_shuffle*, simd_prefix_*, simdgroup_multiply_accumulate); there
// it blocks until all threads of its threadgroup (resp. all 32 lanes of its
// simdgroup) have arrived. The scheduler (run_group) runs one simdgroup at a time
// as far as it can get before the next barrier, simdgroups in a seeded random
// order, lanes in a random order: a read of threadgroup memory that is not
// separated by a barrier from another thread's write sees the other thread's
// data from the wrong phase for a random part of the thread pairs, and results
// come out wrong.
//
// A barrier or collective that is not reached by every thread that should reach
// it (divergent control flow, early return) is reported as a deadlock instead of
// hanging.
//
// Strictness (what a Metal compiler or GPU rejects or runs wrong must fail here):
// - Threadgroup memory (`threadgroup T x[N];`, rewritten by metal_emu/__init__.py
//   into EMU_TG) is a static thread_local tg_array: shared by the fibers of a
//   threadgroup, private to the OS thread. It is filled with NaN bytes (0xFF) when
//   each threadgroup first reaches its declaration: nothing initialises it on a
//   GPU either. More than 32 KB per threadgroup (Apple's limit) is a fault.
// - Default-constructed simdgroup matrices hold NaN (a GPU leaves them undefined).
// - Device and constant buffers and threadgroup arrays are reached through
//   emu::ptr, which carries the bounds of its buffer: any out-of-bounds access is
//   a fault naming the buffer, the index and the thread.
// - Address spaces are distinct types: emu::ptr<kDevice, T>, emu::ptr<kThreadgroup,
//   T> and plain (thread) T* do not convert into each other, so assigning a
//   threadgroup pointer to a plain pointer does not compile, as in Metal.
// - `double` does not compile, and unsuffixed floating literals are float
//   (-fsingle-precision-constant), as in Metal.
// A fault ends the launch with an error (EmulationError in Python).
//
// simdgroup_matrix<T,8,8> is held as two elements per lane (the fragment layout
// Apple GPUs use); multiply-accumulate gathers the fragments of all 32 lanes,
// so a lane that loads the wrong tile corrupts the other lanes' results as well.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>
#include <ucontext.h>

namespace emu {

// ------------------------------------------------------------------ vectors
template <typename T>
struct vec2 {
  T x, y;
  vec2() : x(0), y(0) {}
  vec2(T a) : x(a), y(a) {}
  vec2(T a, T b) : x(a), y(b) {}
};
template <typename T>
struct vec3 {
  T x, y, z;
  vec3() : x(0), y(0), z(0) {}
  vec3(T a) : x(a), y(a), z(a) {}
  vec3(T a, T b, T c) : x(a), y(b), z(c) {}
};
template <typename T>
struct vec4 {
  T x, y, z, w;
  vec4() : x(0), y(0), z(0), w(0) {}
  vec4(T a) : x(a), y(a), z(a), w(a) {}
  vec4(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
};

// ------------------------------------------------------------------ 16-bit floats
// Stored as bits; arithmetic happens in float (the kernels convert on load and
// on store, which is what these types are for).
inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

struct half_t {
  uint16_t bits;
  half_t() : bits(0) {}
  half_t(float f) : bits(from_float(f)) {}
  half_t(int f) : bits(from_float((float)f)) {}
  operator float() const { return to_float(bits); }
  static uint16_t from_float(float f) {
    uint32_t x = f2u(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to inf
    if (ax < 0x38800000u) {  // subnormal half (or zero)
      float a = u2f(ax);
      // 2^-24 is the half subnormal step; rint is round-half-even.
      uint32_t m = (uint32_t)std::nearbyint(a * 16777216.0f);
      return (uint16_t)(sign | m);
    }
    uint32_t e = ((ax >> 23) - 112) << 10;
    uint32_t m = ax & 0x7fffffu;
    uint32_t h = e | (m >> 13);
    uint32_t rest = m & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1;
    return (uint16_t)(sign | h);
  }
  static float to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
      float f = (float)m * (1.0f / 16777216.0f);
      return sign ? -f : f;
    }
    if (e == 31) return u2f(sign | 0x7f800000u | (m << 13));
    return u2f(sign | ((e + 112) << 23) | (m << 13));
  }
};

struct bfloat_t {
  uint16_t bits;
  bfloat_t() : bits(0) {}
  bfloat_t(float f) : bits(from_float(f)) {}
  bfloat_t(int f) : bits(from_float((float)f)) {}
  operator float() const { return u2f((uint32_t)bits << 16); }
  static uint16_t from_float(float f) {
    uint32_t x = f2u(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
    x += 0x7fffu + ((x >> 16) & 1u);  // round to nearest even
    return (uint16_t)(x >> 16);
  }
};

// ------------------------------------------------------------------ fibers
constexpr int kSimdWidth = 32;
constexpr size_t kStackBytes = 256 * 1024;

struct Attrs {
  vec3<uint32_t> thread_position_in_grid, threadgroup_position_in_grid,
      thread_position_in_threadgroup, threads_per_threadgroup, threadgroups_per_grid,
      threads_per_grid;
  uint32_t thread_index_in_threadgroup, simdgroup_index_in_threadgroup,
      thread_index_in_simdgroup, simdgroups_per_threadgroup, quadgroup_index_in_threadgroup,
      thread_index_in_quadgroup, quadgroups_per_threadgroup;
};

struct Group;

struct Fiber {
  jmp_buf ctx;
  ucontext_t uctx;
  char* stack = nullptr;
  bool started = false, done = false;
  // What the fiber waits for: 0 nothing, 1 threadgroup barrier, 2 simdgroup sync.
  int waiting = 0;
  uint64_t wait_gen = 0;
  Attrs a;
  Group* group = nullptr;
};

struct SimdState {
  int size = 0;     // lanes in this simdgroup
  int arrived = 0;
  uint64_t gen = 0;
  // Exchange area for collectives: 32 lanes x 16 bytes for scalars, three
  // 8x8 float matrices for simdgroup_matrix products.
  alignas(16) unsigned char slot[kSimdWidth][16];
  float mat[3][64];
};

struct Group {
  std::vector<Fiber> fibers;
  std::vector<SimdState> simd;
  int n = 0, live = 0, tg_arrived = 0;
  uint64_t tg_gen = 0;
  jmp_buf sched;
  std::function<void(const Attrs&)>* body = nullptr;
  Fiber* current = nullptr;
  std::string error;
  bool faulted = false;
};

inline thread_local Group* tl_group = nullptr;
// Threadgroup counter of this OS thread (threadgroup memory is poisoned once per
// threadgroup) and the threadgroup memory the running threadgroup has declared.
inline thread_local uint64_t tl_epoch = 0;
inline thread_local size_t tl_tg_bytes = 0;
constexpr size_t kMaxThreadgroupBytes = 32768;  // Apple GPUs (maxThreadgroupMemoryLength)
constexpr uint32_t kMaxThreadsPerThreadgroup = 1024;

inline Fiber& self() { return *tl_group->current; }

// A kernel bug that a GPU would not survive (or a Metal compiler would reject):
// thrown in a fiber, caught in fiber_entry, ends the launch with this message.
struct Fault {
  std::string msg;
};

[[noreturn]] inline void fault(const std::string& what) {
  std::ostringstream os;
  os << what;
  if (tl_group && tl_group->current) {
    const Attrs& a = tl_group->current->a;
    os << " (thread " << a.thread_index_in_threadgroup << " of threadgroup (" << a.threadgroup_position_in_grid.x
       << ", " << a.threadgroup_position_in_grid.y << ", " << a.threadgroup_position_in_grid.z << "))";
  }
  throw Fault{os.str()};
}

// Switch from the running fiber back to the scheduler.
inline void yield_to_scheduler() {
  Fiber& f = self();
  if (_setjmp(f.ctx) == 0) _longjmp(f.group->sched, 1);
}

inline void fiber_entry() {
  Group* g = tl_group;
  Fiber* f = g->current;
  try {
    (*g->body)(f->a);
  } catch (const Fault& e) {
    if (!tl_group->faulted) {
      tl_group->faulted = true;
      tl_group->error = e.msg;
    }
  }
  f = tl_group->current;
  f->done = true;
  tl_group->live--;
  _longjmp(tl_group->sched, 1);
}

inline void threadgroup_sync() {
  Fiber& f = self();
  Group& g = *f.group;
  uint64_t gen = g.tg_gen;
  f.waiting = 1;
  f.wait_gen = gen;
  if (++g.tg_arrived == g.n) {
    g.tg_arrived = 0;
    g.tg_gen++;
  }
  // Always yield, also as the last arriving thread, so that the order in which
  // threads leave a barrier is the scheduler's permutation again.
  yield_to_scheduler();
}

inline void simd_sync() {
  Fiber& f = self();
  Group& g = *f.group;
  SimdState& s = g.simd[f.a.simdgroup_index_in_threadgroup];
  f.waiting = 2;
  f.wait_gen = s.gen;
  if (++s.arrived == s.size) {
    s.arrived = 0;
    s.gen++;
  }
  yield_to_scheduler();
}

inline bool runnable(const Fiber& f) {
  if (f.done) return false;
  if (f.waiting == 0) return true;
  if (f.waiting == 1) return f.group->tg_gen > f.wait_gen;
  return f.group->simd[f.a.simdgroup_index_in_threadgroup].gen > f.wait_gen;
}

// Runs one threadgroup to completion. Returns false (with g.error set) on deadlock.
//
// Simdgroups are run one after the other, in a random order that changes at
// every pass: the chosen simdgroup's lanes (in random order) are resumed until
// every one of them waits at a threadgroup barrier or has finished, and only
// then does the next simdgroup start. So between two barriers one simdgroup may
// be a whole phase ahead of another, the worst case that hardware allows, and a
// missing threadgroup barrier lets a reader see data from before (or after) the
// phase it expects. Lanes of one simdgroup interleave at every simdgroup
// collective.
inline bool run_group(Group& g, std::mt19937& rng) {
  tl_group = &g;
  g.live = g.n;
  g.tg_arrived = 0;
  for (auto& s : g.simd) s.arrived = 0;
  int nsimd = (int)g.simd.size();
  std::vector<int> sorder(nsimd);
  for (int s = 0; s < nsimd; ++s) sorder[s] = s;
  std::vector<int> lanes;
  while (g.live > 0) {
    std::shuffle(sorder.begin(), sorder.end(), rng);
    bool any = false;
    for (int s : sorder) {
      int first = s * kSimdWidth, n = g.simd[s].size;
      lanes.resize(n);
      for (int l = 0; l < n; ++l) lanes[l] = first + l;
      for (;;) {
        std::shuffle(lanes.begin(), lanes.end(), rng);
        bool progressed = false;
        for (int idx : lanes) {
          Fiber& f = g.fibers[idx];
          if (!runnable(f)) continue;
          progressed = true;
          f.waiting = 0;
          g.current = &f;
          if (_setjmp(g.sched) == 0) {
            if (!f.started) {
              f.started = true;
              ucontext_t here;
              swapcontext(&here, &f.uctx);
            } else {
              _longjmp(f.ctx, 1);
            }
          }
          if (g.faulted) return false;
        }
        if (!progressed) break;
        any = true;
      }
    }
    if (!any) {
      int at_tg = 0, at_simd = 0, fin = 0;
      for (auto& f : g.fibers) {
        if (f.done) fin++;
        else if (f.waiting == 1) at_tg++;
        else if (f.waiting == 2) at_simd++;
      }
      g.error = "deadlock: " + std::to_string(at_tg) + " threads wait at a threadgroup barrier, " +
                std::to_string(at_simd) + " at a simdgroup operation, " + std::to_string(fin) +
                " finished (a barrier or collective is not reached by all threads)";
      return false;
    }
  }
  return true;
}

struct Launch {
  uint32_t grid[3], tg[3];
  unsigned seed;
  int workers;
};

inline int launch(const Launch& L, std::function<void(const Attrs&)> body, char* err, int errlen) {
  uint32_t tg[3], ngroups[3];
  for (int d = 0; d < 3; ++d) {
    tg[d] = std::min(L.tg[d], L.grid[d]);  // as MLX does before dispatch_threads
    if (tg[d] == 0) return 0;
    ngroups[d] = (L.grid[d] + tg[d] - 1) / tg[d];
  }
  if ((uint64_t)tg[0] * tg[1] * tg[2] > kMaxThreadsPerThreadgroup) {
    std::snprintf(err, errlen, "threadgroup of %u x %u x %u threads: Metal allows at most %u", tg[0], tg[1], tg[2],
                  kMaxThreadsPerThreadgroup);
    return 1;
  }
  uint64_t total = (uint64_t)ngroups[0] * ngroups[1] * ngroups[2];
  std::atomic<uint64_t> next{0};
  std::atomic<int> failed{0};
  std::string first_error;
  std::atomic_flag err_lock = ATOMIC_FLAG_INIT;

  auto worker = [&](int wid) {
    Group g;
    g.body = &body;
    std::vector<char*> stacks;
    std::mt19937 rng(L.seed * 7919u + (unsigned)wid);
    while (!failed.load()) {
      uint64_t gid = next.fetch_add(1);
      if (gid >= total) break;
      uint32_t gx = gid % ngroups[0], gy = (gid / ngroups[0]) % ngroups[1],
               gz = gid / ((uint64_t)ngroups[0] * ngroups[1]);
      // Threads of a partial threadgroup beyond the grid do not exist
      // (dispatch_threads semantics).
      uint32_t ex = std::min(tg[0], L.grid[0] - gx * tg[0]);
      uint32_t ey = std::min(tg[1], L.grid[1] - gy * tg[1]);
      uint32_t ez = std::min(tg[2], L.grid[2] - gz * tg[2]);
      int n = (int)(ex * ey * ez);
      g.n = n;
      g.faulted = false;
      g.error.clear();
      g.tg_gen = 0;
      tl_epoch++;
      tl_tg_bytes = 0;
      g.fibers.assign(n, Fiber());
      while ((int)stacks.size() < n) stacks.push_back((char*)std::malloc(kStackBytes));
      int nsimd = (n + kSimdWidth - 1) / kSimdWidth;
      g.simd.assign(nsimd, SimdState());
      for (int s = 0; s < nsimd; ++s) g.simd[s].size = std::min(kSimdWidth, n - s * kSimdWidth);
      int i = 0;
      for (uint32_t z = 0; z < ez; ++z)
        for (uint32_t y = 0; y < ey; ++y)
          for (uint32_t x = 0; x < ex; ++x, ++i) {
            Fiber& f = g.fibers[i];
            f.group = &g;
            f.stack = stacks[i];
            Attrs& a = f.a;
            a.thread_position_in_threadgroup = {x, y, z};
            a.threadgroup_position_in_grid = {gx, gy, gz};
            a.thread_position_in_grid = {gx * tg[0] + x, gy * tg[1] + y, gz * tg[2] + z};
            a.threads_per_threadgroup = {ex, ey, ez};
            a.threadgroups_per_grid = {ngroups[0], ngroups[1], ngroups[2]};
            a.threads_per_grid = {L.grid[0], L.grid[1], L.grid[2]};
            uint32_t lin = x + y * ex + z * ex * ey;
            a.thread_index_in_threadgroup = lin;
            a.simdgroup_index_in_threadgroup = lin / kSimdWidth;
            a.thread_index_in_simdgroup = lin % kSimdWidth;
            a.simdgroups_per_threadgroup = (uint32_t)nsimd;
            a.quadgroup_index_in_threadgroup = lin / 4;
            a.thread_index_in_quadgroup = lin % 4;
            a.quadgroups_per_threadgroup = (uint32_t)((n + 3) / 4);
            getcontext(&f.uctx);
            f.uctx.uc_stack.ss_sp = f.stack;
            f.uctx.uc_stack.ss_size = kStackBytes;
            f.uctx.uc_link = nullptr;
            makecontext(&f.uctx, (void (*)())fiber_entry, 0);
          }
      if (!run_group(g, rng)) {
        if (!err_lock.test_and_set()) first_error = g.error;
        failed.store(1);
      }
    }
    for (char* s : stacks) std::free(s);
  };
  int nw = std::max(1, std::min<int>(L.workers, (int)total));
  std::vector<std::thread> pool;
  for (int w = 1; w < nw; ++w) pool.emplace_back(worker, w);
  worker(0);
  for (auto& t : pool) t.join();
  if (failed.load()) {
    std::snprintf(err, errlen, "%s", first_error.c_str());
    return 1;
  }
  return 0;
}

// ------------------------------------------------------------------ simd collectives
inline int lane() { return (int)self().a.thread_index_in_simdgroup; }
inline SimdState& my_simd() { Fiber& f = self(); return f.group->simd[f.a.simdgroup_index_in_threadgroup]; }

template <typename T>
inline void put(T x) {
  static_assert(sizeof(T) <= 16, "simd collectives are emulated for types up to 16 bytes");
  std::memcpy(my_simd().slot[lane()], &x, sizeof(T));
}
template <typename T>
inline T get(int l) { T x; std::memcpy(&x, my_simd().slot[l], sizeof(T)); return x; }

// Tree order of a butterfly reduction (xor 1,2,4,8,16), which is how the
// hardware reduction combines lanes.
template <typename T>
inline T simd_reduce_sum(T x) {
  put(x);
  simd_sync();
  int n = my_simd().size;
  T v[kSimdWidth];
  for (int l = 0; l < n; ++l) v[l] = get<T>(l);
  for (int l = n; l < kSimdWidth; ++l) v[l] = T(0);
  for (int w = 1; w < kSimdWidth; w <<= 1)
    for (int l = 0; l < kSimdWidth; l += 2 * w) v[l] = v[l] + v[l + w];
  simd_sync();
  return v[0];
}

// ------------------------------------------------------------------ address spaces
enum Space : int { kDevice = 0, kThreadgroup = 1, kConstant = 2 };
inline const char* space_name(Space s) {
  return s == kDevice ? "device" : s == kThreadgroup ? "threadgroup" : "constant";
}

template <typename I>
using if_integral = std::enable_if_t<std::is_integral_v<I>, int>;

// A pointer into one buffer of address space S. It converts to nothing but the
// same space with const added, so mixing address spaces does not compile; every
// dereference is checked against the buffer's bounds.
template <Space S, typename T>
struct ptr {
  static constexpr int space = S;
  T* p = nullptr;
  T* lo = nullptr;
  T* hi = nullptr;
  const char* name = "?";

  ptr() = default;
  ptr(T* p_, T* lo_, T* hi_, const char* n) : p(p_), lo(lo_), hi(hi_), name(n) {}
  template <typename U, typename = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  ptr(const ptr<S, U>& o) : p(o.p), lo(o.lo), hi(o.hi), name(o.name) {}

  [[noreturn]] void out_of_bounds(std::ptrdiff_t i) const {
    std::ostringstream os;
    os << "out-of-bounds " << space_name(S) << " access: " << name << "[" << (p - lo) + i << "], buffer of "
       << (hi - lo) << " elements";
    fault(os.str());
  }
  T& at(std::ptrdiff_t i) const {
    if (p + i < lo || p + i >= hi) out_of_bounds(i);
    return p[i];
  }
  template <typename I, if_integral<I> = 0>
  T& operator[](I i) const { return at((std::ptrdiff_t)i); }
  T& operator*() const { return at(0); }
  T* operator->() const { return &at(0); }
  template <typename I, if_integral<I> = 0>
  ptr operator+(I i) const { return ptr(p + (std::ptrdiff_t)i, lo, hi, name); }
  template <typename I, if_integral<I> = 0>
  ptr operator-(I i) const { return ptr(p - (std::ptrdiff_t)i, lo, hi, name); }
  template <typename I, if_integral<I> = 0>
  ptr& operator+=(I i) { p += (std::ptrdiff_t)i; return *this; }
  template <typename I, if_integral<I> = 0>
  ptr& operator-=(I i) { p -= (std::ptrdiff_t)i; return *this; }
  ptr& operator++() { ++p; return *this; }
  ptr& operator--() { --p; return *this; }
  ptr operator++(int) { ptr r = *this; ++p; return r; }
  ptr operator--(int) { ptr r = *this; --p; return r; }
  std::ptrdiff_t operator-(const ptr& o) const { return p - o.p; }
  bool operator==(const ptr& o) const { return p == o.p; }
  bool operator!=(const ptr& o) const { return p != o.p; }
  bool operator<(const ptr& o) const { return p < o.p; }
};
template <Space S, typename T, typename I, if_integral<I> = 0>
inline ptr<S, T> operator+(I i, const ptr<S, T>& q) { return q + i; }

// A kernel argument buffer of n elements.
template <Space S, typename T>
inline ptr<S, T> buffer(void* data, size_t n, const char* name) {
  T* p = static_cast<T*>(data);
  return ptr<S, T>(p, p, p + n, name);
}

// `threadgroup T name[N];`: one array per OS thread, shared by the fibers of the
// threadgroup it runs, poisoned when a threadgroup first reaches the declaration.
template <typename T, size_t N>
struct tg_array {
  alignas(16) T data[N];
  uint64_t epoch = 0;
  const char* name;
  explicit tg_array(const char* n) : name(n) {}
  ptr<kThreadgroup, T> decay() { return ptr<kThreadgroup, T>(data, data, data + N, name); }
  operator ptr<kThreadgroup, T>() { return decay(); }
  operator ptr<kThreadgroup, const T>() { return decay(); }
  template <typename I, if_integral<I> = 0>
  T& operator[](I i) { return decay().at((std::ptrdiff_t)i); }
  template <typename I, if_integral<I> = 0>
  ptr<kThreadgroup, T> operator+(I i) { return decay() + i; }
  template <typename I, if_integral<I> = 0>
  ptr<kThreadgroup, T> operator-(I i) { return decay() - i; }
};

template <typename A>
inline A& tg_use(A& a) {
  if (a.epoch != tl_epoch) {
    a.epoch = tl_epoch;
    std::memset((void*)a.data, 0xFF, sizeof(a.data));  // NaN in every float format
    tl_tg_bytes += sizeof(a.data);
    if (tl_tg_bytes > kMaxThreadgroupBytes) {
      fault("threadgroup memory: " + std::to_string(tl_tg_bytes) + " bytes declared (with '" + a.name +
            "'), Apple GPUs allow " + std::to_string(kMaxThreadgroupBytes));
    }
  }
  return a;
}

}  // namespace emu

#define EMU_TG(T, name, N)                                   \
  static thread_local emu::tg_array<T, (N)> name##__emu(#name); \
  auto& name = emu::tg_use(name##__emu)

// ================================================================== Metal names
namespace metal {
using uint = unsigned int;
using ushort = unsigned short;
using uchar = unsigned char;
using ulong = unsigned long;
using half = emu::half_t;
using bfloat = emu::bfloat_t;
using uint2 = emu::vec2<uint32_t>;
using uint3 = emu::vec3<uint32_t>;
using uint4 = emu::vec4<uint32_t>;
using int2 = emu::vec2<int32_t>;
using int3 = emu::vec3<int32_t>;
using ulong2 = emu::vec2<unsigned long>;
using float2 = emu::vec2<float>;
using float3 = emu::vec3<float>;
using float4 = emu::vec4<float>;

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags((int)a | (int)b); }

inline void threadgroup_barrier(mem_flags) { emu::threadgroup_sync(); }
inline void simdgroup_barrier(mem_flags) { emu::simd_sync(); }

inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
inline float log(float x) { return std::log(x); }
inline float sqrt(float x) { return std::sqrt(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float abs(float x) { return std::fabs(x); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
template <typename T> inline T max(T a, T b) { return a > b ? a : b; }
template <typename T> inline T min(T a, T b) { return a < b ? a : b; }
namespace fast {
inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
}  // namespace fast
namespace precise {
inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
}  // namespace precise

template <typename T> inline T simd_sum(T x) { return emu::simd_reduce_sum(x); }

template <typename T> inline T simd_shuffle(T x, unsigned short src) {
  emu::put(x);
  emu::simd_sync();
  T r = emu::get<T>(src % emu::my_simd().size);
  emu::simd_sync();
  return r;
}
template <typename T> inline T simd_shuffle_xor(T x, unsigned short mask) {
  emu::put(x);
  emu::simd_sync();
  int s = emu::lane() ^ mask;
  T r = s < emu::my_simd().size ? emu::get<T>(s) : x;
  emu::simd_sync();
  return r;
}
template <typename T> inline T simd_shuffle_down(T x, unsigned short d) {
  emu::put(x);
  emu::simd_sync();
  int s = emu::lane() + d;
  T r = s < emu::my_simd().size ? emu::get<T>(s) : x;
  emu::simd_sync();
  return r;
}
template <typename T> inline T simd_shuffle_up(T x, unsigned short d) {
  emu::put(x);
  emu::simd_sync();
  int s = emu::lane() - (int)d;
  T r = s >= 0 ? emu::get<T>(s) : x;
  emu::simd_sync();
  return r;
}
template <typename T> inline T simd_broadcast(T x, unsigned short src) { return simd_shuffle(x, src); }
template <typename T> inline T simd_prefix_inclusive_sum(T x) {
  emu::put(x);
  emu::simd_sync();
  T r = T(0);
  for (int l = 0; l <= emu::lane(); ++l) r = r + emu::get<T>(l);
  emu::simd_sync();
  return r;
}
template <typename T> inline T simd_prefix_exclusive_sum(T x) {
  emu::put(x);
  emu::simd_sync();
  T r = T(0);
  for (int l = 0; l < emu::lane(); ++l) r = r + emu::get<T>(l);
  emu::simd_sync();
  return r;
}
template <typename T> inline T simd_max(T x) {
  emu::put(x);
  emu::simd_sync();
  T r = emu::get<T>(0);
  for (int l = 1; l < emu::my_simd().size; ++l) r = max(r, emu::get<T>(l));
  emu::simd_sync();
  return r;
}

// ------------------------------------------------------------------ simdgroup_matrix
// Lane l holds row ((l>>4)&1)*4 + ((l>>1)&3), columns c and c+1 with
// c = ((l>>3)&1)*4 + (l&1)*2.
inline int frag_row(int l) { return ((l >> 4) & 1) * 4 + ((l >> 1) & 3); }
inline int frag_col(int l) { return ((l >> 3) & 1) * 4 + (l & 1) * 2; }

template <typename T, int R, int C>
struct simdgroup_matrix {
  static_assert(R == 8 && C == 8, "only 8x8 simdgroup matrices are emulated");
  T e[2];
  // Undefined on a GPU until loaded or filled: NaN here, so use before load shows.
  simdgroup_matrix() : e{T(std::numeric_limits<float>::quiet_NaN()), T(std::numeric_limits<float>::quiet_NaN())} {}
  emu::vec2<T> thread_elements() const { return emu::vec2<T>(e[0], e[1]); }
};
using simdgroup_float8x8 = simdgroup_matrix<float, 8, 8>;
using simdgroup_half8x8 = simdgroup_matrix<half, 8, 8>;
using simdgroup_bfloat8x8 = simdgroup_matrix<bfloat, 8, 8>;

template <typename T, int R, int C>
inline simdgroup_matrix<T, R, C> make_filled_simdgroup_matrix(T v) {
  simdgroup_matrix<T, R, C> m;
  m.e[0] = v;
  m.e[1] = v;
  return m;
}

inline void require_full_simdgroup() {
  if (emu::my_simd().size != emu::kSimdWidth) {
    emu::fault("simdgroup_matrix operation in a simdgroup of " + std::to_string(emu::my_simd().size) + " lanes");
  }
}

// src points at the tile's (0,0) element plus origin (x = column, y = row);
// with transpose the tile is read column-major. As in Metal, only device or
// threadgroup memory of the matrix's own element type can be loaded or stored.
template <typename T, typename P>
inline void simdgroup_load_(simdgroup_matrix<T, 8, 8>& m, const P& src, unsigned long elements_per_row,
                            ulong2 origin, bool transpose) {
  static_assert(P::space != emu::kConstant, "simdgroup_load takes device or threadgroup memory");
  int l = emu::lane(), r = frag_row(l), c = frag_col(l);
  for (int i = 0; i < 2; ++i) {
    // Tile element (r, c+i) comes from source element (row, col) below.
    unsigned long row = origin.y + (unsigned long)(transpose ? c + i : r);
    unsigned long col = origin.x + (unsigned long)(transpose ? r : c + i);
    m.e[i] = src[row * elements_per_row + col];
  }
}
template <typename T, typename P>
inline void simdgroup_store_(const simdgroup_matrix<T, 8, 8>& m, const P& dst, unsigned long elements_per_row,
                             ulong2 origin, bool transpose) {
  static_assert(P::space != emu::kConstant, "simdgroup_store takes device or threadgroup memory");
  int l = emu::lane(), r = frag_row(l), c = frag_col(l);
  for (int i = 0; i < 2; ++i) {
    if (transpose)
      dst[(origin.y + (unsigned long)(c + i)) * elements_per_row + origin.x + (unsigned long)r] = m.e[i];
    else
      dst[(origin.y + (unsigned long)r) * elements_per_row + origin.x + (unsigned long)(c + i)] = m.e[i];
  }
}
template <typename T, emu::Space S>
inline void simdgroup_load(simdgroup_matrix<T, 8, 8>& m, emu::ptr<S, const T> src, unsigned long elements_per_row = 8,
                           ulong2 origin = ulong2(0, 0), bool transpose = false) {
  simdgroup_load_(m, src, elements_per_row, origin, transpose);
}
template <typename T, emu::Space S>
inline void simdgroup_load(simdgroup_matrix<T, 8, 8>& m, emu::ptr<S, T> src, unsigned long elements_per_row = 8,
                           ulong2 origin = ulong2(0, 0), bool transpose = false) {
  simdgroup_load_(m, src, elements_per_row, origin, transpose);
}
template <typename T, size_t N>
inline void simdgroup_load(simdgroup_matrix<T, 8, 8>& m, emu::tg_array<T, N>& src, unsigned long elements_per_row = 8,
                           ulong2 origin = ulong2(0, 0), bool transpose = false) {
  simdgroup_load_(m, src.decay(), elements_per_row, origin, transpose);
}
template <typename T, emu::Space S>
inline void simdgroup_store(const simdgroup_matrix<T, 8, 8>& m, emu::ptr<S, T> dst, unsigned long elements_per_row = 8,
                            ulong2 origin = ulong2(0, 0), bool transpose = false) {
  simdgroup_store_(m, dst, elements_per_row, origin, transpose);
}
template <typename T, size_t N>
inline void simdgroup_store(const simdgroup_matrix<T, 8, 8>& m, emu::tg_array<T, N>& dst,
                            unsigned long elements_per_row = 8, ulong2 origin = ulong2(0, 0), bool transpose = false) {
  simdgroup_store_(m, dst.decay(), elements_per_row, origin, transpose);
}


// d = a * b + c, computed from the fragments of all 32 lanes.
template <typename T>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<T, 8, 8>& a,
                                          const simdgroup_matrix<T, 8, 8>& b,
                                          const simdgroup_matrix<T, 8, 8>& c) {
  require_full_simdgroup();
  emu::SimdState& s = emu::my_simd();
  int l = emu::lane(), r = frag_row(l), cc = frag_col(l);
  for (int i = 0; i < 2; ++i) {
    s.mat[0][r * 8 + cc + i] = static_cast<float>(a.e[i]);
    s.mat[1][r * 8 + cc + i] = static_cast<float>(b.e[i]);
    s.mat[2][r * 8 + cc + i] = static_cast<float>(c.e[i]);
  }
  emu::simd_sync();
  T out[2];
  for (int i = 0; i < 2; ++i) {
    float acc = (float)s.mat[2][r * 8 + cc + i];
    for (int k = 0; k < 8; ++k) acc = std::fma((float)s.mat[0][r * 8 + k], (float)s.mat[1][k * 8 + cc + i], acc);
    out[i] = T(acc);
  }
  emu::simd_sync();
  d.e[0] = out[0];
  d.e[1] = out[1];
}

template <typename T>
inline void simdgroup_multiply(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<T, 8, 8>& a,
                               const simdgroup_matrix<T, 8, 8>& b) {
  simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<T, 8, 8>(T(0)));
}

}  // namespace metal

using namespace metal;

// MLX's type names for dtypes (get_type_string) and the names its utils header
// defines.
using float16_t = metal::half;
using bfloat16_t = metal::bfloat;

// Address spaces. metal_emu/__init__.py rewrites `device T*`, `threadgroup T*`
// and `constant T*` into emu::ptr, `const constant T&` into `const T&`, and
// `threadgroup T name[N];` into EMU_TG. Whatever it leaves (forms it does not
// know) must not compile silently; `thread` is the default address space.
#define device EMU_ERROR_unsupported_use_of_device_address_space
#define constant EMU_ERROR_unsupported_use_of_constant_address_space
#define threadgroup EMU_ERROR_unsupported_use_of_threadgroup_address_space
#define thread
#define double EMU_ERROR_double_is_not_a_Metal_type
#define METAL_FUNC inline
