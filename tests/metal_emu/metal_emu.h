// CPU emulation of the subset of the Metal Shading Language that the regla
// kernels use, so that the exact kernel text handed to mx.fast.metal_kernel can be
// compiled by g++ and run on a machine without a GPU.
//
// The runtime (fibers, scheduler, launch loop) is in runtime.cpp, compiled once;
// this header is what a kernel's translation unit includes.
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

#include <cmath>
#include <cstdio>
#include <limits>
#include <type_traits>

#include "emu_core.h"

namespace emu {

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

// ------------------------------------------------------------------ simd collectives
inline int lane() { return (int)attrs().thread_index_in_simdgroup; }

template <typename T>
inline void put(T x) {
  static_assert(sizeof(T) <= 16, "simd collectives are emulated for types up to 16 bytes");
  std::memcpy(simd_slot(lane()), &x, sizeof(T));
}
template <typename T>
inline T get(int l) { T x; std::memcpy(&x, simd_slot(l), sizeof(T)); return x; }

// Tree order of a butterfly reduction (xor 1,2,4,8,16), which is how the
// hardware reduction combines lanes.
template <typename T>
inline T simd_reduce_sum(T x) {
  put(x);
  simd_sync();
  int n = simd_size();
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
    char msg[256];
    std::snprintf(msg, sizeof msg, "out-of-bounds %s access: %s[%td], buffer of %td elements", space_name(S), name,
                  (p - lo) + i, hi - lo);
    fault(msg);
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
  if (a.epoch != tg_epoch()) {
    a.epoch = tg_epoch();
    std::memset((void*)a.data, 0xFF, sizeof(a.data));  // NaN in every float format
    tg_declare(sizeof(a.data), a.name);
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
  T r = emu::get<T>(src % emu::simd_size());
  emu::simd_sync();
  return r;
}
template <typename T> inline T simd_shuffle_xor(T x, unsigned short mask) {
  emu::put(x);
  emu::simd_sync();
  int s = emu::lane() ^ mask;
  T r = s < emu::simd_size() ? emu::get<T>(s) : x;
  emu::simd_sync();
  return r;
}
template <typename T> inline T simd_shuffle_down(T x, unsigned short d) {
  emu::put(x);
  emu::simd_sync();
  int s = emu::lane() + d;
  T r = s < emu::simd_size() ? emu::get<T>(s) : x;
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
  for (int l = 1; l < emu::simd_size(); ++l) r = max(r, emu::get<T>(l));
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
  if (emu::simd_size() != emu::kSimdWidth) emu::fault("simdgroup_matrix operation in a partial simdgroup");
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
  float* ma = emu::simd_mat(0);
  float* mb = emu::simd_mat(1);
  float* mc = emu::simd_mat(2);
  int l = emu::lane(), r = frag_row(l), cc = frag_col(l);
  for (int i = 0; i < 2; ++i) {
    ma[r * 8 + cc + i] = static_cast<float>(a.e[i]);
    mb[r * 8 + cc + i] = static_cast<float>(b.e[i]);
    mc[r * 8 + cc + i] = static_cast<float>(c.e[i]);
  }
  emu::simd_sync();
  T out[2];
  for (int i = 0; i < 2; ++i) {
    float acc = mc[r * 8 + cc + i];
    for (int k = 0; k < 8; ++k) acc = std::fma(ma[r * 8 + k], mb[k * 8 + cc + i], acc);
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
