// Gated linear attention, token by token (decode, or prefill when T is tiny).
// Body of an mx.fast.metal_kernel; MLX writes the signature.
//   inputs  q, k, g [B,T,H,K] (any float dtype), v [B,T,H,V], h0 [B,H,K,V] f32,
//           scale (0-d f32)
//   outputs o [B,T,H,V] (OutT), ht [B,H,K,V] f32
//   template OutT, K, V
//   grid (32, V, B*H), threadgroup (32, 4, 1)
// One simdgroup owns one value column dv of one head: lane l keeps the state
// entries S[i*32 + l, dv] in registers for the whole sequence, so the state is
// read and written once, and the per-token dot product q . S[:, dv] is one
// simd_sum. Key index i*32 + lane makes the 32 lanes read q, k, g contiguously.
constexpr int NK = K / 32;
const int T = q_shape[1];
const int H = q_shape[2];
const int bh = thread_position_in_grid.z;
const int b = bh / H;
const int h = bh - b * H;
const int dv = thread_position_in_grid.y;
const int lane = thread_index_in_simdgroup;
const float sc = scale;

float st[NK];
for (int i = 0; i < NK; ++i) {
  st[i] = h0[((size_t)bh * K + i * 32 + lane) * V + dv];
}
for (int t = 0; t < T; ++t) {
  const size_t row = (size_t)(b * T + t) * H + h;
  const float vt = static_cast<float>(v[row * V + dv]);
  float acc = 0.0f;
  for (int i = 0; i < NK; ++i) {
    const size_t kk = row * K + i * 32 + lane;
    // exp(g) with g <= 0 never overflows; no cumulative sums are formed here.
    st[i] = st[i] * exp(static_cast<float>(g[kk])) + static_cast<float>(k[kk]) * vt;
    acc += st[i] * static_cast<float>(q[kk]);
  }
  acc = simd_sum(acc);
  if (lane == 0) {
    o[row * V + dv] = static_cast<OutT>(sc * acc);
  }
}
for (int i = 0; i < NK; ++i) {
  ht[((size_t)bh * K + i * 32 + lane) * V + dv] = st[i];
}
