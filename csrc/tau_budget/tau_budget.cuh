// Fused τ-budget decode step (docs/decode.md): raw pointers + stream, no torch headers.
//
// tau_budget_step runs two kernels on `stream`:
//   1. _tau_budget_slot_kernel   one block per (slot, V-split): one pass over the split's logits with 16-byte
//                                vector loads, online max / Σexp, argmax (greedy) or Gumbel-max (T > 0), and
//                                NaN / +inf detection; writes one TauBudgetPartial per (slot, split).
//   2. _tau_budget_row_kernel    one block per row: combines the splits of each slot into (token, confidence),
//                                then masked set, rank sort of ≤ 64 slots, sequential fp32 prefix sum, k, commit
//                                mask, new block, risk and num_committed.
// tau_budget_select runs the row part alone on given confidences and masks.
// Every launcher returns the cudaError_t of its launches (cudaSuccess = 0).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "dtype_codes.h"

namespace slim_ops {

// strategy codes
constexpr int kTauBudgetStrategyTau = 0;
constexpr int kTauBudgetStrategyThreshold = 1;
constexpr int kTauBudgetStrategyTopk = 2;

constexpr int kTauBudgetMaxK = 64;

// One (slot, split) summary of pass 1. 24 bytes.
struct TauBudgetPartial {
  float m;      // max of z/T over the split (-inf when none)
  float s;      // Σ exp(z/T − m) over the split
  float score;  // best score: z (greedy) or z/T + g (sampling)
  float zt;     // z/T at the best score
  int32_t idx;  // vocabulary index of the best score (INT32_MAX when none)
  int32_t bad;  // 1 when the split holds a NaN or +inf logit
};

// Bytes of workspace tau_budget_step needs for `slots` = R·K slots and `splits` V-splits per slot.
inline size_t tau_budget_workspace_bytes(int64_t slots, int64_t splits) {
  return static_cast<size_t>(slots) * static_cast<size_t>(splits) * sizeof(TauBudgetPartial);
}

// logits [R,K,V] of dtype code `dtype` (csrc/dtype_codes.h; element strides stride_r, stride_k, 1),
// block [R,K] int64 contiguous,
// tau32 / bud [R] fp32, floor [R] int32, seed [1] int64 (read on the device), temperature >= 0 (0 = greedy),
// splits >= 1 V-splits per slot, workspace >= tau_budget_workspace_bytes(R*K, splits) bytes.
// Outputs (contiguous): block_out [R,K] int64, commit [R,K] bool, tokens [R,K] int64, confidence [R,K] fp32,
// num_committed [R] int32, risk [R] fp32.
cudaError_t tau_budget_step(const void* logits, int dtype, int64_t R, int64_t K, int64_t V, int64_t stride_r,
                            int64_t stride_k, const int64_t* block, int64_t mask_id, const float* tau32,
                            const float* bud, const int32_t* floor, const int64_t* seed, float temperature,
                            int strategy, int splits, void* workspace, int64_t* block_out, bool* commit,
                            int64_t* tokens, float* confidence, int32_t* num_committed, float* risk,
                            cudaStream_t stream);

// confidence [R,K] fp32 and masked [R,K] bool, contiguous -> commit [R,K] bool, num_committed [R] int32, risk [R].
cudaError_t tau_budget_select(const float* confidence, const bool* masked, int64_t R, int64_t K, const float* tau32,
                              const float* bud, const int32_t* floor, int strategy, bool* commit,
                              int32_t* num_committed, float* risk, cudaStream_t stream);

}  // namespace slim_ops
