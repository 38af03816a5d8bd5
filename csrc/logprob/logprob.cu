#include "logprob/logprob.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <string.h>

namespace slim_ops {
namespace {

constexpr int kThreads = 512;

// The per-thread parts are __host__ __device__ so that csrc/logprob/logprob_host_check.cu can run the
// exact same code on the CPU (thread loop + shuffle-order merges emulated there).
#if defined(__CUDA_ARCH__)
#define SLIM_EXP(x) __expf(x)
#define SLIM_LDG(p) __ldg(p)
#else
#define SLIM_EXP(x) expf(x)
#define SLIM_LDG(p) (*(p))
#endif
#define SLIM_HD __host__ __device__ __forceinline__

SLIM_HD float to_f32(float x) { return x; }
SLIM_HD float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
SLIM_HD float to_f32(__half x) { return __half2float(x); }
template <typename T> SLIM_HD T from_f32(float x);
template <> SLIM_HD float from_f32<float>(float x) { return x; }
template <> SLIM_HD __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> SLIM_HD __half from_f32<__half>(float x) { return __float2half(x); }

// online softmax state about the running max m: s = Σ exp(z - m), t = Σ exp(z - m)(z - m).
// Special values follow torch.logsumexp / softmax (reference.py): a NaN logit makes s NaN, and a NaN s is never
// dropped (only empty states, s == 0, are); an element equal to the max counts exp(0) = 1 even when the max is
// ±inf, so a +inf logit gives lse = +inf and an all −inf row lse = −inf; t turns NaN whenever the row holds a
// ±inf logit, as Σ softmax·z does in the reference (0 · −inf, inf − inf).
struct State {
  float m, s, t;
};

// exp(from − to) for the rescale of a state kept about `from` to the max `to` >= from (1 when equal, also at ±inf)
SLIM_HD float rescale_factor(float from, float to) { return from == to ? 1.f : SLIM_EXP(from - to); }

SLIM_HD State merge(State a, State b) {
  const float m = fmaxf(a.m, b.m);
  State r{m, 0.f, 0.f};
  if (a.s != 0.f) {  // NaN included
    const float e = rescale_factor(a.m, m);
    r.s += a.s * e;
    r.t += e * (a.t + (a.m - m) * a.s);
  }
  if (b.s != 0.f) {
    const float e = rescale_factor(b.m, m);
    r.s += b.s * e;
    r.t += e * (b.t + (b.m - m) * b.s);
  }
  return r;
}

// fold VEC values (already scaled by 1/T) into the thread's state: one rescale per vector
template <int VEC>
SLIM_HD void fold(State& st, const float (&z)[VEC]) {
  float vmax = z[0];
#pragma unroll
  for (int j = 1; j < VEC; ++j) vmax = fmaxf(vmax, z[j]);
  const float m = fmaxf(st.m, vmax);  // NaN-ignoring: a NaN logit reaches s through zc below
  if (st.s != 0.f) {
    const float e = rescale_factor(st.m, m);
    st.t = e * (st.t + (st.m - m) * st.s);
    st.s *= e;
  }
  st.m = m;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float zc = z[j] == m ? 0.f : z[j] - m;
    const float e = SLIM_EXP(zc);
    st.s += e;
    st.t += e * zc;
  }
}

template <typename T>
SLIM_HD int64_t head_elems(const T* p, int64_t V) {
  const uintptr_t mis = reinterpret_cast<uintptr_t>(p) % 16;
  const int64_t h = mis ? static_cast<int64_t>((16 - mis) / sizeof(T)) : 0;
  return h < V ? h : V;
}

// the state of thread `tid` of `nthreads` over one row: scalar head up to 16-byte alignment, 16-byte body,
// scalar tail
template <typename T>
SLIM_HD State row_thread_state(const T* p, int64_t V, float inv_t, int tid, int nthreads) {
  constexpr int VEC = 16 / sizeof(T);
  State st{-INFINITY, 0.f, 0.f};
  const int64_t head = head_elems(p, V);
  for (int64_t i = tid; i < head; i += nthreads) {
    const float z[1] = {to_f32(p[i]) * inv_t};
    fold<1>(st, z);
  }
  const int64_t nvec = (V - head) / VEC;
  const uint4* pv = reinterpret_cast<const uint4*>(p + head);
  for (int64_t k = tid; k < nvec; k += nthreads) {
    const uint4 raw = SLIM_LDG(pv + k);
    T x[VEC];
    memcpy(x, &raw, sizeof(raw));  // register moves on the device; no type punning through pointers
    float z[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) z[j] = to_f32(x[j]) * inv_t;
    fold<VEC>(st, z);
  }
  for (int64_t i = head + nvec * VEC + tid; i < V; i += nthreads) {
    const float z[1] = {to_f32(p[i]) * inv_t};
    fold<1>(st, z);
  }
  return st;
}

// (logp, lse, entropy) of a row from its merged state
template <typename T>
SLIM_HD void row_outputs(const T* p, int64_t V, int64_t y, float inv_t, State st, float* logp, float* lse,
                         float* entropy) {
  const float log_s = logf(st.s);
  const float l = st.m + log_s;
  const float zy = (y >= 0 && y < V) ? to_f32(p[y]) * inv_t : NAN;  // NaN flags a bad label
  *logp = zy - l;
  *lse = l;
  if (entropy != nullptr) *entropy = isinf(st.m) ? NAN : log_s - st.t / st.s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) logprob_fwd_kernel(const T* __restrict__ logits,
                                                              const int64_t* __restrict__ labels,
                                                              float* __restrict__ logp, float* __restrict__ lse,
                                                              float* __restrict__ entropy, int64_t V,
                                                              int64_t row_stride, float inv_t) {
  const int64_t row = blockIdx.x;
  const T* p = logits + row * row_stride;
  State st = row_thread_state(p, V, inv_t, threadIdx.x, kThreads);
  // warp then block merge
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    State o{__shfl_xor_sync(0xffffffffu, st.m, off), __shfl_xor_sync(0xffffffffu, st.s, off),
            __shfl_xor_sync(0xffffffffu, st.t, off)};
    st = merge(st, o);
  }
  __shared__ State warp_state[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_state[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kThreads / 32 ? warp_state[lane] : State{-INFINITY, 0.f, 0.f};
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      State o{__shfl_xor_sync(0xffffffffu, st.m, off), __shfl_xor_sync(0xffffffffu, st.s, off),
              __shfl_xor_sync(0xffffffffu, st.t, off)};
      st = merge(st, o);
    }
    if (lane == 0) row_outputs(p, V, labels[row], inv_t, st, logp + row, lse + row, entropy ? entropy + row : nullptr);
  }
}

