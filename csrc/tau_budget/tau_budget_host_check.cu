// Host emulation of tau_budget_step for CPU tests (tests/ops/test_tau_budget_cuda.py builds it with nvcc as a
// shared library, no GPU needed): the same per-thread scan, combine, finish and selection code as the kernels
// (this file includes tau_budget.cu), with the warp-shuffle / shared-memory reductions replayed in the kernels'
// order. Host pointers; ex2.approx and logf are replaced by the host libm. Not part of the library.
#include "tau_budget/tau_budget.cu"

#include <vector>

namespace slim_ops {
namespace {

template <typename T, int MODE>
void emu_slots(const T* logits, int64_t R, int64_t K, int64_t V, int64_t stride_r, int64_t stride_k, int splits,
               int64_t chunk, const int64_t* seed, float t, float inv_t, TauBudgetPartial* part) {
  SlotState lanes[kSlotThreads];
  SlotState prev[kSlotThreads];
  for (int64_t i_g = 0; i_g < R * K * splits; ++i_g) {
    const int64_t i_slot = i_g / splits, i_split = i_g - i_slot * splits;
    const int64_t i_r = i_slot / K, i_k = i_slot - i_r * K;
    const uint32_t key = MODE == kGreedy ? 0u : slot_key(seed, i_slot);
    const int64_t o_start = i_split * chunk;
    const int64_t o_end = o_start + chunk < V ? o_start + chunk : V;
    for (int tid = 0; tid < kSlotThreads; ++tid) {
      lanes[tid] = slot_scan<T, MODE>(logits + i_r * stride_r + i_k * stride_k, o_start, o_end, tid, t, inv_t, key);
    }
    for (int o = 16; o > 0; o >>= 1) {
      for (int tid = 0; tid < kSlotThreads; ++tid) prev[tid] = lanes[tid];
      for (int tid = 0; tid < kSlotThreads; ++tid) combine(lanes[tid], prev[tid ^ o]);
    }
    SlotState w[32];
    for (int lane = 0; lane < 32; ++lane) w[lane] = lane < kSlotWarps ? lanes[lane * 32] : slot_init();
    for (int o = kSlotWarps / 2; o > 0; o >>= 1) {
      SlotState wp[32];
      for (int lane = 0; lane < 32; ++lane) wp[lane] = w[lane];
      for (int lane = 0; lane < 32; ++lane) combine(w[lane], wp[lane ^ o]);
    }
    part[i_g] = TauBudgetPartial{w[0].m, w[0].s, w[0].score, w[0].zt, w[0].idx, w[0].bad};
  }
}

template <typename T>
void emu_slots_mode(int mode, const void* logits, int64_t R, int64_t K, int64_t V, int64_t stride_r,
                    int64_t stride_k, int splits, int64_t chunk, const int64_t* seed, float t, float inv_t,
                    TauBudgetPartial* part) {
  const T* p = static_cast<const T*>(logits);
  if (mode == kGreedy) {
    emu_slots<T, kGreedy>(p, R, K, V, stride_r, stride_k, splits, chunk, seed, t, inv_t, part);
  } else if (mode == kSampleMul) {
    emu_slots<T, kSampleMul>(p, R, K, V, stride_r, stride_k, splits, chunk, seed, t, inv_t, part);
  } else {
    emu_slots<T, kSampleDiv>(p, R, K, V, stride_r, stride_k, splits, chunk, seed, t, inv_t, part);
  }
}

void emu_rows(const TauBudgetPartial* part, int splits, const float* conf_in, const bool* masked_in, int64_t R,
              int64_t K, const int64_t* block, int64_t mask_id, const float* tau32, const float* bud,
              const int32_t* floor, int strategy, int64_t* block_out, bool* commit, int64_t* tokens,
              float* confidence, int32_t* num_committed, float* risk) {
  for (int64_t i_r = 0; i_r < R; ++i_r) {
    float s_c[kTauBudgetMaxK];
    int s_m[kTauBudgetMaxK], s_order[kTauBudgetMaxK], rank[kTauBudgetMaxK];
    int64_t tok[kTauBudgetMaxK], blk[kTauBudgetMaxK];
    int n_m = 0, n_a = 0;
    for (int j = 0; j < K; ++j) {
      const int64_t o = i_r * K + j;
      float c;
      bool masked;
      if (part != nullptr) {
        finish_slot(part + o * splits, splits, mask_id, tok[j], c);
        blk[j] = block[o];
        tokens[o] = tok[j];
        confidence[o] = c;
        masked = blk[j] == mask_id && !std::isnan(c);
      } else {
        c = conf_in[o];
        masked = masked_in[o] && !std::isnan(c);
      }
      s_c[j] = c;
      s_m[j] = masked ? 1 : 0;
      n_m += masked ? 1 : 0;
      n_a += (masked && c > tau32[i_r]) ? 1 : 0;
    }
    for (int j = 0; j < K; ++j) {
      rank[j] = 0;
      if (s_m[j]) {
        rank[j] = slot_rank(j, s_c[j], static_cast<int>(K), s_c, s_m);
        s_order[rank[j]] = j;
      }
    }
    float rk;
    const int k = row_commits(n_m, n_a, s_c, s_order, bud[i_r], floor[i_r], strategy, rk);
    num_committed[i_r] = k;
    risk[i_r] = rk;
    for (int j = 0; j < K; ++j) {
      const int64_t o = i_r * K + j;
      const bool take = s_m[j] && rank[j] < k;
      commit[o] = take;
      if (part != nullptr) block_out[o] = take ? tok[j] : blk[j];
    }
  }
}

}  // namespace
}  // namespace slim_ops

