// Host check of the logprob kernels' per-thread code: the same row_thread_state / merge / row_outputs /
// row_thread_grad functions the kernels call, with kThreads threads, the warp-shuffle xor tree and the block
// merge emulated in order. Not part of the library. Two builds (nvcc, no GPU needed):
//  - an executable (tests/ops/test_masked_logprob.py): rows of every alignment vs a double-precision reference;
//  - with -DSLIM_LOGPROB_HOST_LIB -shared, a library exporting slim_logprob_host_fwd / _bwd, the kernels'
//    emulation on [N, V] host rows (tests/ops/test_masked_logprob_cuda.py compares it with reference.py, NaN /
//    +inf / −inf at every position of the row, i.e. in every thread and vector lane).
#include "logprob/logprob.cu"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

using namespace slim_ops;

namespace {

State block_merge(std::vector<State> st) {  // st has kThreads entries, one per thread
  const int warps = kThreads / 32;
  std::vector<State> warp_state(warps);
  for (int w = 0; w < warps; ++w) {
    State* lanes = st.data() + 32 * w;
    for (int off = 16; off > 0; off >>= 1) {
      State nxt[32];
      for (int l = 0; l < 32; ++l) nxt[l] = merge(lanes[l], lanes[l ^ off]);
      for (int l = 0; l < 32; ++l) lanes[l] = nxt[l];
    }
    warp_state[w] = lanes[0];
  }
  State lanes[32];
  for (int l = 0; l < 32; ++l) lanes[l] = l < warps ? warp_state[l] : State{-INFINITY, 0.f, 0.f};
  for (int off = 16; off > 0; off >>= 1) {
    State nxt[32];
    for (int l = 0; l < 32; ++l) nxt[l] = merge(lanes[l], lanes[l ^ off]);
    for (int l = 0; l < 32; ++l) lanes[l] = nxt[l];
  }
  return lanes[0];
}

uint32_t rng_state = 12345u;
float uniform() {
  rng_state = rng_state * 1664525u + 1013904223u;
  return (rng_state >> 8) * (1.0f / 16777216.0f);
}

int failures = 0, checks = 0;
void expect(bool ok, const char* what, const char* type, int64_t V, int off, double got, double want) {
  ++checks;
  if (!ok && failures++ < 20) {
    std::printf("FAIL %s type=%s V=%lld offset=%d: got %.9g want %.9g\n", what, type, (long long)V, off, got, want);
  }
}

template <typename T>
void check(const char* type, int64_t V, int in_off, int out_off, float inv_t, double grad_tol) {
  std::vector<uint4> in_buf((V + 64) * sizeof(T) / 16 + 2), out_buf((V + 64) * sizeof(T) / 16 + 2);
  T* p = reinterpret_cast<T*>(in_buf.data()) + in_off;
  T* q = reinterpret_cast<T*>(out_buf.data()) + out_off;
  for (int64_t i = 0; i < V; ++i) p[i] = from_f32<T>(8.0f * uniform() - 4.0f);
  if (V > 3) p[V / 3] = from_f32<T>(9.0f);  // a dominant logit
  const int64_t y = (V * 7) / 11;
  // double reference from the stored (rounded) values
  double mx = -1e300;
  for (int64_t i = 0; i < V; ++i) mx = std::fmax(mx, (double)to_f32(p[i]) * inv_t);
  double s = 0, t = 0;
  for (int64_t i = 0; i < V; ++i) {
    const double z = (double)to_f32(p[i]) * inv_t;
    s += std::exp(z - mx);
    t += std::exp(z - mx) * z;
  }
  const double lse = mx + std::log(s);
  const double ent = lse - t / s;
  const double logp = (double)to_f32(p[y]) * inv_t - lse;
  std::vector<State> st(kThreads);
  for (int tid = 0; tid < kThreads; ++tid) st[tid] = row_thread_state(p, V, inv_t, tid, kThreads);
  float o_logp, o_lse, o_ent;
  row_outputs(p, V, y, inv_t, block_merge(st), &o_logp, &o_lse, &o_ent);
  expect(std::fabs(o_logp - logp) <= 1e-4 + 1e-5 * std::fabs(logp), "logp", type, V, in_off, o_logp, logp);
  expect(std::fabs(o_lse - lse) <= 1e-4 + 1e-5 * std::fabs(lse), "lse", type, V, in_off, o_lse, lse);
  expect(std::fabs(o_ent - ent) <= 1e-4 + 1e-5 * std::fabs(ent), "entropy", type, V, in_off, o_ent, ent);
  float o_bad_logp, o_bad_lse;
  row_outputs(p, V, V, inv_t, block_merge(st), &o_bad_logp, &o_bad_lse, (float*)nullptr);
  expect(std::isnan(o_bad_logp), "NaN for label V", type, V, in_off, o_bad_logp, NAN);
  // backward, upstream gradient g
  const float g = -1.7f;
  for (int64_t i = 0; i < V; ++i) q[i] = from_f32<T>(NAN);
  for (int tid = 0; tid < kThreads; ++tid) row_thread_grad(p, q, V, y, g * inv_t, (float)lse, inv_t, tid, kThreads);
  for (int64_t i = 0; i < V; ++i) {
    const double want = (double)g * inv_t * ((i == y ? 1.0 : 0.0) - std::exp((double)to_f32(p[i]) * inv_t - lse));
    const double got = to_f32(q[i]);
    expect(std::fabs(got - want) <= 1e-6 + grad_tol * std::fabs(want), "dlogits", type, V, in_off, got, want);
  }
}

template <typename T>
void check_all(const char* type, double grad_tol) {
  const int vec = 16 / sizeof(T);
  for (int64_t V : {1LL, 7LL, 9LL, 1151LL, 4099LL, 151936LL}) {
    for (int off = 0; off < vec; ++off) {
      check<T>(type, V, off, off, 1.0f, grad_tol);           // same alignment: vector body
      check<T>(type, V, off, (off + 1) % vec, 1.0f / 0.7f, grad_tol);  // different: scalar backward
    }
  }
}

template <typename T>
void host_fwd(const T* logits, const int64_t* labels, float* logp, float* lse, float* ent, int64_t N, int64_t V,
              int64_t row_stride, float inv_t) {
  std::vector<State> st(kThreads);
  for (int64_t r = 0; r < N; ++r) {
    const T* p = logits + r * row_stride;
    for (int tid = 0; tid < kThreads; ++tid) st[tid] = row_thread_state(p, V, inv_t, tid, kThreads);
    row_outputs(p, V, labels[r], inv_t, block_merge(st), logp + r, lse + r, ent ? ent + r : nullptr);
  }
}

template <typename T>
void host_bwd(const float* grad, const T* logits, const int64_t* labels, const float* lse, T* out, int64_t N,
              int64_t V, int64_t row_stride, int64_t out_stride, float inv_t) {
  for (int64_t r = 0; r < N; ++r) {
    for (int tid = 0; tid < kThreads; ++tid) {
      row_thread_grad(logits + r * row_stride, out + r * out_stride, V, labels[r], grad[r] * inv_t, lse[r], inv_t,
                      tid, kThreads);
    }
  }
}

}  // namespace

