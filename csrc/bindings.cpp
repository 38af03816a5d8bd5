// pybind11 module slim_ops._C: thin. Pointers arrive as integers, a stream as an integer handle; every launcher
// returns an error code (0 = success) that the Python side (slim_ops/_ext.py) turns into an error.
// No torch headers. The CPU kernels are always built; the CUDA kernels only when SLIM_OPS_WITH_CUDA is defined
// (setup.py defines it when nvcc is found), and the module then links the static CUDA runtime.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "dtype_codes.h"
#include "tau_budget/tau_budget_cpu.h"
#ifdef SLIM_OPS_WITH_CUDA
#include <cuda_runtime.h>

#include "logprob/logprob.cuh"
#include "tau_budget/tau_budget.cuh"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "slim_ops kernels: CPU (raw host pointers) and, when built with nvcc, CUDA (raw pointers + stream)";
  py::dict codes;
  codes["float32"] = static_cast<int>(slim_ops::kDTypeF32);
  codes["float16"] = static_cast<int>(slim_ops::kDTypeF16);
  codes["bfloat16"] = static_cast<int>(slim_ops::kDTypeBF16);
  m.attr("dtype_codes") = codes;

  // ---- CPU kernels (csrc/tau_budget/tau_budget_cpu.cpp); the GIL is released while they run ----
  m.def("cpu_error_string", [](int code) { return std::string(slim_ops::tau_budget_cpu_error_string(code)); });
  m.def("tau_budget_cpu_isa", [](int isa) { return std::string(slim_ops::tau_budget_cpu_isa(isa)); });
  m.def(
      "tau_budget_step_cpu",
      [](std::uintptr_t logits, int dtype, int64_t R, int64_t K, int64_t V, int64_t stride_r, int64_t stride_k,
         std::uintptr_t block, int64_t mask_id, std::uintptr_t tau32, std::uintptr_t bud, std::uintptr_t floor,
         std::uintptr_t seed, float temperature, int strategy, int n_threads, int isa, std::uintptr_t block_out,
         std::uintptr_t commit, std::uintptr_t tokens, std::uintptr_t confidence, std::uintptr_t num_committed,
         std::uintptr_t risk) {
        py::gil_scoped_release nogil;
        return slim_ops::tau_budget_step_cpu(
            reinterpret_cast<const void*>(logits), dtype, R, K, V, stride_r, stride_k,
            reinterpret_cast<const int64_t*>(block), mask_id, reinterpret_cast<const float*>(tau32),
            reinterpret_cast<const float*>(bud), reinterpret_cast<const int32_t*>(floor),
            reinterpret_cast<const int64_t*>(seed), temperature, strategy, n_threads, isa,
            reinterpret_cast<int64_t*>(block_out), reinterpret_cast<bool*>(commit), reinterpret_cast<int64_t*>(tokens),
            reinterpret_cast<float*>(confidence), reinterpret_cast<int32_t*>(num_committed),
            reinterpret_cast<float*>(risk));
      },
      "Fused decode step on the CPU (csrc/tau_budget/tau_budget_cpu.cpp): raw host pointers, returns an error code.");
  m.def(
      "tau_budget_select_cpu",
      [](std::uintptr_t confidence, std::uintptr_t masked, int64_t R, int64_t K, std::uintptr_t tau32,
         std::uintptr_t bud, std::uintptr_t floor, int strategy, std::uintptr_t commit, std::uintptr_t num_committed,
         std::uintptr_t risk) {
        py::gil_scoped_release nogil;
        return slim_ops::tau_budget_select_cpu(
            reinterpret_cast<const float*>(confidence), reinterpret_cast<const bool*>(masked), R, K,
            reinterpret_cast<const float*>(tau32), reinterpret_cast<const float*>(bud),
            reinterpret_cast<const int32_t*>(floor), strategy, reinterpret_cast<bool*>(commit),
            reinterpret_cast<int32_t*>(num_committed), reinterpret_cast<float*>(risk));
      },
      "Selection of a decode step on given confidences, on the CPU; returns an error code.");

