// CPU decode step: see tau_budget_cpu.h; the definition is slim_ops/ops/tau_budget/reference.py.
#include "tau_budget/tau_budget_cpu.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

#include "dtype_codes.h"

// 16-lane vectors are passed only between always-inline functions: no ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace slim_ops {
namespace {

constexpr int kLanes = 16;    // independent accumulators per reduction (two AVX2 / one AVX-512 register)
constexpr int kBlock = 2048;  // elements per block: 8 KB of fp32, re-read from L1 by the Σexp pass
constexpr int kMaxK = 64;
// Every u the RNG produces lies in [2^-24, 1 - 2^-24], so g = -log(-log u) < 16.7: an element whose z/T + 17
// does not beat the best score cannot win and its two logarithms are skipped.
constexpr float kGumbelBound = 17.0f;

#define SLIM_INLINE inline __attribute__((always_inline))

SLIM_INLINE float bits_f(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}
SLIM_INLINE uint32_t f_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

SLIM_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// GCC/Clang vector extensions: 16 fp32 lanes, lowered to one AVX-512, two AVX2 or four SSE registers by the
// target of the function they are inlined into.
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
static_assert(sizeof(vf) == kLanes * sizeof(float), "16 lanes");

template <typename V, typename S>
SLIM_INLINE V splat(S x) {
  V v;
  for (int l = 0; l < kLanes; ++l) v[l] = x;
  return v;
}

// exp(x) for x <= 80 (NaN and x < -80 give exp(-80), negligible next to the max term 1, and never a subnormal,
// which would cost a microcode assist per lane on many x86 cores): Cody-Waite reduction
// x = n·ln2 + r, |r| <= ln2/2, and the Cephes degree-6 polynomial; relative error below 2e-7. The same code
// runs on one float (tails) and on 16 lanes.
template <typename F, typename U, typename I>
SLIM_INLINE F exp_neg_t(F x) {
  const F lo = F{} - 80.0f;
  x = x > lo ? x : lo;
  const F magic = F{} + 12582912.0f;  // 1.5·2^23: adding it rounds to an integer held in the low mantissa bits
  const F kn = x * 1.44269504088896341f + magic;
  const F n = kn - magic;
  F r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  U kb, mb;
  std::memcpy(&kb, &kn, sizeof(kb));
  std::memcpy(&mb, &magic, sizeof(mb));
  const U e = (kb - mb + 127u) << 23;  // 2^n as fp32 bits (-116 <= n <= 116 after the clamps)
  F scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

SLIM_INLINE float exp_neg(float x) { return exp_neg_t<float, uint32_t, int32_t>(x); }
SLIM_INLINE vf exp_neg(vf x) { return exp_neg_t<vf, vu, vi>(x); }

SLIM_INLINE float f16_to_f32(uint32_t h) {
  const uint32_t em = h & 0x7fffu;
  const float sub = static_cast<float>(static_cast<int32_t>(em)) * 0x1p-24f;  // subnormal (and zero)
  const float norm = bits_f((em << 13) + ((127u - 15u) << 23));
  const float special = bits_f((em << 13) | 0x7f800000u);  // inf / NaN
  const float mag = em < 0x400u ? sub : (em >= 0x7c00u ? special : norm);
  return bits_f(f_bits(mag) | ((h & 0x8000u) << 16));
}

// element i of a row as fp32 (exact: bf16 and fp16 widen without rounding)
template <int DT>
SLIM_INLINE float load_elem(const void* row, int64_t i) {
  if constexpr (DT == kDTypeF32) {
    return static_cast<const float*>(row)[i];
  } else if constexpr (DT == kDTypeBF16) {
    return bits_f(static_cast<uint32_t>(static_cast<const uint16_t*>(row)[i]) << 16);
  } else {
    return f16_to_f32(static_cast<const uint16_t*>(row)[i]);
  }
}

// elements [i, i + 16) of a row as fp32
template <int DT>
SLIM_INLINE vf load_vec(const void* row, int64_t i) {
  vf x;
  if constexpr (DT == kDTypeF32) {
    std::memcpy(&x, static_cast<const float*>(row) + i, sizeof(x));
  } else {
    vh h16;
    std::memcpy(&h16, static_cast<const uint16_t*>(row) + i, sizeof(h16));
    const vu h = __builtin_convertvector(h16, vu);
    if constexpr (DT == kDTypeBF16) {
      const vu b = h << 16;
      std::memcpy(&x, &b, sizeof(x));
    } else {
      const vu em = h & 0x7fffu;
      const vf sub = __builtin_convertvector(em, vf) * 0x1p-24f;
      const vu nb = (em << 13) + ((127u - 15u) << 23);
      const vu sb = (em << 13) | 0x7f800000u;
      vf norm, special;
      std::memcpy(&norm, &nb, sizeof(norm));
      std::memcpy(&special, &sb, sizeof(special));
      const vf mag = em < 0x400u ? sub : (em >= 0x7c00u ? special : norm);
      vu mb;
      std::memcpy(&mb, &mag, sizeof(mb));
      mb |= (h & 0x8000u) << 16;
      std::memcpy(&x, &mb, sizeof(x));
    }
  }
  return x;
}

struct SlotOut {
  int64_t idx;    // greedy argmax / sampled index (-1 when none)
  float m;        // max of z/T
  float s;        // Σ exp(z/T − m)
  float best_zt;  // z/T at the sampled index
  uint32_t bad;   // a NaN or +inf logit was seen
};

// One block: values (z, or z/T when sampling) into `buf` when they are not read in place, the block max of the
// values and whether a logit is NaN or +inf. Returns where the values are.
template <int DT, bool SAMPLE>
SLIM_INLINE const float* block_prepare(const void* row, int64_t b0, int n, float t, float* buf, float& bmax,
                                       uint32_t& bbad) {
  constexpr bool kCopy = SAMPLE || DT != kDTypeF32;
  const vf inf = splat<vf>(INFINITY);
  const vf tv = splat<vf>(t);
  vf lm = -inf;
  vi lb = splat<vi>(0);
  const int nf = n & ~(kLanes - 1);
  for (int i = 0; i < nf; i += kLanes) {
    const vf x = load_vec<DT>(row, b0 + i);
    lb |= ~(x < inf);  // NaN or +inf
    vf y = x;
    if (SAMPLE) y = x / tv;
    if (kCopy) std::memcpy(buf + i, &y, sizeof(y));
    lm = y > lm ? y : lm;
  }
  float mx = -INFINITY;
  uint32_t bd = 0;
  for (int l = 0; l < kLanes; ++l) {
    mx = lm[l] > mx ? lm[l] : mx;
    bd |= static_cast<uint32_t>(lb[l]);
  }
  for (int i = nf; i < n; ++i) {
    const float x = load_elem<DT>(row, b0 + i);
    bd |= (x < INFINITY) ? 0u : 1u;
    const float y = SAMPLE ? x / t : x;
    if (kCopy) buf[i] = y;
    mx = y > mx ? y : mx;
  }
  bmax = mx;
  bbad = bd;
  if constexpr (kCopy) {
    return buf;
  } else {
    return static_cast<const float*>(row) + b0;
  }
}

// Σ exp(z_i − m) over a block, m finite; two independent accumulators
SLIM_INLINE float block_sum_exp(const float* z, int n, float m) {
  const vf mv = splat<vf>(m);
  vf acc0 = splat<vf>(0.0f), acc1 = splat<vf>(0.0f);
  const int nf2 = n & ~(2 * kLanes - 1);
  for (int i = 0; i < nf2; i += 2 * kLanes) {
    vf x0, x1;
    std::memcpy(&x0, z + i, sizeof(x0));
    std::memcpy(&x1, z + i + kLanes, sizeof(x1));
    acc0 += exp_neg(x0 - mv);
    acc1 += exp_neg(x1 - mv);
  }
  acc0 += acc1;
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += acc0[l];
  for (int i = nf2; i < n; ++i) s += exp_neg(z[i] - m);
  return s;
}

SLIM_INLINE uint32_t rng_bits(uint32_t key, uint32_t v) { return mix32(key + v * 0x9E3779B9u); }
SLIM_INLINE vu rng_bits(vu key, vu v) {
  vu x = key + v * 0x9E3779B9u;
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The reference's Gumbel score of element v (u = ((bits >> 9) + 0.5)·2^-23 exactly, g = -log(-log u), fp32
// libm logarithms); updates the best score (ties keep the lower index: elements are visited in index order).
SLIM_INLINE void gumbel_exact(float zt, int64_t v, uint32_t key, float& best, float& best_zt, int64_t& idx) {
  const uint32_t bits = rng_bits(key, static_cast<uint32_t>(v));
  const float u = (static_cast<float>(bits >> 9) + 0.5f) * 0x1p-23f;
  const float g = -std::log(-std::log(u));
  const float sc = zt + g;
  if (sc > best) {
    best = sc;
    best_zt = zt;
    idx = v;
  }
}

SLIM_INLINE bool any_lane(vi m) {
  uint64_t w[kLanes / 2];
  std::memcpy(w, &m, sizeof(w));
  uint64_t acc = 0;
  for (int q = 0; q < kLanes / 2; ++q) acc |= w[q];
  return acc != 0;
}

// Gumbel-max over one block of z/T values. A lane can only win when g > d = best − z/T, d lowered by a slack
// (1e-3 + 1e-6·(|best| + |z/T|)) that covers libm's and fp32's rounding of the exact score. Two vectorised
// filters, both necessary conditions: (1) g <= −log(1 − u) <= −e·ln2 with 2^e <= 1 − u (1 − u is exact and e
// its fp32 exponent): integer work only, and it rejects whole vectors almost always; (2) for the vectors left,
// g > d <=> u > exp(−exp(−d)), evaluated with the polynomial exp and the threshold lowered by 1e-4 (polynomial
// error). Lanes that pass both get the exact score, in index order (ties keep the lower index).
SLIM_INLINE void gumbel_block(const float* z, int n, int64_t b0, uint32_t key, float& best, float& best_zt,
                              int64_t& idx) {
  const int nf = n & ~(kLanes - 1);
  vu lane;
  for (int l = 0; l < kLanes; ++l) lane[l] = static_cast<uint32_t>(l);
  const vu keyv = splat<vu>(key);
  for (int i = 0; i < nf; i += kLanes) {
    vf zt;
    std::memcpy(&zt, z + i, sizeof(zt));
    const vf bestv = splat<vf>(best);
    const vf abs_zt = zt < 0.0f ? -zt : zt;
    const vf d = bestv - zt - (1e-3f + 1e-6f * (abs_zt + (best < 0.0f ? -best : best)));
    const vu bits = rng_bits(keyv, lane + static_cast<uint32_t>(b0 + i));
    const vf u = (__builtin_convertvector((vi)(bits >> 9), vf) + 0.5f) * 0x1p-23f;
    const vf omu = 1.0f - u;  // exact: u = k·2^-24 with k < 2^24
    vu ob;
    std::memcpy(&ob, &omu, sizeof(ob));
    const vi e2 = 127 - (vi)(ob >> 23);  // −e >= 1
    const vf bound = __builtin_convertvector(e2, vf) * 0.693147242f;  // −e·ln2, ln2 rounded up
    const vi nan_d = d != d;  // NaN: let the exact path decide
    const vi pass1 = (bound > d) | nan_d;
    if (!any_lane(pass1)) continue;
    vf neg_d = -d;
    neg_d = neg_d < 80.0f ? neg_d : splat<vf>(80.0f);
    vf ex = exp_neg(neg_d);  // exp(−d), also for −d > 0 (exact exponent arithmetic up to e^80)
    ex = ex > 1e-15f ? ex : splat<vf>(1e-15f);  // exp(−ex) rounds to 1 anyway; keeps the polynomial off subnormals
    const vf th = exp_neg(-ex) * (1.0f - 1e-4f);
    const vi cand = pass1 & ((u > th) | nan_d);
    if (!any_lane(cand)) continue;
    for (int l = 0; l < kLanes; ++l) {
      if (cand[l]) gumbel_exact(z[i + l], b0 + i + l, key, best, best_zt, idx);
    }
  }
  for (int i = nf; i < n; ++i) {
    if (z[i] + kGumbelBound > best) gumbel_exact(z[i], b0 + i, key, best, best_zt, idx);
  }
}

// One slot: greedy (argmax, lowest index among equal maxima) or Gumbel-max with key `key`.
template <int DT, bool SAMPLE>
SLIM_INLINE void scan_slot(const void* row, int64_t V, float t, uint32_t key, SlotOut* out) {
  alignas(64) float buf[kBlock];
  float m = -INFINITY, s = 0.0f, best = -INFINITY, best_zt = -INFINITY;
  int64_t idx = -1;
  uint32_t bad = 0;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, V - b0));
    float bmax;
    uint32_t bbad;
    const float* z = block_prepare<DT, SAMPLE>(row, b0, n, t, buf, bmax, bbad);
    bad |= bbad;
    if (bmax > m) {
      if (!SAMPLE) {
        int first = 0;
        while (first < n && !(z[first] == bmax)) ++first;
        idx = b0 + first;
      }
      s = m == -INFINITY ? 0.0f : s * std::exp(m - bmax);
      m = bmax;
    }
    if (m != -INFINITY) s += block_sum_exp(z, n, m);
    if (SAMPLE && bmax + kGumbelBound > best) gumbel_block(z, n, b0, key, best, best_zt, idx);
  }
  *out = SlotOut{idx, m, s, best_zt, bad};
}

