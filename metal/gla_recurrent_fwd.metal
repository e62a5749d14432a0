// Gated linear attention, token by token (decode, or prefill when T is small).
// MATH.md section 1. Body of an mx.fast.metal_kernel; MLX writes the signature.
//   inputs  q, k, g [1,R,H,K] (R rows of all sequences, packed), v [1,R,H,V],
//           h0 [N,H,K,V] f32, cu [N+1] (sequence bounds in rows), scale (0-d f32)
//   outputs o [1,R,H,V] (OutT), ht [N,H,K,V] f32
//   template OutT, K
//   grid (V, 8, N*H), threadgroup (32, 8, 1)
//
// One threadgroup per (32 value columns, sequence, head): lane l holds value
// column v0 + l, simdgroup s the key rows s*K/8 .. (s+1)*K/8 - 1, so a state row
// is read and written by 32 lanes as 128 contiguous bytes (coalesced) and every
// lane keeps K/8 state entries in registers for the whole sequence. The q, k, g
// values of a key row are the same address for all 32 lanes (one broadcast load).
// Per token each simdgroup adds up its key rows' share of q . S[:, column]; the
// eight shares meet in threadgroup memory, one barrier per token (double
// buffered: a slot is rewritten two tokens later, after the next barrier).
// exp(g) with g <= 0 never overflows, and no sums of gates are formed here.
constexpr int NS = 8;
constexpr int R = K / NS;

threadgroup float part[2 * NS * 32];

const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const int H = q_shape[2];
const int V = v_shape[3];
const int nh = threadgroup_position_in_grid.z;
const int n = nh / H;
const int hh = nh - n * H;
const int col = threadgroup_position_in_grid.x * 32 + lane;
const int kr = sg * R;  // first key row of this simdgroup
const float sc = scale;

float st[R];
for (int i = 0; i < R; ++i) {
  st[i] = h0[((size_t)nh * K + kr + i) * V + col];
}
const int bos = cu[n];
const int eos = cu[n + 1];
for (int t = bos; t < eos; ++t) {
  const size_t row = (size_t)t * H + hh;
  const float vt = static_cast<float>(v[row * V + col]);
  float acc = 0.0f;
  for (int i = 0; i < R; ++i) {
    const size_t kk = row * K + kr + i;
    st[i] = st[i] * exp(static_cast<float>(g[kk])) + static_cast<float>(k[kk]) * vt;
    acc += st[i] * static_cast<float>(q[kk]);
  }
  auto slot = part + (t & 1) * NS * 32;
  slot[sg * 32 + lane] = acc;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    float sum = 0.0f;
    for (int s = 0; s < NS; ++s) sum += slot[s * 32 + lane];
    o[row * V + col] = static_cast<OutT>(sc * sum);
  }
}
for (int i = 0; i < R; ++i) {
  ht[((size_t)nh * K + kr + i) * V + col] = st[i];
}
