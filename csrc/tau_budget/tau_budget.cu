// Fused τ-budget decode step: see tau_budget.cuh and docs/decode.md; the definition is
// slim_ops/ops/tau_budget/reference.py (counter-based RNG, invalid slots, fp32 arithmetic order).
#include "tau_budget/tau_budget.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstring>

namespace slim_ops {
namespace {

constexpr int kSlotThreads = 256;
constexpr int kSlotWarps = kSlotThreads / 32;
constexpr int kRowThreads = kTauBudgetMaxK;
constexpr float kLog2e = 1.4426950408889634f;
// Every u the RNG can produce lies in [2^-24, 1 - 2^-24], so g = -log(-log u) < 16.7 and z/T + 17 bounds the
// score: the two logarithms are skipped for elements that cannot win.
constexpr float kGumbelBound = 17.0f;

enum Mode { kGreedy = 0, kSampleDiv = 1, kSampleMul = 2 };

#define TB_HD __host__ __device__ __forceinline__

// Host versions exist so that the host build (tau_budget_host_check.cu) can run the same per-thread code.
TB_HD float ex2(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}
TB_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
TB_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
TB_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
TB_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
TB_HD float exp_f(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  return std::exp(x);
#endif
}
TB_HD float bits_to_float(uint32_t b) {
  float f;
  memcpy(&f, &b, sizeof(f));
  return f;
}
TB_HD float log_f(float x) {
#ifdef __CUDA_ARCH__
  return logf(x);
#else
  return std::log(x);
#endif
}

TB_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

TB_HD uint32_t rng_bits(uint32_t key, uint32_t v) { return mix32(key + v * 0x9E3779B9u); }

// u = ((bits >> 9) + 0.5) * 2^-23, exact in fp32 (23 + 1 significant bits), as the reference computes it.
TB_HD float rng_uniform(uint32_t bits) { return mul_rn(add_rn(static_cast<float>(bits >> 9), 0.5f), 0x1p-23f); }

// Running state of one thread / warp / block over part of a slot's logits: max m and Σexp(z/T − m) (NaN
// once a NaN or +inf logit was seen), best score with its index and z/T, and `bad` for a NaN seen while the
// max was still −inf.
struct SlotState {
  float m, s, score, zt;
  int idx, bad;
};

TB_HD SlotState slot_init() {
  return SlotState{-INFINITY, 0.0f, -INFINITY, -INFINITY, INT_MAX, 0};
}

// Σ ex2(z·log2e − m·log2e) over a chunk: one FFMA and one MUFU.EX2 per element. NaN / +inf logits make the
// sum NaN (NaN − m, inf − inf); a NaN met while everything so far is −inf is recorded in `bad`.
template <int N>
TB_HD float chunk_sum(const float (&z)[N], float m, int& bad) {
  if (m == -INFINITY) {
#pragma unroll
    for (int e = 0; e < N; ++e) bad |= (z[e] != z[e]) ? 1 : 0;
    return 0.0f;
  }
  const float ml = m * kLog2e;
  float acc = 0.0f;
#pragma unroll
  for (int e = 0; e < N; ++e) acc += ex2(fmaf(z[e], kLog2e, -ml));
  return acc;
}

// s·exp(m_old − m) for a running sum `s` taken at max m_old, when the max grows to m (m_old = −inf gives 0).
TB_HD float rescale(float s, float m_old, float m) { return s * ex2((m_old - m) * kLog2e); }

template <int N>
TB_HD void greedy_chunk(SlotState& st, const float (&z)[N], int i0) {
  float cm = z[0];
#pragma unroll
  for (int e = 1; e < N; ++e) cm = fmaxf(cm, z[e]);
  if (cm > st.score) {  // a new maximum: its first position in the chunk keeps the lowest index among ties
    int first = N - 1;
#pragma unroll
    for (int e = N - 2; e >= 0; --e) first = (z[e] == cm) ? e : first;
    st.s = rescale(st.s, st.score, cm);
    st.score = cm;
    st.idx = i0 + first;
  }
  st.s += chunk_sum<N>(z, st.score, st.bad);
}

template <int MODE, int N>
TB_HD void sample_chunk(SlotState& st, const float (&z)[N], int i0, float t, float inv_t, uint32_t key) {
  float zt[N];
  float cm = -INFINITY;
#pragma unroll
  for (int e = 0; e < N; ++e) {
    zt[e] = MODE == kSampleMul ? mul_rn(z[e], inv_t) : div_rn(z[e], t);
    cm = fmaxf(cm, zt[e]);
  }
  if (cm > st.m) {
    st.s = rescale(st.s, st.m, cm);
    st.m = cm;
  }
  st.s += chunk_sum<N>(zt, st.m, st.bad);
#pragma unroll
  for (int e = 0; e < N; ++e) {
    const uint32_t bits = rng_bits(key, static_cast<uint32_t>(i0 + e));
    if (add_rn(zt[e], kGumbelBound) > st.score) {
      const float u = rng_uniform(bits);
      const float g = -log_f(-log_f(u));
      const float sc = add_rn(zt[e], g);
      if (sc > st.score) {
        st.score = sc;
        st.idx = i0 + e;
        st.zt = zt[e];
      }
    }
  }
}

template <int MODE, int N>
TB_HD void visit(SlotState& st, const float (&z)[N], int i0, float t, float inv_t, uint32_t key) {
  if constexpr (MODE == kGreedy) {
    greedy_chunk<N>(st, z, i0);
  } else {
    sample_chunk<MODE, N>(st, z, i0, t, inv_t, key);
  }
}

template <typename U>
TB_HD U ld_stream(const U* p) {
#ifdef __CUDA_ARCH__
  return __ldcs(p);
#else
  return *p;
#endif
}

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  static TB_HD float one(const float* p) { return ld_stream(p); }
  static TB_HD void vec(const float* p, float (&z)[kVec]) {
    const float4 w = ld_stream(reinterpret_cast<const float4*>(p));
    z[0] = w.x;
    z[1] = w.y;
    z[2] = w.z;
    z[3] = w.w;
  }
};
template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  static TB_HD float one(const __nv_bfloat16* p) {
    return bits_to_float(static_cast<uint32_t>(ld_stream(reinterpret_cast<const unsigned short*>(p))) << 16);
  }
  static TB_HD void vec(const __nv_bfloat16* p, float (&z)[kVec]) {
    const uint4 w = ld_stream(reinterpret_cast<const uint4*>(p));
    const uint32_t a[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      z[2 * q] = bits_to_float(a[q] << 16);
      z[2 * q + 1] = bits_to_float(a[q] & 0xffff0000u);
    }
  }
};
template <>
struct Elem<__half> {
  static constexpr int kVec = 8;
  static TB_HD float half_bits(unsigned short b) {
    __half h;
    memcpy(&h, &b, sizeof(h));
    return __half2float(h);
  }
  static TB_HD float one(const __half* p) {
    return half_bits(ld_stream(reinterpret_cast<const unsigned short*>(p)));
  }
  static TB_HD void vec(const __half* p, float (&z)[kVec]) {
    const uint4 w = ld_stream(reinterpret_cast<const uint4*>(p));
    const uint32_t a[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      z[2 * q] = half_bits(static_cast<unsigned short>(a[q] & 0xffffu));
      z[2 * q + 1] = half_bits(static_cast<unsigned short>(a[q] >> 16));
    }
  }
};