using SlotFn = void (*)(const void*, int64_t, float, uint32_t, SlotOut*);

struct SlotKernels {
  SlotFn fn[3][2];  // [dtype code][sampling]
  const char* isa;
  bool ok;  // runs on this machine
};

#define SLIM_SLOT_KERNELS(SUFFIX, ATTR)                                                                     \
  ATTR void slot_f32_g_##SUFFIX(const void* p, int64_t V, float t, uint32_t k, SlotOut* o) {                \
    scan_slot<kDTypeF32, false>(p, V, t, k, o);                                                             \
  }                                                                                                         \
  ATTR void slot_f32_s_##SUFFIX(const void* p, int64_t V, float t, uint32_t k, SlotOut* o) {                \
    scan_slot<kDTypeF32, true>(p, V, t, k, o);                                                              \
  }                                                                                                         \
  ATTR void slot_f16_g_##SUFFIX(const void* p, int64_t V, float t, uint32_t k, SlotOut* o) {                \
    scan_slot<kDTypeF16, false>(p, V, t, k, o);                                                             \
  }                                                                                                         \
  ATTR void slot_f16_s_##SUFFIX(const void* p, int64_t V, float t, uint32_t k, SlotOut* o) {                \
    scan_slot<kDTypeF16, true>(p, V, t, k, o);                                                              \
  }                                                                                                         \
  ATTR void slot_bf16_g_##SUFFIX(const void* p, int64_t V, float t, uint32_t k, SlotOut* o) {               \
    scan_slot<kDTypeBF16, false>(p, V, t, k, o);                                                            \
  }                                                                                                         \
  ATTR void slot_bf16_s_##SUFFIX(const void* p, int64_t V, float t, uint32_t k, SlotOut* o) {               \
    scan_slot<kDTypeBF16, true>(p, V, t, k, o);                                                             \
  }                                                                                                         \
  SlotKernels kernels_##SUFFIX(const char* isa) {                                                           \
    SlotKernels k{};                                                                                        \
    k.fn[kDTypeF32][0] = slot_f32_g_##SUFFIX;                                                               \
    k.fn[kDTypeF32][1] = slot_f32_s_##SUFFIX;                                                               \
    k.fn[kDTypeF16][0] = slot_f16_g_##SUFFIX;                                                               \
    k.fn[kDTypeF16][1] = slot_f16_s_##SUFFIX;                                                               \
    k.fn[kDTypeBF16][0] = slot_bf16_g_##SUFFIX;                                                             \
    k.fn[kDTypeBF16][1] = slot_bf16_s_##SUFFIX;                                                             \
    k.isa = isa;                                                                                            \
    k.ok = true;                                                                                            \
    return k;                                                                                               \
  }

