// Gated linear attention, chunked forward (prefill). MATH.md section 1.
// Body of an mx.fast.metal_kernel; MLX writes the signature.
//   inputs  q, k, g [B,T,H,K] (any float dtype), v [B,T,H,V], h0 [B,H,K,V] f32,
//           scale (0-d f32)
//   outputs o [B,T,H,V] (OutT), ht [B,H,K,V] f32
//   template OutT, K, V   (K in {64, 128, 256}, V a multiple of 64)
//   grid (256, V/64, B*H), threadgroup (256, 1, 1)
//
// One threadgroup walks all chunks of one (batch, head, 64-wide value tile); the
// state tile S[K, 64] stays in registers as 8x8 simdgroup matrices, simdgroup s
// owning value columns 8s..8s+7 (K/8 tiles). Per chunk of C = 32 steps, key
// channels are processed in blocks of BK = 16 (so threadgroup memory stays under
// 24 KB for any K):
//   b = cumsum of g inside the chunk (one lane per time step: C == simd width)
//   A[i,j] = sum_k q_ik k_jk exp(b_ik - b_jk), j <= i, accumulated over key blocks:
//     * the 4 diagonal 8x8 blocks exactly, one entry per thread;
//     * the 6 blocks below them (row block I > column block J) as matrix
//       products with the reference point r = first row of block I:
//       (q_i exp(b_i - b_r)) . (k_j exp(b_r - b_j)), both exponents <= 0;
//   O   += (q exp(b)) @ S_prev                      exponent b <= 0
//   S    = diag(exp(b_last)) S_prev + (k exp(b_last - b))^T @ v
//   O   += tril(A) @ v ;  o = scale * O
// No exponent is ever positive, so any finite log gate <= 0 is safe, and
// exp(b) and exp(-b) are never formed separately.
constexpr int C = 32;
constexpr int BK = 16;
constexpr int BV = 64;
constexpr int NT = 256;
constexpr int NSG = NT / 32;
constexpr int NKT = K / 8;
constexpr int NKB = K / BK;
constexpr int NPAIR = 6;

// Threadgroup memory, in floats.
constexpr int OFF_B = 0;                     // cumulative gate b      [C][BK]
constexpr int OFF_Q = OFF_B + C * BK;        // q, then q exp(b)       [C][BK]
constexpr int OFF_K = OFF_Q + C * BK;        // k, then k exp(bl - b)  [C][BK]
constexpr int OFF_QR = OFF_K + C * BK;       // q exp(b - b_ref(I))    [C][BK]
constexpr int OFF_KR = OFF_QR + C * BK;      // k exp(b_ref(I) - b)    [NPAIR][8][BK]
constexpr int OFF_V = OFF_KR + NPAIR * 8 * BK;  // v tile              [C][BV]
constexpr int OFF_A = OFF_V + C * BV;        // A                      [C][C]
constexpr int OFF_D = OFF_A + C * C;         // diag(exp(b_last))      [BK/8][8][8]
constexpr int SMEM = OFF_D + (BK / 8) * 64;
// The output staging (NSG slices of [C][8]) reuses [0, OFF_V).
static_assert(NSG * C * 8 <= OFF_V, "output staging overlaps the v tile");
threadgroup float smem[SMEM];

const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const int T = q_shape[1];
const int H = q_shape[2];
const int bh = threadgroup_position_in_grid.z;
const int b = bh / H;
const int h = bh - b * H;
const int v0 = threadgroup_position_in_grid.y * BV;
const int vc = v0 + 8 * sg;  // first value column of this simdgroup
const float sc = scale;

auto Bs = smem + OFF_B;
auto Qs = smem + OFF_Q;
auto Ks = smem + OFF_K;
auto QRs = smem + OFF_QR;
auto KRs = smem + OFF_KR;
auto Vs = smem + OFF_V;
auto As = smem + OFF_A;
auto Ds = smem + OFF_D;

// Entry of a diagonal block owned by this thread (4 blocks x 8 x 8 = NT).
const int dI = tid >> 6;
const int di = (tid >> 3) & 7;
const int dj = tid & 7;
// Off-diagonal block pair handled by simdgroup sg < NPAIR: (1,0) (2,0) (2,1)
// (3,0) (3,1) (3,2).
const int pI = sg < 1 ? 1 : (sg < 3 ? 2 : 3);
const int pJ = (int)sg - (pI * (pI - 1)) / 2;

const simdgroup_float8x8 zero8 = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
simdgroup_float8x8 S[NKT];
for (int kt = 0; kt < NKT; ++kt) {
  simdgroup_load(S[kt], h0 + (size_t)bh * K * V + (size_t)(8 * kt) * V + vc, V);
}

