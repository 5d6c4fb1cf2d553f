// Fused MoCo InfoNCE loss on CPU: loss, top-k counts and the per-row gradients in
// one pass over the queue, without the [N, 1+K] logits.
//
// For row i with positive v_0 = k_i and negatives v_j = queue[:, j-1] (j = 1..K):
//   l_ij = q_i.v_j / T,  lse_i = log sum_j exp(l_ij),  loss_i = lse_i - l_i0
//   dq_rows_i = d loss_i / d q_i = (sum_j p_ij v_j - k_i) / T,  p_ij = exp(l_ij - lse_i)
//   dk_rows_i = d loss_i / d k_i = (p_i0 - 1) q_i / T
//   n_beat_i  = #{ j >= 1 : l_ij > l_i0 }   (acc@1: n_beat == 0, acc@5: n_beat < 5)
// The queue is read in column tiles. Per tile: S = (q/T) @ V (GEMM), an online
// max/sum update of (m, l) per row (acc is rescaled by exp(m_old - m_new)), then
// acc += exp(S - m) @ V^T (GEMM). The row updates are split across threads; the
// GEMMs use BLAS's own threads.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "infonce.h"

namespace moco_ext {
namespace {

// Few, large tiles: each tile costs three fork/joins (two BLAS calls, one row update),
// which dominate on a busy machine; the 4 MiB score tile still stays in the last-level cache.
constexpr int64_t kTile = 4096;     // queue columns per tile
constexpr int64_t kRowBlock = 256;  // rows per GEMM; S tile is 256*4096*4 B = 4 MiB

// exp(x) for x <= 0 in float, written so that the compiler can vectorise it
// (needs -fno-trapping-math for the float->int conversion):
// x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 Taylor polynomial (rel. err ~1e-7).
inline __attribute__((always_inline)) float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;                         // keeps 2^n a normal float
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;       // round to nearest integer
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);  // 2^n
}
inline __attribute__((always_inline)) double exp_nonpos(double x) { return std::exp(x); }

// One tile row: s[0..n) are logits. Updates the running max m and sum l, counts
// logits above pos, overwrites s with exp(s - m_new); returns exp(m_old - m_new).
template <typename T>
inline __attribute__((always_inline)) T row_update_body(T* s, int64_t n, T pos, T* m,
                                                       T* l, int64_t* cnt) {
  T mx = *m;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  int64_t c = 0;
#pragma omp simd reduction(+ : c)
  for (int64_t j = 0; j < n; ++j) c += s[j] > pos ? 1 : 0;
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const T e = exp_nonpos(s[j] - mx);
    s[j] = e;
    sum += e;
  }
  const T scale = exp_nonpos(*m - mx);
  *l = *l * scale + sum;
  *m = mx;
  *cnt += c;
  return scale;
}

// The float version is compiled twice (AVX2+FMA and baseline), picked at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("arch=haswell", "default")))
#endif
float row_update(float* s, int64_t n, float pos, float* m, float* l, int64_t* cnt) {
  return row_update_body<float>(s, n, pos, m, l, cnt);
}
double row_update(double* s, int64_t n, double pos, double* m, double* l, int64_t* cnt) {
  return row_update_body<double>(s, n, pos, m, l, cnt);
}

template <typename T>
void loss_kernel(const at::Tensor& qs, const at::Tensor& k, const at::Tensor& queue,
                 T inv_t, at::Tensor& loss, at::Tensor& n_beat, at::Tensor& dq,
                 at::Tensor& dk) {
  const int64_t N = qs.size(0), C = qs.size(1), K = queue.size(1);
  const T* qs_p = qs.data_ptr<T>();
  const T* k_p = k.data_ptr<T>();
  T* loss_p = loss.data_ptr<T>();
  int64_t* nb_p = n_beat.data_ptr<int64_t>();
  T* dq_p = dq.data_ptr<T>();
  T* dk_p = dk.data_ptr<T>();
  at::Tensor s = at::empty({std::min(kRowBlock, N), kTile}, qs.options());
  std::vector<T> m(kRowBlock), l(kRowBlock), pos(kRowBlock);
  std::vector<int64_t> cnt(kRowBlock);

  // The GEMMs are called from this thread and parallelised inside BLAS; only the row
  // updates run in at::parallel_for. (BLAS calls inside a parallel region oversubscribe
  // the cores: 10x slower on a loaded 2-core machine.)
  for (int64_t rb = 0; rb < N; rb += kRowBlock) {
    const int64_t R = std::min(kRowBlock, N - rb);
    at::Tensor qb = qs.narrow(0, rb, R);                           // (R, C)
    at::Tensor acc = k.narrow(0, rb, R).clone();                   // (R, C): sum_j e^{l_j-m} v_j
    T* acc_p = acc.data_ptr<T>();
    for (int64_t r = 0; r < R; ++r) {                              // start from the positive
      T d = 0;
      for (int64_t c = 0; c < C; ++c) d += qs_p[(rb + r) * C + c] * k_p[(rb + r) * C + c];
      pos[r] = d;  m[r] = d;  l[r] = 1;  cnt[r] = 0;
    }
    at::Tensor sr = s.narrow(0, 0, R);
    for (int64_t j0 = 0; j0 < K; j0 += kTile) {
      const int64_t B = std::min(kTile, K - j0);
      at::Tensor v = queue.narrow(1, j0, B);                       // (C, B)
      at::Tensor sb = sr.narrow(1, 0, B);                          // (R, B), row stride kTile
      at::mm_out(sb, qb, v);                                       // logits of this tile
      T* s_p = s.data_ptr<T>();
      at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const T scale = row_update(s_p + r * kTile, B, pos[r], &m[r], &l[r], &cnt[r]);
          if (scale != T(1)) {
            T* a = acc_p + r * C;
            for (int64_t c = 0; c < C; ++c) a[c] *= scale;
          }
        }
      });
      acc.addmm_(sb, v.t());                                       // acc += P (R,B) @ V^T (B,C)
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = rb + r;
      const T inv_l = T(1) / l[r];
      loss_p[i] = m[r] + std::log(l[r]) - pos[r];
      nb_p[i] = cnt[r];
      const T p0 = std::exp(pos[r] - m[r]) * inv_l;
      for (int64_t c = 0; c < C; ++c) {
        dq_p[i * C + c] = (acc_p[r * C + c] * inv_l - k_p[i * C + c]) * inv_t;
        dk_p[i * C + c] = (p0 - T(1)) * qs_p[i * C + c];  // qs = q / T
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> infonce_loss_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue, double T) {
  auto [N, C, K] = check_infonce_inputs(q, k, queue, T, "infonce_loss");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "infonce_loss: the CPU kernel supports float32 and float64, got ",
              q.scalar_type());
  at::Tensor loss = at::empty({N}, q.options());
  at::Tensor n_beat = at::empty({N}, q.options().dtype(at::kLong));
  at::Tensor dq = at::empty({N, C}, q.options());
  at::Tensor dk = at::empty({N, C}, q.options());
  if (N == 0) return {loss, n_beat, dq, dk};
  // q and k are small ([N, C]): contiguous copies are cheap. The queue is read in place.
  at::Tensor qs = q.mul(1.0 / T).contiguous();
  at::Tensor kc = k.contiguous();
  if (q.scalar_type() == at::kFloat)
    loss_kernel<float>(qs, kc, queue, static_cast<float>(1.0 / T), loss, n_beat, dq, dk);
  else
    loss_kernel<double>(qs, kc, queue, 1.0 / T, loss, n_beat, dq, dk);
  return {loss, n_beat, dq, dk};
}

}  // namespace moco_ext
