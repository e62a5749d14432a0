// Gated linear attention, chunked forward, pass 2: the output. MATH.md section 1.
// Body of an mx.fast.metal_kernel; MLX writes the signature.
//   inputs  q, g [1,R,H,K] (R rows, packed), v [1,R,H,V],
//           A [NT,H,C,C] f32 (gla_chunk_a), h [NT,H,K,V] f32 (gla_chunk_h),
//           chunks [NT,2] (first and end row of every chunk), scale (0-d f32)
//   outputs o [1,R,H,V] (OutT)
//   template OutT
//   grid (256 * V/64, NT, H), threadgroup (256, 1, 1)
//
// One threadgroup per (64 value columns, chunk, head), all independent: V/64 *
// NT * H threadgroups (1024 for 2048 tokens of GLA 1.3B at batch 1).
// Simdgroup s owns value columns 8s..8s+7 of the tile, as eight 8x8 row tiles.
//   o = scale * ((q exp(b)) @ h[chunk] + tril(A) @ v)
// with b_i = sum_{t0<=s<=i} g_s, the chunk's own gates up to row i, formed as
// the totals of the earlier 8-row blocks plus a running sum inside the block:
// a sum of terms <= 0, accurate whatever the gates.
constexpr int C = 64;
constexpr int BK = 32;
constexpr int BV = 64;
constexpr int NT = 256;

// [0, C*BK): q exp(b) while the state term is formed, then the v tile [C][BV],
// then the output staging (8 simdgroups x [C][8]).
threadgroup float buf[C * BV];
threadgroup float tot[8 * BK];

const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const int H = q_shape[2];
const int K = q_shape[3];
const int V = v_shape[3];
const int v0 = threadgroup_position_in_grid.x * BV;
const int ci = threadgroup_position_in_grid.y;
const int hh = threadgroup_position_in_grid.z;
const int t0 = chunks[2 * ci];
const int t1 = chunks[2 * ci + 1];
const int vc = v0 + 8 * sg;
const float sc = scale;

// Gate work: thread = (8-row block blk, key column kc).
const int blk = tid / BK;
const int kc = tid % BK;

simdgroup_float8x8 O[8];
for (int I = 0; I < 8; ++I) O[I] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);

auto qe = buf + 0;
const size_t hbase = ((size_t)ci * H + hh) * K * V;
for (int kb0 = 0; kb0 < K; kb0 += BK) {
  // Rows past the chunk's end count as q = 0, g = 0.
  float pre[8];
  float s = 0.0f;
  for (int i = 0; i < 8; ++i) {
    const int r = t0 + 8 * blk + i;
    s += r < t1 ? static_cast<float>(g[((size_t)r * H + hh) * K + kb0 + kc]) : 0.0f;
    pre[i] = s;
  }
  tot[blk * BK + kc] = s;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float before = 0.0f;
  for (int b2 = 0; b2 < blk; ++b2) before += tot[b2 * BK + kc];
  for (int i = 0; i < 8; ++i) {
    const int r = t0 + 8 * blk + i;
    const float qv = r < t1 ? static_cast<float>(q[((size_t)r * H + hh) * K + kb0 + kc]) : 0.0f;
    qe[(8 * blk + i) * BK + kc] = qv * exp(before + pre[i]);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  for (int kk = 0; kk < BK / 8; ++kk) {
    simdgroup_float8x8 hm;
    simdgroup_load(hm, h + hbase + (size_t)(kb0 + 8 * kk) * V + vc, V);
#pragma clang loop unroll(full)
    for (int I = 0; I < 8; ++I) {
      simdgroup_float8x8 a;
      simdgroup_load(a, qe + 8 * I * BK + 8 * kk, BK);
      simdgroup_multiply_accumulate(O[I], a, hm, O[I]);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

auto vs = buf + 0;
for (int e = tid; e < C * BV; e += NT) {
  const int r = t0 + e / BV;
  vs[e] = r < t1 ? static_cast<float>(v[((size_t)r * H + hh) * V + v0 + e % BV]) : 0.0f;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

const size_t abase = ((size_t)ci * H + hh) * C * C;
// Unrolled (with the loop over I inside), so O[I] has compile-time indices.
#pragma clang loop unroll(full)
for (int J = 0; J < 8; ++J) {
  simdgroup_float8x8 vt;
  simdgroup_load(vt, vs + 8 * J * BV + 8 * sg, BV);
  for (int I = J; I < 8; ++I) {
    simdgroup_float8x8 a;
    simdgroup_load(a, A + abase + 8 * I * C + 8 * J, C);
    simdgroup_multiply_accumulate(O[I], a, vt, O[I]);
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// Stage through threadgroup memory so that each lane writes whole rows of eight
// values in the output type, and rows past the chunk's end are skipped.
auto stg = buf + sg * C * 8;
#pragma clang loop unroll(full)
for (int I = 0; I < 8; ++I) simdgroup_store(O[I], stg + I * 64, 8);
simdgroup_barrier(mem_flags::mem_threadgroup);
for (int rr = lane; rr < C; rr += 32) {
  const int r = t0 + rr;
  if (r < t1) {
    const size_t row = ((size_t)r * H + hh) * V + vc;
    for (int c = 0; c < 8; ++c) o[row + c] = static_cast<OutT>(sc * stg[rr * 8 + c]);
  }
}
