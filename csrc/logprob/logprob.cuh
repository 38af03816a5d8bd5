// Log-prob of each row's label from logits held in memory (docs/objective.md, 'Log-probabilities'), one pass over the row:
//   logp_i = z_{i,y_i} - logsumexp_v z_{i,v},  z = logits / T,  entropy_i = log s - t / s
// with the online state (m, s = Σ exp(z - m), t = Σ exp(z - m)(z - m)) merged across threads.
// Backward: dlogits_{i,v} = g_i / T · ([v = y_i] - exp(z_{i,v} - lse_i)).
// Raw pointers + a stream, no torch headers; every launcher returns a cudaError_t.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#include "dtype_codes.h"

namespace slim_ops {

// logits [N, V] of dtype code `dtype` (csrc/dtype_codes.h; row stride in elements), labels [N] int64,
// logp/lse [N] fp32, entropy [N] fp32 or null.
cudaError_t logprob_from_logits_fwd(const void* logits, int dtype, const int64_t* labels, float* logp,
                                    float* lse, float* entropy, int64_t N, int64_t V, int64_t row_stride,
                                    float inv_t, cudaStream_t stream);

// grad [N] fp32, lse [N] fp32, dlogits [N, V] of the logits dtype (row stride in elements).
cudaError_t logprob_from_logits_bwd(const float* grad, const void* logits, int dtype, const int64_t* labels,
                                    const float* lse, void* dlogits, int64_t N, int64_t V, int64_t row_stride,
                                    int64_t out_stride, float inv_t, cudaStream_t stream);

}  // namespace slim_ops
