#include "logprob/logprob.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

namespace slim_ops {
namespace {

constexpr int kThreads = 512;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }

// online softmax state about the running max m: s = Σ exp(z - m), t = Σ exp(z - m)(z - m)
struct State {
  float m, s, t;
};

__device__ __forceinline__ State merge(State a, State b) {
  const float m = fmaxf(a.m, b.m);
  State r{m, 0.f, 0.f};
  if (a.s > 0.f) {
    const float e = __expf(a.m - m);
    r.s += a.s * e;
    r.t += e * (a.t + (a.m - m) * a.s);
  }
  if (b.s > 0.f) {
    const float e = __expf(b.m - m);
    r.s += b.s * e;
    r.t += e * (b.t + (b.m - m) * b.s);
  }
  return r;
}

// fold VEC values (already scaled by 1/T) into the thread's state: one rescale per vector
template <int VEC>
__device__ __forceinline__ void fold(State& st, const float (&z)[VEC]) {
  float vmax = z[0];
#pragma unroll
  for (int j = 1; j < VEC; ++j) vmax = fmaxf(vmax, z[j]);
  const float m = fmaxf(st.m, vmax);
  if (st.s > 0.f) {
    const float e = __expf(st.m - m);
    st.t = e * (st.t + (st.m - m) * st.s);
    st.s *= e;
  }
  st.m = m;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float zc = z[j] - m;
    const float e = __expf(zc);
    st.s += e;
    st.t += e * zc;
  }
}

template <typename T>
__device__ __forceinline__ int64_t head_elems(const T* p, int64_t V) {
  const uintptr_t mis = reinterpret_cast<uintptr_t>(p) % 16;
  const int64_t h = mis ? static_cast<int64_t>((16 - mis) / sizeof(T)) : 0;
  return h < V ? h : V;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) logprob_fwd_kernel(const T* __restrict__ logits,
                                                              const int64_t* __restrict__ labels,
                                                              float* __restrict__ logp, float* __restrict__ lse,
                                                              float* __restrict__ entropy, int64_t V,
                                                              int64_t row_stride, float inv_t) {
  constexpr int VEC = 16 / sizeof(T);
  const int64_t row = blockIdx.x;
  const T* p = logits + row * row_stride;
  State st{-INFINITY, 0.f, 0.f};
  const int64_t head = head_elems(p, V);
  for (int64_t i = threadIdx.x; i < head; i += kThreads) {
    const float z[1] = {to_f32(p[i]) * inv_t};
    fold<1>(st, z);
  }
  const int64_t nvec = (V - head) / VEC;
  const uint4* pv = reinterpret_cast<const uint4*>(p + head);
  for (int64_t k = threadIdx.x; k < nvec; k += kThreads) {
    const uint4 raw = __ldg(pv + k);
    const T* x = reinterpret_cast<const T*>(&raw);
    float z[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) z[j] = to_f32(x[j]) * inv_t;
    fold<VEC>(st, z);
  }
  for (int64_t i = head + nvec * VEC + threadIdx.x; i < V; i += kThreads) {
    const float z[1] = {to_f32(p[i]) * inv_t};
    fold<1>(st, z);
  }
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
    if (lane == 0) {
      const float log_s = logf(st.s);
      const float l = st.m + log_s;
      const int64_t y = labels[row];
      const float zy = (y >= 0 && y < V) ? to_f32(p[y]) * inv_t : NAN;  // NaN flags a bad label
      logp[row] = zy - l;
      lse[row] = l;
      if (entropy != nullptr) entropy[row] = log_s - st.t / st.s;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) logprob_bwd_kernel(const float* __restrict__ grad,
                                                              const T* __restrict__ logits,
                                                              const int64_t* __restrict__ labels,
                                                              const float* __restrict__ lse, T* __restrict__ out,
                                                              int64_t V, int64_t row_stride, int64_t out_stride,
                                                              float inv_t) {
  constexpr int VEC = 16 / sizeof(T);
  const int64_t row = blockIdx.x;
  const T* p = logits + row * row_stride;
  T* q = out + row * out_stride;
  const float g = grad[row] * inv_t;
  const float l = lse[row];
  const int64_t y = labels[row];
  const bool same_alignment = reinterpret_cast<uintptr_t>(p) % 16 == reinterpret_cast<uintptr_t>(q) % 16;
  const int64_t head = same_alignment ? head_elems(p, V) : V;
  for (int64_t i = threadIdx.x; i < head; i += kThreads) {
    q[i] = from_f32<T>(g * ((i == y ? 1.f : 0.f) - __expf(to_f32(p[i]) * inv_t - l)));
  }
  const int64_t nvec = (V - head) / VEC;
  const uint4* pv = reinterpret_cast<const uint4*>(p + head);
  uint4* qv = reinterpret_cast<uint4*>(q + head);
  for (int64_t k = threadIdx.x; k < nvec; k += kThreads) {
    const uint4 raw = __ldg(pv + k);
    const T* x = reinterpret_cast<const T*>(&raw);
    uint4 res;
    T* r = reinterpret_cast<T*>(&res);
    const int64_t base = head + k * VEC;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      r[j] = from_f32<T>(g * ((base + j == y ? 1.f : 0.f) - __expf(to_f32(x[j]) * inv_t - l)));
    }
    qv[k] = res;
  }
  for (int64_t i = head + nvec * VEC + threadIdx.x; i < V; i += kThreads) {
    q[i] = from_f32<T>(g * ((i == y ? 1.f : 0.f) - __expf(to_f32(p[i]) * inv_t - l)));
  }
}

}  // namespace

cudaError_t logprob_from_logits_fwd(const void* logits, int dtype, const int64_t* labels, float* logp,
                                    float* lse, float* entropy, int64_t N, int64_t V, int64_t row_stride,
                                    float inv_t, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  if (V <= 0 || N > 0x7fffffffLL) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(N));
  switch (dtype) {
    case kFloat32:
      logprob_fwd_kernel<float><<<grid, kThreads, 0, stream>>>(static_cast<const float*>(logits), labels, logp,
                                                               lse, entropy, V, row_stride, inv_t);
      break;
    case kBFloat16:
      logprob_fwd_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(logits), labels, logp, lse, entropy, V, row_stride, inv_t);
      break;
    case kFloat16:
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
    case kFloat32:
      logprob_bwd_kernel<float><<<grid, kThreads, 0, stream>>>(grad, static_cast<const float*>(logits), labels,
                                                               lse, static_cast<float*>(dlogits), V, row_stride,
                                                               out_stride, inv_t);
      break;
    case kBFloat16:
      logprob_bwd_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
          grad, static_cast<const __nv_bfloat16*>(logits), labels, lse, static_cast<__nv_bfloat16*>(dlogits), V,
          row_stride, out_stride, inv_t);
      break;
    case kFloat16:
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