extern "C" int slim_ops_tau_budget_step_emu(const void* logits, int dtype, int64_t R, int64_t K, int64_t V,
                                            int64_t stride_r, int64_t stride_k, const int64_t* block,
                                            int64_t mask_id, const float* tau32, const float* bud,
                                            const int32_t* floor, const int64_t* seed, float temperature,
                                            int strategy, int splits, int64_t* block_out, bool* commit,
                                            int64_t* tokens, float* confidence, int32_t* num_committed,
                                            float* risk) {
  using namespace slim_ops;
  if (!valid_step_args(R, K, V, strategy, splits, temperature)) return 1;
  int64_t chunk;
  int mode;
  float inv_t;
  plan(V, splits, temperature, chunk, mode, inv_t);
  std::vector<TauBudgetPartial> part(static_cast<size_t>(R * K * splits));
  if (K > 0) {
    switch (dtype) {
      case kDTypeF32:
        emu_slots_mode<float>(mode, logits, R, K, V, stride_r, stride_k, splits, chunk, seed, temperature, inv_t,
                              part.data());
        break;
      case kDTypeF16:
        emu_slots_mode<__half>(mode, logits, R, K, V, stride_r, stride_k, splits, chunk, seed, temperature, inv_t,
                               part.data());
        break;
      case kDTypeBF16:
        emu_slots_mode<__nv_bfloat16>(mode, logits, R, K, V, stride_r, stride_k, splits, chunk, seed, temperature,
                                      inv_t, part.data());
        break;
      default:
        return 1;
    }
  }
  emu_rows(part.data(), splits, nullptr, nullptr, R, K, block, mask_id, tau32, bud, floor, strategy, block_out,
           commit, tokens, confidence, num_committed, risk);
  return 0;
}

extern "C" int slim_ops_tau_budget_select_emu(const float* confidence, const bool* masked, int64_t R, int64_t K,
                                              const float* tau32, const float* bud, const int32_t* floor,
                                              int strategy, bool* commit, int32_t* num_committed, float* risk) {
  using namespace slim_ops;
  if (!valid_step_args(R, K, 0, strategy, 1, 0.0f)) return 1;
  emu_rows(nullptr, 1, confidence, masked, R, K, nullptr, 0, tau32, bud, floor, strategy, nullptr, commit, nullptr,
           nullptr, num_committed, risk);
  return 0;
}