extern "C" int slim_logprob_host_fwd(const void* logits, int dtype, const int64_t* labels, float* logp, float* lse,
                                     float* ent, int64_t N, int64_t V, int64_t row_stride, float inv_t) {
  switch (dtype) {
    case kDTypeF32:
      host_fwd(static_cast<const float*>(logits), labels, logp, lse, ent, N, V, row_stride, inv_t);
      return 0;
    case kDTypeF16:
      host_fwd(static_cast<const __half*>(logits), labels, logp, lse, ent, N, V, row_stride, inv_t);
      return 0;
    case kDTypeBF16:
      host_fwd(static_cast<const __nv_bfloat16*>(logits), labels, logp, lse, ent, N, V, row_stride, inv_t);
      return 0;
    default:
      return 1;
  }
}

extern "C" int slim_logprob_host_bwd(const float* grad, const void* logits, int dtype, const int64_t* labels,
                                     const float* lse, void* out, int64_t N, int64_t V, int64_t row_stride,
                                     int64_t out_stride, float inv_t) {
  switch (dtype) {
    case kDTypeF32:
      host_bwd(grad, static_cast<const float*>(logits), labels, lse, static_cast<float*>(out), N, V, row_stride,
               out_stride, inv_t);
      return 0;
    case kDTypeF16:
      host_bwd(grad, static_cast<const __half*>(logits), labels, lse, static_cast<__half*>(out), N, V, row_stride,
               out_stride, inv_t);
      return 0;
    case kDTypeBF16:
      host_bwd(grad, static_cast<const __nv_bfloat16*>(logits), labels, lse, static_cast<__nv_bfloat16*>(out), N, V,
               row_stride, out_stride, inv_t);
      return 0;
    default:
      return 1;
  }
}

#ifndef SLIM_LOGPROB_HOST_LIB
int main() {
  check_all<float>("fp32", 1e-5);
  check_all<__nv_bfloat16>("bf16", 8e-3);
  check_all<__half>("fp16", 1e-3);
  if (failures) {
    std::printf("%d of %d checks failed\n", failures, checks);
    return 1;
  }
  std::printf("OK %d checks\n", checks);
  return 0;
}
#endif  // SLIM_LOGPROB_HOST_LIB