// Merges b into a. Ties of the score go to the lower vocabulary index.
TB_HD void combine(SlotState& a, const SlotState& b) {
  const float m = fmaxf(a.m, b.m);
  if (m != -INFINITY) a.s = a.s * ex2((a.m - m) * kLog2e) + b.s * ex2((b.m - m) * kLog2e);
  a.m = m;
  if (b.score > a.score || (b.score == a.score && b.idx < a.idx)) {
    a.score = b.score;
    a.idx = b.idx;
    a.zt = b.zt;
  }
  a.bad |= b.bad;
}

TB_HD uint32_t slot_key(const int64_t* seed, int64_t i_slot) {
  const uint64_t sd = static_cast<uint64_t>(*seed);
  const uint32_t lo = static_cast<uint32_t>(sd), hi = static_cast<uint32_t>(sd >> 32);
  return mix32(hi ^ mix32(lo + static_cast<uint32_t>(i_slot)));
}

// Thread `tid` of a kSlotThreads-thread block over logits [o_start, o_end) of one slot row: a scalar head up
// to a 16-byte boundary, the 16-byte vector body, a scalar tail. Each thread visits increasing indices.
template <typename T, int MODE>
TB_HD SlotState slot_scan(const T* p_row, int64_t o_start, int64_t o_end, int tid, float t, float inv_t,
                          uint32_t key) {
  constexpr int N = Elem<T>::kVec;
  SlotState st = slot_init();
  if (o_start < o_end) {
    const uintptr_t addr = reinterpret_cast<uintptr_t>(p_row + o_start);
    int64_t head = static_cast<int64_t>(((16u - (addr & 15u)) & 15u) / sizeof(T));
    if (head > o_end - o_start) head = o_end - o_start;
    const int64_t o_a0 = o_start + head;
    const int64_t n_vec = (o_end - o_a0) / N;
    const int64_t o_a1 = o_a0 + n_vec * N;
    if (tid < head) {
      const float z[1] = {Elem<T>::one(p_row + o_start + tid)};
      visit<MODE, 1>(st, z, static_cast<int>(o_start + tid), t, inv_t, key);
    }
    const T* p_vec = p_row + o_a0;
    int64_t i_v = tid;
    for (; i_v + kSlotThreads < n_vec; i_v += 2 * kSlotThreads) {
      float b_z0[N], b_z1[N];
      Elem<T>::vec(p_vec + i_v * N, b_z0);
      Elem<T>::vec(p_vec + (i_v + kSlotThreads) * N, b_z1);
      visit<MODE, N>(st, b_z0, static_cast<int>(o_a0 + i_v * N), t, inv_t, key);
      visit<MODE, N>(st, b_z1, static_cast<int>(o_a0 + (i_v + kSlotThreads) * N), t, inv_t, key);
    }
    if (i_v < n_vec) {
      float b_z0[N];
      Elem<T>::vec(p_vec + i_v * N, b_z0);
      visit<MODE, N>(st, b_z0, static_cast<int>(o_a0 + i_v * N), t, inv_t, key);
    }
    if (o_a1 + tid < o_end) {
      const float z[1] = {Elem<T>::one(p_row + o_a1 + tid)};
      visit<MODE, 1>(st, z, static_cast<int>(o_a1 + tid), t, inv_t, key);
    }
  }
  if constexpr (MODE == kGreedy) {
    st.m = st.score;
    st.zt = st.score;
  }
  return st;
}

