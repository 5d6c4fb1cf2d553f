// moco_ext: MoCo queue InfoNCE as PyTorch custom operators.
//
// He et al. 2020 (arXiv 1911.05722v3), Eq. (1), per query row i:
//   L_i = -log( exp(q_i.k_i / T) / (exp(q_i.k_i / T) + sum_j exp(q_i.queue[:, j] / T)) )
// with q, k [N, C], the key queue [C, K] (MoCo's buffer layout) and temperature T.
// The logits row is l_i = [q_i.k_i, q_i.queue[:, 0..K-1]] / T and the label is 0.
//
// This file holds the operator schemas, the input checks, the materialising
// logits op and loss fallback (ATen calls, shared by CPU and CUDA) and the CPU enqueue. The fused
// loss lives in infonce_cpu.cpp and infonce_cuda.cu.
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "infonce.h"

// An empty Python module so that `import moco_ext._C` loads this library and runs
// the TORCH_LIBRARY initialisers below (no pybind11, as in pytorch/extension-cpp).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
}

namespace moco_ext {

static bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

std::tuple<int64_t, int64_t, int64_t> check_infonce_inputs(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue, double T,
    const char* op) {
  TORCH_CHECK(q.dim() == 2, op, ": q must be 2-D [N, C], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 2, op, ": k must be 2-D [N, C], got shape ", k.sizes());
  TORCH_CHECK(queue.dim() == 2, op, ": queue must be 2-D [C, K], got shape ", queue.sizes());
  TORCH_CHECK(q.sizes() == k.sizes(), op, ": q and k must have the same shape [N, C], got ",
              q.sizes(), " and ", k.sizes());
  TORCH_CHECK(queue.size(0) == q.size(1), op, ": queue must be [C, K] with C = q.size(1) = ",
              q.size(1), ", got queue shape ", queue.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == queue.scalar_type(),
              op, ": q, k and queue must have the same dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), " and ", queue.scalar_type());
  TORCH_CHECK(supported_dtype(q.scalar_type()), op,
              ": dtype must be float32, float64, bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(q.device() == k.device() && q.device() == queue.device(), op,
              ": q, k and queue must be on the same device, got ", q.device(), ", ",
              k.device(), " and ", queue.device());
  TORCH_CHECK(std::isfinite(T) && T > 0, op, ": temperature T must be finite and > 0, got ", T);
  // A strided queue is read tile by tile; with no unit stride every GEMM would copy
  // it, so refuse instead of hiding a queue-sized copy.
  TORCH_CHECK(queue.numel() == 0 || queue.stride(1) == 1 || queue.stride(0) == 1, op,
              ": queue must have unit stride along one dimension (e.g. the [C, K] buffer "
              "or its transpose); got strides ", queue.strides(),
              ". Call .contiguous() yourself if the copy is intended.");
  return {q.size(0), q.size(1), queue.size(1)};
}

void check_enqueue_inputs(const at::Tensor& queue, const at::Tensor& ptr,
                          const at::Tensor& keys) {
  TORCH_CHECK(queue.dim() == 2, "enqueue_: queue must be 2-D [C, K], got shape ", queue.sizes());
  TORCH_CHECK(keys.dim() == 2, "enqueue_: keys must be 2-D [N, C], got shape ", keys.sizes());
  TORCH_CHECK(keys.size(1) == queue.size(0), "enqueue_: keys must be [N, C] with C = ",
              queue.size(0), " (queue.size(0)), got keys shape ", keys.sizes());
  TORCH_CHECK(keys.scalar_type() == queue.scalar_type(),
              "enqueue_: keys and queue must have the same dtype, got ", keys.scalar_type(),
              " and ", queue.scalar_type());
  TORCH_CHECK(ptr.scalar_type() == at::kLong, "enqueue_: ptr must be int64, got ",
              ptr.scalar_type());
  TORCH_CHECK(ptr.dim() == 1 && ptr.size(0) == 1, "enqueue_: ptr must have shape [1], got ",
              ptr.sizes());
  TORCH_CHECK(queue.device() == ptr.device() && queue.device() == keys.device(),
              "enqueue_: queue, ptr and keys must be on the same device, got ", queue.device(),
              ", ", ptr.device(), " and ", keys.device());
  TORCH_CHECK(keys.size(0) <= queue.size(1), "enqueue_: batch N = ", keys.size(0),
              " exceeds the queue length K = ", queue.size(1));
}

at::Tensor infonce_logits_impl(const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& queue, double T) {
  auto [N, C, K] = check_infonce_inputs(q, k, queue, T, "infonce_logits");
  const double inv_t = 1.0 / T;
  at::Tensor out = at::empty({N, 1 + K}, q.options());
  if (N == 0) return out;
  // Negatives straight into columns 1..K: one GEMM, alpha = 1/T, beta = 0 (out ignored).
  at::Tensor neg = out.narrow(1, 1, K);
  if (K > 0) at::addmm_out(neg, neg, q, queue, /*beta=*/0, /*alpha=*/inv_t);
  // Positive logit in column 0, accumulated in float (or double).
  const auto acc = acc_dtype(q.scalar_type());
  out.select(1, 0).copy_(at::sum(q.to(acc) * k.to(acc), {1}).mul_(inv_t));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> infonce_loss_composite(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue, double T) {
  auto [N, C, K] = check_infonce_inputs(q, k, queue, T, "infonce_loss");
  const auto acc = acc_dtype(q.scalar_type());
  at::Tensor qa = q.to(acc), ka = k.to(acc), va = queue.to(acc);
  at::Tensor logits = infonce_logits_impl(qa, ka, va, T);          // (N, 1+K)
  at::Tensor pos = logits.select(1, 0);                            // (N,)
  at::Tensor lse = at::logsumexp(logits, {1});                     // (N,)
  at::Tensor n_beat = logits.narrow(1, 1, K).gt(pos.unsqueeze(1)).sum(1);
  at::Tensor p = at::exp(logits - lse.unsqueeze(1));               // softmax (N, 1+K)
  at::Tensor p0m1 = p.narrow(1, 0, 1) - 1;                         // (N, 1)
  at::Tensor dq = at::addmm(p0m1 * ka, p.narrow(1, 1, K), va.t()).div_(T);
  at::Tensor dk = (p0m1 * qa).div_(T);
  return {lse - pos, n_beat, dq, dk};
}

// queue[:, (ptr + i) % K] = keys[i], then ptr = (ptr + N) % K. At most two column
// blocks are written. (Reads ptr on the host: the CPU kernel only.)
static void enqueue_cpu(at::Tensor& queue, at::Tensor& ptr, const at::Tensor& keys) {
  check_enqueue_inputs(queue, ptr, keys);
  const int64_t N = keys.size(0), K = queue.size(1);
  if (N == 0) return;
  const int64_t p = ptr.item<int64_t>();
  TORCH_CHECK(p >= 0 && p < K, "enqueue_: ptr must be in [0, K) = [0, ", K, "), got ", p);
  const int64_t first = std::min(N, K - p);
  queue.narrow(1, p, first).copy_(keys.narrow(0, 0, first).t());
  if (N > first) queue.narrow(1, 0, N - first).copy_(keys.narrow(0, first, N - first).t());
  ptr.fill_((p + N) % K);
}

// The CUDA code objects in this library, e.g. "sm_80,sm_90,compute_90" (compute_XY: PTX); empty without
// CUDA kernels. moco_ext/_build.py passes the list; moco_ext.unusable_reason checks a GPU against it.
#define MOCO_EXT_STR_(...) #__VA_ARGS__
#define MOCO_EXT_STR(...) MOCO_EXT_STR_(__VA_ARGS__)
static std::string cuda_archs() {
#ifdef WITH_CUDA
#ifndef MOCO_EXT_CUDA_ARCHS
#error "WITH_CUDA needs MOCO_EXT_CUDA_ARCHS (moco_ext/_build.py: compile_flags)"
#endif
  return MOCO_EXT_STR(MOCO_EXT_CUDA_ARCHS);
#else
  return "";
#endif
}

}  // namespace moco_ext

TORCH_LIBRARY(moco_ext, m) {
  m.def("infonce_logits(Tensor q, Tensor k, Tensor queue, float T) -> Tensor");
  // Returns (loss [N], n_beat [N] int64, dq_rows [N, C], dk_rows [N, C]); see infonce_cpu.cpp.
  m.def("infonce_loss(Tensor q, Tensor k, Tensor queue, float T) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("enqueue(Tensor(a!) queue, Tensor(b!) ptr, Tensor keys) -> ()");
  m.def("cuda_archs() -> str", &moco_ext::cuda_archs);
}

TORCH_LIBRARY_IMPL(moco_ext, CPU, m) {
  m.impl("infonce_logits", &moco_ext::infonce_logits_impl);
  m.impl("infonce_loss", &moco_ext::infonce_loss_cpu);
  m.impl("enqueue", &moco_ext::enqueue_cpu);
}
