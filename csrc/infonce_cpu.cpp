// Fused MoCo InfoNCE loss on CPU: loss, top-k counts and the per-row gradients in
// one pass over the queue, without the [N, 1+K] logits.
//
// For row i with positive v_0 = k_i and negatives v_j = queue[:, j-1] (j = 1..K):
//   l_ij = q_i.v_j / T,  lse_i = log sum_j exp(l_ij),  loss_i = lse_i - l_i0
//   dq_rows_i = d loss_i / d q_i = (sum_j p_ij v_j - k_i) / T,  p_ij = exp(l_ij - lse_i)
//   dk_rows_i = d loss_i / d k_i = (p_i0 - 1) q_i / T
//   n_beat_i  = #{ j >= 1 : l_ij > l_i0 }   (acc@1: n_beat == 0, acc@5: n_beat < 5)
// The queue is read in column tiles. Per tile: S^T = V^T @ (q/T)^T (GEMM, scores stored
// transposed), an online max/sum update of (m, l) per row (acc is rescaled by
// exp(m_old - m_new)), then acc += exp(S - m) @ V^T (GEMM). The row updates are split across threads; the
// GEMMs use BLAS's own threads.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "infonce.h"

namespace moco_ext {
namespace {

// Tiles of 2048 columns: each tile costs three fork/joins (two BLAS calls, one update);
// measured on the 2-core machine, 2048 beat 1024 and 4096 for the GEMM shapes used here.
constexpr int64_t kTile = 2048;     // queue columns per tile
constexpr int64_t kRowBlock = 256;  // rows per GEMM; S tile is 2048*256*4 B = 2 MiB

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

// One tile of scores, stored transposed: st[j * R + r] = s_{r, j0+j} for queue columns
// j < n and rows r0 <= r < r1. The inner loops run along r (contiguous), so they
// vectorise across query rows. Per row: new running max, count of scores above the
// positive, st <- exp(st - m_new), l <- l * exp(m_old - m_new) + sum; scale[r] returns
// exp(m_old - m_new) for rescaling the accumulator.
template <typename T>
inline __attribute__((always_inline)) void tile_update_body(T* st, int64_t n, int64_t R,
                                                           int64_t r0, int64_t r1, const T* pos,
                                                           T* m, T* l, int64_t* cnt, T* mx,
                                                           T* sum, T* scale) {
  for (int64_t r = r0; r < r1; ++r) { mx[r] = m[r]; sum[r] = 0; }
  for (int64_t j = 0; j < n; ++j) {
    const T* row = st + j * R;
#pragma omp simd
    for (int64_t r = r0; r < r1; ++r) {
      mx[r] = row[r] > mx[r] ? row[r] : mx[r];
      cnt[r] += row[r] > pos[r] ? 1 : 0;
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    T* row = st + j * R;
#pragma omp simd
    for (int64_t r = r0; r < r1; ++r) {
      const T e = exp_nonpos(row[r] - mx[r]);
      row[r] = e;
      sum[r] += e;
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    scale[r] = exp_nonpos(m[r] - mx[r]);
    l[r] = l[r] * scale[r] + sum[r];
    m[r] = mx[r];
  }
}

// The float version is compiled twice (AVX2+FMA and baseline), picked at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("arch=haswell", "default")))
#endif
void tile_update(float* st, int64_t n, int64_t R, int64_t r0, int64_t r1, const float* pos,
                 float* m, float* l, int64_t* cnt, float* mx, float* sum, float* scale) {
  tile_update_body<float>(st, n, R, r0, r1, pos, m, l, cnt, mx, sum, scale);
}
void tile_update(double* st, int64_t n, int64_t R, int64_t r0, int64_t r1, const double* pos,
                 double* m, double* l, int64_t* cnt, double* mx, double* sum, double* scale) {
  tile_update_body<double>(st, n, R, r0, r1, pos, m, l, cnt, mx, sum, scale);
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
  const int64_t RB = std::min(kRowBlock, N);
  at::Tensor st_buf = at::empty({kTile * RB}, qs.options());  // transposed score tile
  at::Tensor vt_buf = at::empty({kTile, C}, qs.options());    // tile of the queue as [B, C]
  std::vector<T> m(RB), l(RB), pos(RB), mx(RB), sum(RB), scale(RB);
  std::vector<int64_t> cnt(RB);

  // The GEMMs are called from this thread and parallelised inside BLAS; only the tile
  // updates run in at::parallel_for. (BLAS calls inside a parallel region oversubscribe
  // the cores.) Scores are computed transposed, S^T = V^T Q^T ([B, R]): with the long
  // dimension B as the GEMM's M, MKL runs this shape markedly faster than Q V ([R, B]).
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
    for (int64_t j0 = 0; j0 < K; j0 += kTile) {
      const int64_t B = std::min(kTile, K - j0);
      at::Tensor vt = vt_buf.narrow(0, 0, B);                      // (B, C)
      vt.copy_(queue.narrow(1, j0, B).t());                        // small copy, contiguous rows
      at::Tensor st = st_buf.narrow(0, 0, B * R).view({B, R});     // (B, R)
      at::mm_out(st, vt, qb.t());                                  // S^T = V^T Q^T
      T* st_p = st.data_ptr<T>();
      at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
        tile_update(st_p, B, R, r0, r1, pos.data(), m.data(), l.data(), cnt.data(), mx.data(),
                    sum.data(), scale.data());
        for (int64_t r = r0; r < r1; ++r) {
          if (scale[r] != T(1)) {
            T* a = acc_p + r * C;
            for (int64_t c = 0; c < C; ++c) a[c] *= scale[r];
          }
        }
      });
      acc.addmm_(st.t(), vt);                                      // acc += P (R,B) @ V^T (B,C)
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