TB_HD SlotState from_partial(const TauBudgetPartial& q) { return SlotState{q.m, q.s, q.score, q.zt, q.idx, q.bad}; }

// Combines the splits of one slot into (token, confidence); invalid slots get (mask_id, NaN).
TB_HD void finish_slot(const TauBudgetPartial* q, int splits, int64_t mask_id, int64_t& tok, float& c) {
  SlotState st = from_partial(q[0]);
  for (int i = 1; i < splits; ++i) combine(st, from_partial(q[i]));
  tok = mask_id;
  c = bits_to_float(0x7fffffffu);
  if (!st.bad && st.m != -INFINITY && st.s == st.s) {
    tok = st.idx;
    c = exp_f(st.zt - st.m) / st.s;
  }
}

// Rank of eligible slot j among the eligible slots of a row by (confidence desc, index asc).
TB_HD int slot_rank(int j, float c, int K, const float* s_c, const int* s_m) {
  int rank = 0;
  for (int i = 0; i < K; ++i) rank += (s_m[i] && (s_c[i] > c || (s_c[i] == c && i < j))) ? 1 : 0;
  return rank;
}

// k and risk of one row from the eligible slots in sorted order (s_order) with their confidences s_c.
TB_HD int row_commits(int n_m, int n_a, const float* s_c, const int* s_order, float b, int f, int strategy,
                      float& risk) {
  int k;
  if (strategy == kTauBudgetStrategyTau) {
    int k_b = 0;
    float u = 0.0f;
    for (int q = 0; q < n_a; ++q) {
      u = add_rn(u, sub_rn(1.0f, s_c[s_order[q]]));
      k_b += (u <= b) ? 1 : 0;
    }
    k = k_b > f ? k_b : f;
  } else if (strategy == kTauBudgetStrategyThreshold) {
    k = n_a > f ? n_a : f;
  } else {
    k = f;
  }
  k = k < n_m ? k : n_m;
  float rk = 0.0f;
  for (int q = 0; q < k; ++q) rk = add_rn(rk, sub_rn(1.0f, s_c[s_order[q]]));
  risk = rk;
  return k;
}

