// The emulator's runtime: fibers, the scheduler and the launch loop. Compiled
// once into a shared library that every kernel library links to (metal_emu/__init__.py),
// so that a kernel's translation unit is only its text and the light metal_emu.h.
#include <algorithm>
#include <atomic>
#include <csetjmp>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>
#include <ucontext.h>

#include "emu_core.h"

namespace emu {

constexpr size_t kStackBytes = 256 * 1024;

// A small generator for the interleaving (splitmix64): only the order of
// threads depends on it, reproducibly for a seed.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  void shuffle(std::vector<int>& v) {
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[next() % i]);
  }
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
  Body body = nullptr;
  void* ctx = nullptr;
  Fiber* current = nullptr;
  std::string error;
  bool faulted = false;
};

thread_local Group* tl_group = nullptr;
// Threadgroup counter of this OS thread (threadgroup memory is poisoned once per
// threadgroup) and the threadgroup memory the running threadgroup has declared.
thread_local uint64_t tl_epoch = 0;
thread_local size_t tl_tg_bytes = 0;

static Fiber& self() { return *tl_group->current; }

// A kernel bug that a GPU would not survive (or a Metal compiler would reject):
// thrown in a fiber, caught in fiber_entry, ends the launch with this message.
struct Fault {
  std::string msg;
};

// Switch from the running fiber back to the scheduler.
static void yield_to_scheduler() {
  Fiber& f = self();
  if (_setjmp(f.ctx) == 0) _longjmp(f.group->sched, 1);
}

static void fiber_entry() {
  Group* g = tl_group;
  Fiber* f = g->current;
  try {
    g->body(g->ctx, f->a);
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

static void threadgroup_sync_() {
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

static void simd_sync_() {
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

static bool runnable(const Fiber& f) {
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
static bool run_group(Group& g, Rng& rng) {
  tl_group = &g;
  g.live = g.n;
  g.tg_arrived = 0;
  for (auto& s : g.simd) s.arrived = 0;
  int nsimd = (int)g.simd.size();
  std::vector<int> sorder(nsimd);
  for (int s = 0; s < nsimd; ++s) sorder[s] = s;
  std::vector<int> lanes;
  while (g.live > 0) {
    rng.shuffle(sorder);
    bool any = false;
    for (int s : sorder) {
      int first = s * kSimdWidth, n = g.simd[s].size;
      lanes.resize(n);
      for (int l = 0; l < n; ++l) lanes[l] = first + l;
      for (;;) {
        rng.shuffle(lanes);
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

int launch(const unsigned* grid, const unsigned* tgs, unsigned seed, int workers, Body body, void* ctx, char* err,
           int errlen) {
  uint32_t tg[3], ngroups[3];
  for (int d = 0; d < 3; ++d) {
    tg[d] = std::min(tgs[d], grid[d]);  // as MLX does before dispatch_threads
    if (tg[d] == 0) return 0;
    ngroups[d] = (grid[d] + tg[d] - 1) / tg[d];
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
    g.body = body;
    g.ctx = ctx;
    std::vector<char*> stacks;
    Rng rng(seed * 7919u + (unsigned)wid);
    while (!failed.load()) {
      uint64_t gid = next.fetch_add(1);
      if (gid >= total) break;
      uint32_t gx = gid % ngroups[0], gy = (gid / ngroups[0]) % ngroups[1],
               gz = gid / ((uint64_t)ngroups[0] * ngroups[1]);
      // Threads of a partial threadgroup beyond the grid do not exist
      // (dispatch_threads semantics).
      uint32_t ex = std::min(tg[0], grid[0] - gx * tg[0]);
      uint32_t ey = std::min(tg[1], grid[1] - gy * tg[1]);
      uint32_t ez = std::min(tg[2], grid[2] - gz * tg[2]);
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
            a.threads_per_grid = {grid[0], grid[1], grid[2]};
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
  int nw = std::max(1, std::min<int>(workers, (int)total));
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


// ------------------------------------------------------------------ the running fiber
const Attrs& attrs() { return self().a; }
static SimdState& my_simd() { Fiber& f = self(); return f.group->simd[f.a.simdgroup_index_in_threadgroup]; }
int simd_size() { return my_simd().size; }
unsigned char* simd_slot(int lane) { return my_simd().slot[lane]; }
float* simd_mat(int which) { return my_simd().mat[which]; }
void threadgroup_sync() { threadgroup_sync_(); }
void simd_sync() { simd_sync_(); }

void fault(const char* what) {
  std::string msg = what;
  if (tl_group && tl_group->current) {
    const Attrs& a = tl_group->current->a;
    msg += " (thread " + std::to_string(a.thread_index_in_threadgroup) + " of threadgroup (" +
           std::to_string(a.threadgroup_position_in_grid.x) + ", " + std::to_string(a.threadgroup_position_in_grid.y) +
           ", " + std::to_string(a.threadgroup_position_in_grid.z) + "))";
  }
  throw Fault{msg};
}

uint64_t tg_epoch() { return tl_epoch; }

void tg_declare(size_t bytes, const char* name) {
  tl_tg_bytes += bytes;
  if (tl_tg_bytes > kMaxThreadgroupBytes) {
    std::string msg = "threadgroup memory: " + std::to_string(tl_tg_bytes) + " bytes declared (with '" + name +
                      "'), Apple GPUs allow " + std::to_string(kMaxThreadgroupBytes);
    fault(msg.c_str());
  }
}

}  // namespace emu
