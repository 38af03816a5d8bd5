// pybind11 module slim_ops._C: thin. Pointers arrive as integers, a stream as an integer handle;
// every launcher returns a cudaError_t code (0 = success) that the Python side turns into an error.
// No torch headers: the module links only the static CUDA runtime.
#include <pybind11/pybind11.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <string>

#include "tau_budget/tau_budget.cuh"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "slim_ops CUDA kernels (raw pointers + stream)";
  m.def("error_string", [](int code) { return std::string(cudaGetErrorString(static_cast<cudaError_t>(code))); });

  // ---- tau_budget (csrc/tau_budget) ----
  // (definitions added by the tau_budget CUDA work)
}