__device__ __forceinline__ SlotState shfl_xor(const SlotState& a, int lane_mask) {
  SlotState b;
  b.m = __shfl_xor_sync(0xffffffffu, a.m, lane_mask);
  b.s = __shfl_xor_sync(0xffffffffu, a.s, lane_mask);
  b.score = __shfl_xor_sync(0xffffffffu, a.score, lane_mask);
  b.zt = __shfl_xor_sync(0xffffffffu, a.zt, lane_mask);
  b.idx = __shfl_xor_sync(0xffffffffu, a.idx, lane_mask);
  b.bad = __shfl_xor_sync(0xffffffffu, a.bad, lane_mask);
  return b;
}

}  // namespace

// Kernels live in slim_ops itself so that their names stay readable in ptxas / profiler reports.
// grid: R*K*splits blocks, one per (slot, split); block: kSlotThreads.
template <typename T, int MODE>
__global__ void __launch_bounds__(kSlotThreads)
    _tau_budget_slot_kernel(const T* __restrict__ logits, int64_t K, int64_t V, int64_t stride_r,
                            int64_t stride_k, int splits, int64_t chunk, const int64_t* __restrict__ seed,
                            float t, float inv_t, TauBudgetPartial* __restrict__ part) {
  const int64_t i_g = blockIdx.x;
  const int64_t i_slot = i_g / splits;
  const int64_t i_split = i_g - i_slot * splits;
  const int64_t i_r = i_slot / K;
  const int64_t i_k = i_slot - i_r * K;
  const int tid = threadIdx.x;
  const uint32_t key = MODE == kGreedy ? 0u : slot_key(seed, i_slot);
  const int64_t o_start = i_split * chunk;
  const int64_t o_end = o_start + chunk < V ? o_start + chunk : V;
  SlotState st = slot_scan<T, MODE>(logits + i_r * stride_r + i_k * stride_k, o_start, o_end, tid, t, inv_t, key);

#pragma unroll
  for (int o = 16; o > 0; o >>= 1) combine(st, shfl_xor(st, o));
  __shared__ SlotState s_warp[kSlotWarps];
  const int lane = tid & 31, warp = tid >> 5;
  if (lane == 0) s_warp[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kSlotWarps ? s_warp[lane] : slot_init();
#pragma unroll
    for (int o = kSlotWarps / 2; o > 0; o >>= 1) combine(st, shfl_xor(st, o));
    if (lane == 0) part[i_g] = TauBudgetPartial{st.m, st.s, st.score, st.zt, st.idx, st.bad};
  }
}

// Row part shared by both row kernels: thread j holds slot j's confidence c and eligibility; writes *num and
// *risk and returns whether slot j is committed.
__device__ __forceinline__ bool select_row(int K, float c, bool masked, float tau, float b, int f, int strategy,
                                           int32_t* num, float* risk) {
  __shared__ float s_c[kTauBudgetMaxK];
  __shared__ int s_m[kTauBudgetMaxK];
  __shared__ int s_order[kTauBudgetMaxK];
  __shared__ int s_k;
  const int j = threadIdx.x;
  if (j < K) {
    s_c[j] = c;
    s_m[j] = masked ? 1 : 0;
  }
  const int n_m = __syncthreads_count(masked);
  int rank = 0;
  if (masked) {
    rank = slot_rank(j, c, K, s_c, s_m);
    s_order[rank] = j;
  }
  const int n_a = __syncthreads_count(masked && c > tau);
  if (j == 0) {
    float rk;
    const int k = row_commits(n_m, n_a, s_c, s_order, b, f, strategy, rk);
    *num = k;
    *risk = rk;
    s_k = k;
  }
  __syncthreads();
  return masked && rank < s_k;
}

