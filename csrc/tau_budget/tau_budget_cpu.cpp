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

// Vectors are passed only between always-inline functions: no ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace slim_ops {
namespace {

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
struct SlotOut {
  int64_t idx;    // greedy argmax / sampled index (-1 when none)
  float m;        // max of z/T
  float s;        // Σ exp(z/T − m)
  float best_zt;  // z/T at the sampled index
  uint32_t bad;   // a NaN or +inf logit was seen
};

SLIM_INLINE uint32_t rng_bits(uint32_t key, uint32_t v) { return mix32(key + v * 0x9E3779B9u); }

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


namespace lanes16b {
constexpr int kVBytes = 16;
#include "tau_budget/tau_budget_cpu_lanes.inc"
}  // namespace lanes16b
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
namespace lanes32b {
constexpr int kVBytes = 32;
#include "tau_budget/tau_budget_cpu_lanes.inc"
}  // namespace lanes32b
namespace lanes64b {
constexpr int kVBytes = 64;
#include "tau_budget/tau_budget_cpu_lanes.inc"
}  // namespace lanes64b
#endif

using SlotFn = void (*)(const void*, int64_t, float, uint32_t, SlotOut*);

struct SlotKernels {
  SlotFn fn[3][2];  // [dtype code][sampling]
  const char* isa;
  bool ok;  // runs on this machine
};

#define SLIM_SLOT_KERNELS(SUFFIX, NS, ATTR)                                                                     \
  ATTR void slot_f32_g_##SUFFIX(const void* p, int64_t V, float t, uint32_t k, SlotOut* o) {                \
    NS::scan_slot<kDTypeF32, false>(p, V, t, k, o);                                                             \
  }                                                                                                         \
  ATTR void slot_f32_s_##SUFFIX(const void* p, int64_t V, float t, uint32_t k, SlotOut* o) {                \
    NS::scan_slot<kDTypeF32, true>(p, V, t, k, o);                                                              \
  }                                                                                                         \
  ATTR void slot_f16_g_##SUFFIX(const void* p, int64_t V, float t, uint32_t k, SlotOut* o) {                \
    NS::scan_slot<kDTypeF16, false>(p, V, t, k, o);                                                             \
  }                                                                                                         \
  ATTR void slot_f16_s_##SUFFIX(const void* p, int64_t V, float t, uint32_t k, SlotOut* o) {                \
    NS::scan_slot<kDTypeF16, true>(p, V, t, k, o);                                                              \
  }                                                                                                         \
  ATTR void slot_bf16_g_##SUFFIX(const void* p, int64_t V, float t, uint32_t k, SlotOut* o) {               \
    NS::scan_slot<kDTypeBF16, false>(p, V, t, k, o);                                                            \
  }                                                                                                         \
  ATTR void slot_bf16_s_##SUFFIX(const void* p, int64_t V, float t, uint32_t k, SlotOut* o) {               \
    NS::scan_slot<kDTypeBF16, true>(p, V, t, k, o);                                                             \
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

SLIM_SLOT_KERNELS(base, lanes16b, )
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SLIM_X86_DISPATCH 1
SLIM_SLOT_KERNELS(avx2, lanes32b, __attribute__((target("avx2,fma,bmi,bmi2,f16c,popcnt"))))
SLIM_SLOT_KERNELS(avx512, lanes64b, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi,bmi2,f16c,popcnt"))))
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

// The selection rules of docs/decode.md ('The τ-budget rule', 'Other selection rules') for one row, in the
// reference's fp32 order: eligible slots sorted by (c desc, index asc),
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
