// Fused τ-budget decode step on the CPU (docs/decode.md; the definition is slim_ops/ops/tau_budget/reference.py):
// raw host pointers in, an error code out, no torch headers, no CUDA.
//
// tau_budget_step_cpu: `n_threads` std::threads (the caller passes torch.get_num_threads()) take slots in turn;
// per slot one pass over the logits in L1-sized blocks: a vectorised max / NaN-+inf scan of the block, the
// first index of a new maximum, then Σexp(z − m) with a polynomial exp (running max rescaled once per block);
// sampling (T > 0) adds Gumbel-max with the counter-based RNG, evaluating the two logarithms only for elements
// whose z/T + 17 can still beat the best score. Then the exact fp32 selection scan per row.
// The hot per-slot loops are compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA) and the baseline, and
// chosen once at run time (__builtin_cpu_supports); other architectures get the portable build only.
#pragma once

#include <cstdint>

namespace slim_ops {

enum TauBudgetCpuStatus : int {
  kTauBudgetCpuOk = 0,
  kTauBudgetCpuInvalidArgument = 1,  // a shape, dtype code, strategy, temperature or pointer is invalid
};

const char* tau_budget_cpu_error_string(int code);

// Variants of the hot loops: isa 0 = x86-64 baseline (or the portable build elsewhere), 1 = AVX2+FMA,
// 2 = AVX-512 (F/VL/BW/DQ); -1 = the widest this CPU supports. Name of variant `isa` ("baseline", "avx2",
// "avx512"), or "" when this CPU cannot run it.
const char* tau_budget_cpu_isa(int isa);

// logits [R,K,V] (element strides stride_r, stride_k, 1) of dtype code `dtype` (csrc/dtype_codes.h),
// block [R,K] int64 contiguous, tau32 / bud [R] fp32, floor [R] int32, seed [1] int64, temperature >= 0 finite
// (0 = greedy), strategy 0 tau_budget / 1 threshold / 2 topk, n_threads >= 1 worker threads (the caller is one),
// isa as in tau_budget_cpu_isa (-1 in production; tests run each variant).
// Outputs (contiguous): block_out [R,K] int64, commit [R,K] bool, tokens [R,K] int64, confidence [R,K] fp32, num_committed [R] int32, risk [R] fp32.
int tau_budget_step_cpu(const void* logits, int dtype, int64_t R, int64_t K, int64_t V, int64_t stride_r,
                        int64_t stride_k, const int64_t* block, int64_t mask_id, const float* tau32, const float* bud,
                        const int32_t* floor, const int64_t* seed, float temperature, int strategy, int n_threads,
                        int isa, int64_t* block_out, bool* commit, int64_t* tokens, float* confidence,
                        int32_t* num_committed, float* risk);

// Selection alone on given confidences: confidence [R,K] fp32, masked [R,K] bool (contiguous) ->
// commit [R,K] bool, num_committed [R] int32, risk [R] fp32.
int tau_budget_select_cpu(const float* confidence, const bool* masked, int64_t R, int64_t K, const float* tau32,
                          const float* bud, const int32_t* floor, int strategy, bool* commit, int32_t* num_committed,
                          float* risk);

}  // namespace slim_ops