// grid: R blocks; block: kRowThreads (thread j = slot j).
__global__ void __launch_bounds__(kRowThreads)
    _tau_budget_row_kernel(const TauBudgetPartial* __restrict__ part, int splits, int64_t K,
                           const int64_t* __restrict__ block, int64_t mask_id, const float* __restrict__ tau32,
                           const float* __restrict__ bud, const int32_t* __restrict__ floor, int strategy,
                           int64_t* __restrict__ block_out, bool* __restrict__ commit,
                           int64_t* __restrict__ tokens, float* __restrict__ confidence,
                           int32_t* __restrict__ num_committed, float* __restrict__ risk) {
  const int64_t i_r = blockIdx.x;
  const int j = threadIdx.x;
  const int64_t o = i_r * K + j;
  float c = 0.0f;
  int64_t tok = mask_id, blk = 0;
  bool masked = false;
  if (j < K) {
    finish_slot(part + o * splits, splits, mask_id, tok, c);
    blk = block[o];
    tokens[o] = tok;
    confidence[o] = c;
    masked = blk == mask_id && !isnan(c);
  }
  const bool take = select_row(static_cast<int>(K), c, masked, tau32[i_r], bud[i_r], floor[i_r], strategy,
                               num_committed + i_r, risk + i_r);
  if (j < K) {
    commit[o] = take;
    block_out[o] = take ? tok : blk;
  }
}

__global__ void __launch_bounds__(kRowThreads)
    _tau_budget_select_kernel(const float* __restrict__ confidence, const bool* __restrict__ masked_in, int64_t K,
                              const float* __restrict__ tau32, const float* __restrict__ bud,
                              const int32_t* __restrict__ floor, int strategy, bool* __restrict__ commit,
                              int32_t* __restrict__ num_committed, float* __restrict__ risk) {
  const int64_t i_r = blockIdx.x;
  const int j = threadIdx.x;
  const int64_t o = i_r * K + j;
  float c = 0.0f;
  bool masked = false;
  if (j < K) {
    c = confidence[o];
    masked = masked_in[o] && !isnan(c);
  }
  const bool take = select_row(static_cast<int>(K), c, masked, tau32[i_r], bud[i_r], floor[i_r], strategy,
                               num_committed + i_r, risk + i_r);
  if (j < K) commit[o] = take;
}

