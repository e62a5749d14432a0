// Gated linear attention, chunked forward, pass 1 of 2 (with gla_chunk_a):
// the state entering every chunk. MATH.md section 1. Body of an
// mx.fast.metal_kernel; MLX writes the signature.
//   inputs  k, g [1,R,H,K] (R rows of all sequences, packed), v [1,R,H,V],
//           h0 [N,H,K,V] f32, cu [N+1] (sequence bounds in rows),
//           coff [N+1] (first chunk id of each sequence)
//   outputs h [NT,H,K,V] f32 (state entering each chunk), ht [N,H,K,V] f32
//   grid (256 * K/32, V/64, N*H), threadgroup (256, 1, 1)
//
// One threadgroup per (32 key rows, 64 value columns, sequence, head) walks the
// chunks of its sequence in order, with its [32 x 64] state tile in registers
// (simdgroup s holds value columns 8s..8s+7 as four 8x8 tiles). That is
// K/32 * V/64 * N*H threadgroups: 256 for one sequence of GLA 1.3B (H 4, K 256,
// V 512), the serial part of the op. Per chunk of C = 64 rows:
//   h[chunk] = S
//   S = diag(exp(sum_s g_s)) S + (k_j exp(sum_{s>j} g_s))^T v
// Every exponent is a sum of the chunk's own gates (suffix sums), never the
// difference of two cumulative sums: gates <= 0, so each sum is accurate
// relative to itself whatever the gates (down to -1e4; issue #20).
constexpr int C = 64;   // chunk rows
constexpr int BK = 32;  // key rows of the state tile
constexpr int BV = 64;  // value columns of the state tile
constexpr int NT = 256;
constexpr int NKT = BK / 8;

threadgroup float kd[C * BK];   // k exp(suffix sum), [row][key]
threadgroup float vs[C * BV];   // v, [row][value]
threadgroup float tot[8 * BK];  // gate sum of each 8-row block, [block][key]
threadgroup float dg[NKT * 64]; // diag(exp(chunk gate sum)) as NKT 8x8 tiles

const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const int H = k_shape[2];
const int K = k_shape[3];
const int V = v_shape[3];
const int k0 = threadgroup_position_in_grid.x * BK;
const int v0 = threadgroup_position_in_grid.y * BV;
const int nh = threadgroup_position_in_grid.z;
const int n = nh / H;
const int hh = nh - n * H;
const int bos = cu[n];
const int eos = cu[n + 1];
const int c_first = coff[n];
const int vc = v0 + 8 * sg;  // first value column of this simdgroup

// The gate work: thread = (8-row block blk, key column kc).
const int blk = tid / BK;
const int kc = tid % BK;

simdgroup_float8x8 S[NKT];
for (int kt = 0; kt < NKT; ++kt) {
  simdgroup_load(S[kt], h0 + ((size_t)nh * K + k0 + 8 * kt) * V + vc, V);
}

for (int t0 = bos, ci = c_first; t0 < eos; t0 += C, ++ci) {
#pragma clang loop unroll(full)
  for (int kt = 0; kt < NKT; ++kt) {
    simdgroup_store(S[kt], h + (((size_t)ci * H + hh) * K + k0 + 8 * kt) * V + vc, V);
  }
  // Rows past the sequence end count as k = 0, g = 0: no write, no decay.
  float gr[8];
  float t = 0.0f;
  for (int i = 0; i < 8; ++i) {
    const int r = t0 + 8 * blk + i;
    gr[i] = r < eos ? static_cast<float>(g[((size_t)r * H + hh) * K + k0 + kc]) : 0.0f;
    t += gr[i];
  }
  tot[blk * BK + kc] = t;
  for (int e = tid; e < C * BV; e += NT) {
    const int r = t0 + e / BV;
    vs[e] = r < eos ? static_cast<float>(v[((size_t)r * H + hh) * V + v0 + e % BV]) : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // Suffix sums: the later blocks' totals, then the later rows of this block.
  float suf = 0.0f;
  for (int b2 = blk + 1; b2 < 8; ++b2) suf += tot[b2 * BK + kc];
  if (blk == 0) {  // row kc % 8 of diagonal tile kc / 8
    const float d = exp(suf + t);
    for (int j = 0; j < 8; ++j) dg[kc * 8 + j] = j == kc % 8 ? d : 0.0f;
  }
  for (int i = 7; i >= 0; --i) {
    const int r = t0 + 8 * blk + i;
    const float kv = r < eos ? static_cast<float>(k[((size_t)r * H + hh) * K + k0 + kc]) : 0.0f;
    kd[(8 * blk + i) * BK + kc] = kv * exp(suf);
    suf += gr[i];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // Unrolled loops over kt keep S[kt] at compile-time indices, in registers.
#pragma clang loop unroll(full)
  for (int kt = 0; kt < NKT; ++kt) {
    simdgroup_float8x8 upd = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    for (int I = 0; I < 8; ++I) {
      simdgroup_float8x8 kT, vt;
      simdgroup_load(kT, kd + 8 * I * BK + 8 * kt, BK, ulong2(0, 0), true);
      simdgroup_load(vt, vs + 8 * I * BV + 8 * sg, BV);
      simdgroup_multiply_accumulate(upd, kT, vt, upd);
    }
    // Row scaling by a product with a diagonal tile: independent of how lanes
    // hold the elements of a simdgroup matrix.
    simdgroup_float8x8 d;
    simdgroup_load(d, dg + kt * 64, 8);
    simdgroup_multiply_accumulate(S[kt], d, S[kt], upd);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

for (int kt = 0; kt < NKT; ++kt) {
  simdgroup_store(S[kt], ht + ((size_t)nh * K + k0 + 8 * kt) * V + vc, V);
}
