// Shared declarations for the moco_ext operators (see infonce.cpp for the maths).
#pragma once
#include <ATen/ATen.h>
#include <tuple>

namespace moco_ext {

// Validates q [N,C], k [N,C], queue [C,K] and T; returns (N, C, K).
std::tuple<int64_t, int64_t, int64_t> check_infonce_inputs(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue, double T,
    const char* op);

// Validates queue [C,K], ptr int64 [1], keys [N,C] for enqueue_.
void check_enqueue_inputs(const at::Tensor& queue, const at::Tensor& ptr,
                          const at::Tensor& keys);

// logits = cat([rowwise q.k, q @ queue], 1) / T, written into one [N, 1+K] buffer.
// Built from ATen calls only, so the same code serves CPU and CUDA.
at::Tensor infonce_logits_impl(const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& queue, double T);

// Fused loss on CPU (infonce_cpu.cpp): (loss, n_beat, dq_rows, dk_rows).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> infonce_loss_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue, double T);

// Materialising version of infonce_loss from ATen calls (any device, any float dtype):
// the fallback where no fused kernel applies (float64 on CUDA, C too large for shared memory).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> infonce_loss_composite(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue, double T);

// Float type used for loss / saved gradients: float for fp32/bf16/fp16, double for fp64.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace moco_ext