#ifdef SLIM_OPS_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("error_string", [](int code) { return std::string(cudaGetErrorString(static_cast<cudaError_t>(code))); });

  // ---- tau_budget (csrc/tau_budget) ----
  m.def("tau_budget_workspace_bytes", [](int64_t slots, int64_t splits) {
    return static_cast<int64_t>(slim_ops::tau_budget_workspace_bytes(slots, splits));
  });
  m.def(
      "tau_budget_step",
      [](std::uintptr_t logits, int dtype, int64_t R, int64_t K, int64_t V, int64_t stride_r, int64_t stride_k,
         std::uintptr_t block, int64_t mask_id, std::uintptr_t tau32, std::uintptr_t bud, std::uintptr_t floor,
         std::uintptr_t seed, float temperature, int strategy, int splits, std::uintptr_t workspace,
         std::uintptr_t block_out, std::uintptr_t commit, std::uintptr_t tokens, std::uintptr_t confidence,
         std::uintptr_t num_committed, std::uintptr_t risk, std::uintptr_t stream) {
        return static_cast<int>(slim_ops::tau_budget_step(
            reinterpret_cast<const void*>(logits), dtype, R, K, V, stride_r, stride_k,
            reinterpret_cast<const int64_t*>(block), mask_id, reinterpret_cast<const float*>(tau32),
            reinterpret_cast<const float*>(bud), reinterpret_cast<const int32_t*>(floor),
            reinterpret_cast<const int64_t*>(seed), temperature, strategy, splits, reinterpret_cast<void*>(workspace),
            reinterpret_cast<int64_t*>(block_out), reinterpret_cast<bool*>(commit),
            reinterpret_cast<int64_t*>(tokens), reinterpret_cast<float*>(confidence),
            reinterpret_cast<int32_t*>(num_committed), reinterpret_cast<float*>(risk),
            reinterpret_cast<cudaStream_t>(stream)));
      },
      "Fused decode step (csrc/tau_budget): raw device pointers, returns a cudaError_t code.");
  m.def(
      "tau_budget_select",
      [](std::uintptr_t confidence, std::uintptr_t masked, int64_t R, int64_t K, std::uintptr_t tau32,
         std::uintptr_t bud, std::uintptr_t floor, int strategy, std::uintptr_t commit, std::uintptr_t num_committed,
         std::uintptr_t risk, std::uintptr_t stream) {
        return static_cast<int>(slim_ops::tau_budget_select(
            reinterpret_cast<const float*>(confidence), reinterpret_cast<const bool*>(masked), R, K,
            reinterpret_cast<const float*>(tau32), reinterpret_cast<const float*>(bud),
            reinterpret_cast<const int32_t*>(floor), strategy, reinterpret_cast<bool*>(commit),
            reinterpret_cast<int32_t*>(num_committed), reinterpret_cast<float*>(risk),
            reinterpret_cast<cudaStream_t>(stream)));
      },
      "Selection of a decode step on given confidences (csrc/tau_budget); returns a cudaError_t code.");

  // ---- logprob (csrc/logprob) ----
  m.def(
      "logprob_from_logits",
      [](std::uintptr_t logits, int dtype, std::uintptr_t labels, std::uintptr_t logp, std::uintptr_t lse,
         std::uintptr_t entropy, int64_t N, int64_t V, int64_t row_stride, float inv_t, std::uintptr_t stream) {
        return static_cast<int>(slim_ops::logprob_from_logits_fwd(
            reinterpret_cast<const void*>(logits), dtype, reinterpret_cast<const int64_t*>(labels),
            reinterpret_cast<float*>(logp), reinterpret_cast<float*>(lse), reinterpret_cast<float*>(entropy), N, V,
            row_stride, inv_t, reinterpret_cast<cudaStream_t>(stream)));
      },
      "Label log-prob (+ logsumexp, entropy) from logits, one pass (csrc/logprob); returns a cudaError_t code.");
  m.def(
      "logprob_from_logits_bwd",
      [](std::uintptr_t grad, std::uintptr_t logits, int dtype, std::uintptr_t labels, std::uintptr_t lse,
         std::uintptr_t dlogits, int64_t N, int64_t V, int64_t row_stride, int64_t out_stride, float inv_t,
         std::uintptr_t stream) {
        return static_cast<int>(slim_ops::logprob_from_logits_bwd(
            reinterpret_cast<const float*>(grad), reinterpret_cast<const void*>(logits), dtype,
            reinterpret_cast<const int64_t*>(labels), reinterpret_cast<const float*>(lse),
            reinterpret_cast<void*>(dlogits), N, V, row_stride, out_stride, inv_t,
            reinterpret_cast<cudaStream_t>(stream)));
      },
      "dlogits = g/T (onehot - softmax) (csrc/logprob); returns a cudaError_t code.");
#else
  m.attr("with_cuda") = false;
#endif
}
