// Shared by the emulator runtime (runtime.cpp, compiled once) and every kernel
// translation unit (through metal_emu.h): plain types and the runtime's interface.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

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

// ------------------------------------------------------------------ launch
constexpr int kSimdWidth = 32;
constexpr size_t kMaxThreadgroupBytes = 32768;  // Apple GPUs (maxThreadgroupMemoryLength)
constexpr uint32_t kMaxThreadsPerThreadgroup = 1024;

struct Attrs {
  vec3<uint32_t> thread_position_in_grid, threadgroup_position_in_grid,
      thread_position_in_threadgroup, threads_per_threadgroup, threadgroups_per_grid,
      threads_per_grid;
  uint32_t thread_index_in_threadgroup, simdgroup_index_in_threadgroup,
      thread_index_in_simdgroup, simdgroups_per_threadgroup, quadgroup_index_in_threadgroup,
      thread_index_in_quadgroup, quadgroups_per_threadgroup;
};

// The kernel, called once per GPU thread.
using Body = void (*)(void* ctx, const Attrs& a);

// Runs the grid (dispatch_threads semantics); 0, or 1 with a message in err.
int launch(const unsigned* grid, const unsigned* tg, unsigned seed, int workers, Body body, void* ctx, char* err,
           int errlen);

// For the running GPU thread (fiber):
const Attrs& attrs();
int simd_size();                       // lanes of its simdgroup
void threadgroup_sync();               // threadgroup_barrier
void simd_sync();                      // simdgroup_barrier and the collectives' exchanges
unsigned char* simd_slot(int lane);    // 16 bytes per lane of its simdgroup
float* simd_mat(int which);            // three 8x8 matrices of its simdgroup
[[noreturn]] void fault(const char* what);  // ends the launch with this message
uint64_t tg_epoch();                   // changes with every threadgroup an OS thread runs
void tg_declare(size_t bytes, const char* name);  // threadgroup memory in use (faults past 32 KB)

}  // namespace emu
