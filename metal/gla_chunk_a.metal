// Gated linear attention, chunked forward, pass 1 of 2 (with gla_chunk_h):
// the intra-chunk scores. MATH.md section 1. Body of an mx.fast.metal_kernel.
//   inputs  q, k, g [1,R,H,K] (R rows, packed), chunks [NT,2] (first row and
//           end row of every chunk)
//   outputs A [NT,H,C,C] f32: A[i,j] = sum_k q_ik k_jk exp(sum_{j<s<=i} g_sk)
//           for j <= i; blocks above the diagonal blocks are not written
//   grid (256, NT, H), threadgroup (256, 1, 1)
//
// One threadgroup per (chunk, head): NT*H threadgroups, independent of each
// other. A chunk of C = 64 rows is 8 blocks of 8 rows. Key channels go by in
// blocks of BK = 16 (threadgroup memory stays at 18 KB for any K).
//   * The 8 diagonal 8x8 blocks exactly, one entry per thread and channel, the
//     gate sum over (j, i] added up term by term.
//   * The 28 blocks below them (row block I > column block J) as simdgroup
//     matrix products, the gate sum split at the last row e of block J and the
//     first row r of block I:
//       (q_i exp(sum_(r,i] g)) . (k_j exp(sum_(j,e] g) exp(sum_(e,r] g))
//     where sum_(e,r] is the totals of the blocks between plus g_r.
// Every exponent is a sum of gates (all <= 0) formed from its own terms: no
// factor exceeds 1, and none is the difference of two cumulative sums, which
// after a gate of -1e4 would be off by ~1e-3 in the exponent (issue #20).
constexpr int C = 64;
constexpr int BK = 16;
constexpr int NT = 256;
constexpr int NPAIR = 28;

threadgroup float qs[C * BK];         // q, then q exp(sum_(r,i] g)    [row][key]
threadgroup float ks[C * BK];         // k, then k exp(sum_(j,e] g)    [row][key]
threadgroup float gs[C * BK];         // g                             [row][key]
threadgroup float er[NPAIR * BK];     // exp(sum_(e(J),r(I)] g)        [pair][key]
threadgroup float tot[8 * BK];        // gate sum of each block        [block][key]
threadgroup float kp[8 * 8 * BK];     // per simdgroup: k tile of a pair scaled by er

const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const int H = q_shape[2];
const int K = q_shape[3];
const int ci = threadgroup_position_in_grid.y;
const int hh = threadgroup_position_in_grid.z;
const int t0 = chunks[2 * ci];
const int t1 = chunks[2 * ci + 1];

// Diagonal entries of this thread: block tid / 32, positions lane and lane + 32
// of its 8x8 block (row p / 8, column p % 8); only j <= i is computed.
const int dblk = tid / 32;
// Gate sums: threads < 128 own (block tid / BK, key tid % BK).
const int gblk = tid / BK;
const int gk = tid % BK;
// Off-diagonal pairs of simdgroup sg: p = sg, sg + 8, sg + 16, sg + 24 (< 28),
// numbered row block by row block: (1,0) (2,0) (2,1) (3,0) ...
int pI[4], pJ[4];
int npair = 0;
for (int p = sg; p < NPAIR; p += 8, ++npair) {
  int I = 1;
  while ((I + 1) * I / 2 <= p) ++I;
  pI[npair] = I;
  pJ[npair] = p - I * (I - 1) / 2;
}
for (int u = npair; u < 4; ++u) { pI[u] = 0; pJ[u] = 0; }

simdgroup_float8x8 acc[4];
for (int u = 0; u < 4; ++u) acc[u] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
float adiag[2] = {0.0f, 0.0f};