SLIM_SLOT_KERNELS(base, )
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SLIM_X86_DISPATCH 1
SLIM_SLOT_KERNELS(avx2, __attribute__((target("avx2,fma,bmi,bmi2,f16c,popcnt"))))
SLIM_SLOT_KERNELS(avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi,bmi2,f16c,popcnt"))))
#endif

// [0] baseline, [1] AVX2+FMA, [2] AVX-512; `ok` says whether this machine runs them
const SlotKernels* kernel_table() {
  static const std::array<SlotKernels, 3> table = [] {
    std::array<SlotKernels, 3> t = {kernels_base("baseline"), SlotKernels{}, SlotKernels{}};
    t[1].isa = "avx2";
    t[2].isa = "avx512";
#ifdef SLIM_X86_DISPATCH
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                      __builtin_cpu_supports("popcnt");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    if (avx2) t[1] = kernels_avx2("avx2");
    if (avx512) t[2] = kernels_avx512("avx512");
#endif
    return t;
  }();
  return table.data();
}

// the widest variant this machine runs (isa < 0), or variant `isa` (nullptr when it cannot run here)
const SlotKernels* kernels(int isa) {
  const SlotKernels* t = kernel_table();
  if (isa < 0) return t[2].ok ? &t[2] : (t[1].ok ? &t[1] : &t[0]);
  if (isa > 2 || !t[isa].ok) return nullptr;
  return &t[isa];
}

// SPEC §2.3/§2.4 for one row, in the reference's fp32 order: eligible slots sorted by (c desc, index asc),
// U summed over the above-τ prefix, k clamped to [f, |M|], risk over the committed prefix.
void select_row(const float* c, const bool* eligible, int K, float tau, float b, int32_t f, int strategy,
                bool* commit, int32_t* num, float* risk) {
  int order[kMaxK];
  int n = 0;
  for (int j = 0; j < K; ++j) {
    if (!eligible[j]) continue;
    int q = n++;
    while (q > 0 && c[order[q - 1]] < c[j]) {  // stable: equal confidences keep index order
      order[q] = order[q - 1];
      --q;
    }
    order[q] = j;
  }
  int n_a = 0;
  while (n_a < n && c[order[n_a]] > tau) ++n_a;
  int64_t k;
  if (strategy == 0) {
    int k_b = 0;
    float u = 0.0f;
    for (int q = 0; q < n_a; ++q) {
      u = u + (1.0f - c[order[q]]);
      k_b += (u <= b) ? 1 : 0;
    }
    k = std::max<int64_t>(k_b, f);
  } else if (strategy == 1) {
    k = std::max<int64_t>(n_a, f);
  } else {
    k = f;
  }
  k = std::min<int64_t>(k, n);
  float rk = 0.0f;
  for (int j = 0; j < K; ++j) commit[j] = false;
  for (int q = 0; q < k; ++q) {
    commit[order[q]] = true;
    rk = rk + (1.0f - c[order[q]]);
  }
  *num = static_cast<int32_t>(k);
  *risk = rk;
}

bool valid_select_args(int64_t R, int64_t K, int strategy) {
  return R >= 0 && K >= 0 && K <= kMaxK && strategy >= 0 && strategy <= 2;
}

// Runs body(i) for i in [0, n) on up to n_threads threads (the caller is one of them).
template <typename F>
int parallel_for(int64_t n, int n_threads, F body) {
  std::atomic<int64_t> next{0};
  auto work = [&]() {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      body(i);
    }
  };
  const int64_t want = std::min<int64_t>(std::max(n_threads, 1), n);
  std::vector<std::thread> pool;
  pool.reserve(want > 1 ? static_cast<size_t>(want - 1) : 0);
  for (int64_t w = 1; w < want; ++w) {
    try {
      pool.emplace_back(work);
    } catch (...) {  // fewer threads than asked: the others share the work
      break;
    }
  }
  work();
  for (auto& th : pool) th.join();
  return kTauBudgetCpuOk;
}

}  // namespace