// thread `tid` of `nthreads` writes its share of dlogits for one row
template <typename T>
SLIM_HD void row_thread_grad(const T* p, T* q, int64_t V, int64_t y, float g, float l, float inv_t, int tid,
                             int nthreads) {
  constexpr int VEC = 16 / sizeof(T);
  const bool same_alignment = reinterpret_cast<uintptr_t>(p) % 16 == reinterpret_cast<uintptr_t>(q) % 16;
  const int64_t head = same_alignment ? head_elems(p, V) : V;
  for (int64_t i = tid; i < head; i += nthreads) {
    q[i] = from_f32<T>(g * ((i == y ? 1.f : 0.f) - SLIM_EXP(to_f32(p[i]) * inv_t - l)));
  }
  const int64_t nvec = (V - head) / VEC;
  const uint4* pv = reinterpret_cast<const uint4*>(p + head);
  uint4* qv = reinterpret_cast<uint4*>(q + head);
  for (int64_t k = tid; k < nvec; k += nthreads) {
    const uint4 raw = SLIM_LDG(pv + k);
    T x[VEC], r[VEC];
    memcpy(x, &raw, sizeof(raw));
    const int64_t base = head + k * VEC;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      r[j] = from_f32<T>(g * ((base + j == y ? 1.f : 0.f) - SLIM_EXP(to_f32(x[j]) * inv_t - l)));
    }
    uint4 res;
    memcpy(&res, r, sizeof(res));
    qv[k] = res;
  }
  for (int64_t i = head + nvec * VEC + tid; i < V; i += nthreads) {
    q[i] = from_f32<T>(g * ((i == y ? 1.f : 0.f) - SLIM_EXP(to_f32(p[i]) * inv_t - l)));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) logprob_bwd_kernel(const float* __restrict__ grad,
                                                              const T* __restrict__ logits,
                                                              const int64_t* __restrict__ labels,
                                                              const float* __restrict__ lse, T* __restrict__ out,
                                                              int64_t V, int64_t row_stride, int64_t out_stride,
                                                              float inv_t) {
  const int64_t row = blockIdx.x;
  row_thread_grad(logits + row * row_stride, out + row * out_stride, V, labels[row], grad[row] * inv_t, lse[row],
                  inv_t, threadIdx.x, kThreads);
}

}  // namespace

cudaError_t logprob_from_logits_fwd(const void* logits, int dtype, const int64_t* labels, float* logp,
                                    float* lse, float* entropy, int64_t N, int64_t V, int64_t row_stride,
                                    float inv_t, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  if (V <= 0 || N > 0x7fffffffLL) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(N));
  switch (dtype) {
    case kDTypeF32:
      logprob_fwd_kernel<float><<<grid, kThreads, 0, stream>>>(static_cast<const float*>(logits), labels, logp,
                                                               lse, entropy, V, row_stride, inv_t);
      break;
    case kDTypeBF16:
      logprob_fwd_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(logits), labels, logp, lse, entropy, V, row_stride, inv_t);
      break;
    case kDTypeF16:
      logprob_fwd_kernel<__half><<<grid, kThreads, 0, stream>>>(static_cast<const __half*>(logits), labels, logp,
                                                                lse, entropy, V, row_stride, inv_t);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t logprob_from_logits_bwd(const float* grad, const void* logits, int dtype, const int64_t* labels,
                                    const float* lse, void* dlogits, int64_t N, int64_t V, int64_t row_stride,
                                    int64_t out_stride, float inv_t, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  if (V <= 0 || N > 0x7fffffffLL) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(N));
  switch (dtype) {
    case kDTypeF32:
      logprob_bwd_kernel<float><<<grid, kThreads, 0, stream>>>(grad, static_cast<const float*>(logits), labels,
                                                               lse, static_cast<float*>(dlogits), V, row_stride,
                                                               out_stride, inv_t);
      break;
    case kDTypeBF16:
      logprob_bwd_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
          grad, static_cast<const __nv_bfloat16*>(logits), labels, lse, static_cast<__nv_bfloat16*>(dlogits), V,
          row_stride, out_stride, inv_t);
      break;
    case kDTypeF16:
      logprob_bwd_kernel<__half><<<grid, kThreads, 0, stream>>>(grad, static_cast<const __half*>(logits), labels,
                                                                lse, static_cast<__half*>(dlogits), V, row_stride,
                                                                out_stride, inv_t);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace slim_ops