namespace {

template <typename T, int MODE>
void launch_slots(const void* logits, int64_t R, int64_t K, int64_t V, int64_t stride_r, int64_t stride_k,
                  int splits, int64_t chunk, const int64_t* seed, float t, float inv_t, TauBudgetPartial* part,
                  cudaStream_t stream) {
  const int64_t grid = R * K * splits;
  _tau_budget_slot_kernel<T, MODE><<<static_cast<unsigned>(grid), kSlotThreads, 0, stream>>>(
      static_cast<const T*>(logits), K, V, stride_r, stride_k, splits, chunk, seed, t, inv_t, part);
}

template <typename T>
void launch_slots_mode(int mode, const void* logits, int64_t R, int64_t K, int64_t V, int64_t stride_r,
                       int64_t stride_k, int splits, int64_t chunk, const int64_t* seed, float t, float inv_t,
                       TauBudgetPartial* part, cudaStream_t stream) {
  if (mode == kGreedy) {
    launch_slots<T, kGreedy>(logits, R, K, V, stride_r, stride_k, splits, chunk, seed, t, inv_t, part, stream);
  } else if (mode == kSampleMul) {
    launch_slots<T, kSampleMul>(logits, R, K, V, stride_r, stride_k, splits, chunk, seed, t, inv_t, part, stream);
  } else {
    launch_slots<T, kSampleDiv>(logits, R, K, V, stride_r, stride_k, splits, chunk, seed, t, inv_t, part, stream);
  }
}

bool valid_step_args(int64_t R, int64_t K, int64_t V, int strategy, int splits, float temperature) {
  return R >= 0 && R <= INT_MAX && K >= 0 && K <= kTauBudgetMaxK && strategy >= kTauBudgetStrategyTau &&
         strategy <= kTauBudgetStrategyTopk && V >= 0 && V <= INT_MAX && splits >= 1 && temperature >= 0.0f &&
         !std::isinf(temperature) && R * K * splits <= INT_MAX;
}

// Elements per split (a multiple of 8, so every split starts 16-byte aligned when the row start is) and the
// sampling mode: z·(1/T) equals z/T bit for bit when T is a power of two with a normal reciprocal.
void plan(int64_t V, int splits, float temperature, int64_t& chunk, int& mode, float& inv_t) {
  chunk = (V + splits - 1) / splits;
  chunk = (chunk + 7) / 8 * 8;
  mode = kGreedy;
  inv_t = 1.0f;
  if (temperature > 0.0f) {
    int e = 0;
    const float mant = std::frexp(temperature, &e);
    inv_t = std::ldexp(1.0f, 1 - e);
    mode = (mant == 0.5f && std::isfinite(inv_t) && inv_t >= FLT_MIN) ? kSampleMul : kSampleDiv;
  }
}

}  // namespace

cudaError_t tau_budget_step(const void* logits, int dtype, int64_t R, int64_t K, int64_t V, int64_t stride_r,
                            int64_t stride_k, const int64_t* block, int64_t mask_id, const float* tau32,
                            const float* bud, const int32_t* floor, const int64_t* seed, float temperature,
                            int strategy, int splits, void* workspace, int64_t* block_out, bool* commit,
                            int64_t* tokens, float* confidence, int32_t* num_committed, float* risk,
                            cudaStream_t stream) {
  if (!valid_step_args(R, K, V, strategy, splits, temperature)) return cudaErrorInvalidValue;
  if (R == 0) return cudaSuccess;
  int64_t chunk;
  int mode;
  float inv_t;
  plan(V, splits, temperature, chunk, mode, inv_t);
  auto* part = static_cast<TauBudgetPartial*>(workspace);
  switch (K == 0 ? -1 : dtype) {
    case -1:  // no slots: the row kernel still writes num_committed = 0 and risk = 0
      break;
    case kDTypeF32:
      launch_slots_mode<float>(mode, logits, R, K, V, stride_r, stride_k, splits, chunk, seed, temperature, inv_t,
                               part, stream);
      break;
    case kDTypeF16:
      launch_slots_mode<__half>(mode, logits, R, K, V, stride_r, stride_k, splits, chunk, seed, temperature,
                                inv_t, part, stream);
      break;
    case kDTypeBF16:
      launch_slots_mode<__nv_bfloat16>(mode, logits, R, K, V, stride_r, stride_k, splits, chunk, seed,
                                       temperature, inv_t, part, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  _tau_budget_row_kernel<<<static_cast<unsigned>(R), kRowThreads, 0, stream>>>(
      part, splits, K, block, mask_id, tau32, bud, floor, strategy, block_out, commit, tokens, confidence,
      num_committed, risk);
  return cudaGetLastError();
}

cudaError_t tau_budget_select(const float* confidence, const bool* masked, int64_t R, int64_t K, const float* tau32,
                              const float* bud, const int32_t* floor, int strategy, bool* commit,
                              int32_t* num_committed, float* risk, cudaStream_t stream) {
  if (!valid_step_args(R, K, 0, strategy, 1, 0.0f)) return cudaErrorInvalidValue;
  if (R == 0) return cudaSuccess;
  _tau_budget_select_kernel<<<static_cast<unsigned>(R), kRowThreads, 0, stream>>>(
      confidence, masked, K, tau32, bud, floor, strategy, commit, num_committed, risk);
  return cudaGetLastError();
}

}  // namespace slim_ops