const char* tau_budget_cpu_error_string(int code) {
  switch (code) {
    case kTauBudgetCpuOk:
      return "no error";
    case kTauBudgetCpuInvalidArgument:
      return "invalid argument (shape, dtype code, strategy, temperature, null pointer or an instruction set "
             "this CPU lacks)";
    default:
      return "unknown error code";
  }
}

const char* tau_budget_cpu_isa(int isa) {
  const SlotKernels* k = kernels(isa);
  return k == nullptr ? "" : k->isa;
}

int tau_budget_step_cpu(const void* logits, int dtype, int64_t R, int64_t K, int64_t V, int64_t stride_r,
                        int64_t stride_k, const int64_t* block, int64_t mask_id, const float* tau32, const float* bud,
                        const int32_t* floor, const int64_t* seed, float temperature, int strategy, int n_threads,
                        int isa, int64_t* block_out, bool* commit, int64_t* tokens, float* confidence,
                        int32_t* num_committed, float* risk) {
  const SlotKernels* ks = kernels(isa);
  if (ks == nullptr || !valid_select_args(R, K, strategy) || V < 0 || V > 0x7fffffffLL || !(temperature >= 0.0f) ||
      std::isinf(temperature) || (dtype != kDTypeF32 && dtype != kDTypeF16 && dtype != kDTypeBF16)) {
    return kTauBudgetCpuInvalidArgument;
  }
  if (R == 0) return kTauBudgetCpuOk;
  if (tau32 == nullptr || bud == nullptr || floor == nullptr || num_committed == nullptr || risk == nullptr ||
      (K > 0 && (logits == nullptr || block == nullptr || block_out == nullptr || commit == nullptr ||
                 tokens == nullptr || confidence == nullptr || (temperature > 0.0f && seed == nullptr)))) {
    return kTauBudgetCpuInvalidArgument;
  }
  const bool sample = temperature > 0.0f;
  const SlotFn fn = ks->fn[dtype][sample ? 1 : 0];
  const size_t esize = dtype == kDTypeF32 ? 4 : 2;
  const uint64_t sd = sample ? static_cast<uint64_t>(*seed) : 0;
  const uint32_t lo = static_cast<uint32_t>(sd), hi = static_cast<uint32_t>(sd >> 32);
  const int64_t slots = R * K;
  // below ~256K logits a thread start (tens of microseconds) costs more than it saves
  const int threads = slots * std::max<int64_t>(V, 1) < (int64_t{1} << 18) ? 1 : n_threads;
  parallel_for(slots, threads, [&](int64_t i) {
    const int64_t r = i / K, j = i - r * K;
    const char* row = static_cast<const char*>(logits) + static_cast<size_t>(r * stride_r + j * stride_k) * esize;
    const uint32_t key = mix32(hi ^ mix32(lo + static_cast<uint32_t>(i)));
    SlotOut o;
    fn(row, V, temperature, key, &o);
    const bool valid = !o.bad && o.m != -INFINITY;
    tokens[i] = valid ? o.idx : mask_id;
    confidence[i] = !valid ? NAN : (sample ? std::exp(o.best_zt - o.m) / o.s : 1.0f / o.s);
  });
  for (int64_t r = 0; r < R; ++r) {
    bool eligible[kMaxK];
    const int64_t o = r * K;
    for (int64_t j = 0; j < K; ++j) eligible[j] = block[o + j] == mask_id && !std::isnan(confidence[o + j]);
    select_row(confidence + o, eligible, static_cast<int>(K), tau32[r], bud[r], floor[r], strategy, commit + o,
               num_committed + r, risk + r);
    for (int64_t j = 0; j < K; ++j) block_out[o + j] = commit[o + j] ? tokens[o + j] : block[o + j];
  }
  return kTauBudgetCpuOk;
}

int tau_budget_select_cpu(const float* confidence, const bool* masked, int64_t R, int64_t K, const float* tau32,
                          const float* bud, const int32_t* floor, int strategy, bool* commit, int32_t* num_committed,
                          float* risk) {
  if (!valid_select_args(R, K, strategy)) return kTauBudgetCpuInvalidArgument;
  if (R == 0) return kTauBudgetCpuOk;
  if (tau32 == nullptr || bud == nullptr || floor == nullptr || num_committed == nullptr || risk == nullptr ||
      (K > 0 && (confidence == nullptr || masked == nullptr || commit == nullptr))) {
    return kTauBudgetCpuInvalidArgument;
  }
  for (int64_t r = 0; r < R; ++r) {
    bool eligible[kMaxK];
    const int64_t o = r * K;
    for (int64_t j = 0; j < K; ++j) eligible[j] = masked[o + j] && !std::isnan(confidence[o + j]);
    select_row(confidence + o, eligible, static_cast<int>(K), tau32[r], bud[r], floor[r], strategy, commit + o,
               num_committed + r, risk + r);
  }
  return kTauBudgetCpuOk;
}

}  // namespace slim_ops