for (int c0 = 0; c0 < T; c0 += C) {
  simdgroup_float8x8 O[4];
  for (int I = 0; I < 4; ++I) O[I] = zero8;
  simdgroup_float8x8 Aoff = zero8;
  float a_diag = 0.0f;

  // Rows past T load as zeros with gate 0: they add nothing to the state and
  // leave b_last equal to b at the last real row.
  for (int e = tid; e < C * BV; e += NT) {
    const int r = e / BV;
    const int t = c0 + r;
    Vs[e] = t < T ? static_cast<float>(v[((size_t)(b * T + t) * H + h) * V + v0 + (e % BV)]) : 0.0f;
  }

  // Unrolled so that S[kt] below has a compile-time index and the state stays in
  // registers instead of being spilled to an indexable stack array.
#pragma clang loop unroll(full)
  for (int kb = 0; kb < NKB; ++kb) {
    const int k0 = kb * BK;
    for (int e = tid; e < C * BK; e += NT) {
      const int r = e / BK;
      const int t = c0 + r;
      const size_t idx = ((size_t)(b * T + t) * H + h) * K + k0 + (e % BK);
      const bool ok = t < T;
      Qs[e] = ok ? static_cast<float>(q[idx]) : 0.0f;
      Ks[e] = ok ? static_cast<float>(k[idx]) : 0.0f;
      Bs[e] = ok ? static_cast<float>(g[idx]) : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    for (int cc = sg; cc < BK; cc += NSG) {
      Bs[lane * BK + cc] = simd_prefix_inclusive_sum(Bs[lane * BK + cc]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    if (dj <= di) {
      const int ri = (8 * dI + di) * BK;
      const int rj = (8 * dI + dj) * BK;
      float acc = 0.0f;
      for (int cc = 0; cc < BK; ++cc) {
        acc += Qs[ri + cc] * Ks[rj + cc] * exp(Bs[ri + cc] - Bs[rj + cc]);
      }
      a_diag += acc;
    }
    for (int e = tid; e < C * BK; e += NT) {
      const int ref = ((e / BK) & ~7) * BK + (e % BK);
      QRs[e] = Qs[e] * exp(Bs[e] - Bs[ref]);
    }
    for (int e = tid; e < NPAIR * 8 * BK; e += NT) {
      const int p = e / (8 * BK);
      const int I = p < 1 ? 1 : (p < 3 ? 2 : 3);
      const int J = p - (I * (I - 1)) / 2;
      const int cc = e % BK;
      const int rj = (8 * J + ((e / BK) & 7)) * BK + cc;
      KRs[e] = Ks[rj] * exp(Bs[8 * I * BK + cc] - Bs[rj]);
    }
    if (tid < (BK / 8) * 64) {
      const int kk = tid >> 6;
      const int r = (tid >> 3) & 7;
      Ds[tid] = r == (int)(tid & 7) ? exp(Bs[(C - 1) * BK + 8 * kk + r]) : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    if (sg < NPAIR) {
      for (int kk = 0; kk < BK / 8; ++kk) {
        simdgroup_float8x8 a, bt;
        simdgroup_load(a, QRs + 8 * pI * BK + 8 * kk, BK);
        simdgroup_load(bt, KRs + sg * 8 * BK + 8 * kk, BK, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(Aoff, a, bt, Aoff);
      }
    }
    // The diagonal loop above was the last reader of the raw q and k, so they can
    // be rescaled in place now for the inter-chunk terms.
    for (int e = tid; e < C * BK; e += NT) {
      const float bl = Bs[(C - 1) * BK + (e % BK)];
      Qs[e] = Qs[e] * exp(Bs[e]);
      Ks[e] = Ks[e] * exp(bl - Bs[e]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

#pragma clang loop unroll(full)
    for (int kk = 0; kk < BK / 8; ++kk) {
      const int kt = kb * (BK / 8) + kk;
      // Output from the state before this chunk, then the state update, both on
      // this simdgroup's own state tiles: no other simdgroup reads them.
      for (int I = 0; I < 4; ++I) {
        simdgroup_float8x8 a;
        simdgroup_load(a, Qs + 8 * I * BK + 8 * kk, BK);
        simdgroup_multiply_accumulate(O[I], a, S[kt], O[I]);
      }
      simdgroup_float8x8 upd = zero8;
      for (int I = 0; I < 4; ++I) {
        simdgroup_float8x8 kT, vt;
        simdgroup_load(kT, Ks + 8 * I * BK + 8 * kk, BK, ulong2(0, 0), true);
        simdgroup_load(vt, Vs + 8 * I * BV + 8 * sg, BV);
        simdgroup_multiply_accumulate(upd, kT, vt, upd);
      }
      // Row scaling of S by exp(b_last) as a product with a diagonal tile keeps
      // the code independent of how lanes hold matrix elements.
      simdgroup_float8x8 d, ns;
      simdgroup_load(d, Ds + kk * 64, 8);
      simdgroup_multiply_accumulate(ns, d, S[kt], upd);
      S[kt] = ns;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  As[(8 * dI + di) * C + 8 * dI + dj] = dj <= di ? a_diag : 0.0f;
  if (sg < NPAIR) {
    simdgroup_store(Aoff, As + 8 * pI * C + 8 * pJ, C);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  for (int I = 0; I < 4; ++I) {
    for (int J = 0; J <= I; ++J) {
      simdgroup_float8x8 a, vt;
      simdgroup_load(a, As + 8 * I * C + 8 * J, C);
      simdgroup_load(vt, Vs + 8 * J * BV + 8 * sg, BV);
      simdgroup_multiply_accumulate(O[I], a, vt, O[I]);
    }
  }
  // Stage through threadgroup memory so that each lane writes one time row of
  // eight values, converted to the output type, and rows past T are skipped.
  auto stg = smem + sg * C * 8;
  for (int I = 0; I < 4; ++I) {
    simdgroup_store(O[I], stg + I * 64, 8);
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);
  if (c0 + (int)lane < T) {
    const size_t row = ((size_t)(b * T + c0 + lane) * H + h) * V + vc;
    for (int c = 0; c < 8; ++c) {
      o[row + c] = static_cast<OutT>(sc * stg[lane * 8 + c]);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

for (int kt = 0; kt < NKT; ++kt) {
  simdgroup_store(S[kt], ht + (size_t)bh * K * V + (size_t)(8 * kt) * V + vc, V);
}