for (int kb0 = 0; kb0 < K; kb0 += BK) {
  // Rows past the chunk's end load as zeros: their scores come out 0.
  for (int e = tid; e < C * BK; e += NT) {
    const int r = t0 + e / BK;
    const size_t idx = ((size_t)r * H + hh) * K + kb0 + e % BK;
    const bool ok = r < t1;
    qs[e] = ok ? static_cast<float>(q[idx]) : 0.0f;
    ks[e] = ok ? static_cast<float>(k[idx]) : 0.0f;
    gs[e] = ok ? static_cast<float>(g[idx]) : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  for (int u = 0; u < 2; ++u) {
    const int p = lane + 32 * u;
    const int i = p / 8, j = p % 8;
    if (j <= i) {
      const int ri = 8 * dblk + i, rj = 8 * dblk + j;
      float a = 0.0f;
      for (int c = 0; c < BK; ++c) {
        float s = 0.0f;
        for (int m = rj + 1; m <= ri; ++m) s += gs[m * BK + c];
        a += qs[ri * BK + c] * ks[rj * BK + c] * exp(s);
      }
      adiag[u] += a;
    }
  }
  // In-block sums of this thread's (block, key): prefix after the first row,
  // suffix after each row, and the total.
  float pre[8], suf[8];
  if (tid < 8 * BK) {
    float s = 0.0f;
    pre[0] = 0.0f;
    for (int i = 1; i < 8; ++i) {
      s += gs[(8 * gblk + i) * BK + gk];
      pre[i] = s;
    }
    s = 0.0f;
    for (int i = 7; i >= 0; --i) {
      suf[i] = s;
      s += gs[(8 * gblk + i) * BK + gk];
    }
    tot[gblk * BK + gk] = s;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // The diagonal loop above was the last reader of the raw q and k.
  if (tid < 8 * BK) {
    for (int i = 0; i < 8; ++i) {
      const int e = (8 * gblk + i) * BK + gk;
      qs[e] = qs[e] * exp(pre[i]);
      ks[e] = ks[e] * exp(suf[i]);
    }
  }
  for (int e = tid; e < NPAIR * BK; e += NT) {
    const int p = e / BK, c = e % BK;
    int I = 1;
    while ((I + 1) * I / 2 <= p) ++I;
    const int J = p - I * (I - 1) / 2;
    float s = gs[8 * I * BK + c];
    for (int M = J + 1; M < I; ++M) s += tot[M * BK + c];
    er[e] = exp(s);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  auto kpt = kp + sg * 8 * BK;
  // Unrolled, so that acc[u] has a compile-time index and the accumulators stay
  // in registers; npair is 4 or 3 (uniform within the simdgroup).
#pragma clang loop unroll(full)
  for (int u = 0; u < 4; ++u) {
    if (u >= npair) break;
    const int p = pI[u] * (pI[u] - 1) / 2 + pJ[u];
    for (int e = lane; e < 8 * BK; e += 32) {
      kpt[e] = ks[8 * pJ[u] * BK + e] * er[p * BK + e % BK];
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);
    for (int kk = 0; kk < BK / 8; ++kk) {
      simdgroup_float8x8 a, b;
      simdgroup_load(a, qs + 8 * pI[u] * BK + 8 * kk, BK);
      simdgroup_load(b, kpt + 8 * kk, BK, ulong2(0, 0), true);
      simdgroup_multiply_accumulate(acc[u], a, b, acc[u]);
    }
    // No barrier before the next pair overwrites kpt: every lane has loaded its
    // fragments of this pair before the (simdgroup-wide) products could finish.
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

const size_t base = ((size_t)ci * H + hh) * C * C;
for (int u = 0; u < 2; ++u) {
  const int p = lane + 32 * u;
  const int i = p / 8, j = p % 8;
  A[base + (8 * dblk + i) * C + 8 * dblk + j] = j <= i ? adiag[u] : 0.0f;
}
#pragma clang loop unroll(full)
for (int u = 0; u < 4; ++u) {
  if (u < npair) simdgroup_store(acc[u], A + base + 8 * pI[u] * C + 8 * pJ[u], C);
}
