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
// exp(m_old - m_new)), then acc += exp(S - m) @ V^T (GEMM). With several threads the queue
// is split into one column range per thread (split-K, single-threaded GEMMs) and the
// partial (m, l, acc, count) are merged per row:
//   m = max_s m_s,  l = sum_s l_s exp(m_s - m),  acc = sum_s acc_s exp(m_s - m).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "infonce.h"

namespace moco_ext {
namespace {

// Tiles of 2048 columns: measured on the 2-core machine, 2048 beat 1024 and matched 4096
// for the GEMM shapes used here, with half the score buffer of 4096.
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

// The float version is compiled twice (AVX2+FMA and baseline), picked at load time by
// CPU feature (not "arch=haswell", whose resolver tests the CPU model: false on AMD Zen).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target("avx2,fma")))
void tile_update(float* st, int64_t n, int64_t R, int64_t r0, int64_t r1, const float* pos,
                 float* m, float* l, int64_t* cnt, float* mx, float* sum, float* scale) {
  tile_update_body<float>(st, n, R, r0, r1, pos, m, l, cnt, mx, sum, scale);
}
__attribute__((target("default")))
#endif
void tile_update(float* st, int64_t n, int64_t R, int64_t r0, int64_t r1, const float* pos,
                 float* m, float* l, int64_t* cnt, float* mx, float* sum, float* scale) {
  tile_update_body<float>(st, n, R, r0, r1, pos, m, l, cnt, mx, sum, scale);
}
void tile_update(double* st, int64_t n, int64_t R, int64_t r0, int64_t r1, const double* pos,
                 double* m, double* l, int64_t* cnt, double* mx, double* sum, double* scale) {
  tile_update_body<double>(st, n, R, r0, r1, pos, m, l, cnt, mx, sum, scale);
}

// Online-softmax state of R rows over one range of queue columns (one per split).
template <typename T>
struct Partial {
  std::vector<T> m, l, mx, sum, scale;  // running max, running sum, per-tile scratch
  std::vector<int64_t> cnt;             // negatives scored above the positive
  at::Tensor acc;                       // (RB, C), first R rows used: sum_j exp(s_j - m) v_j
  at::Tensor st;                        // (kTile * R): transposed score tile
};

// Walks queue columns [c0, c1) in tiles of kTile for the rows qb (R, C) = q/T, updating p.
// p starts at m = s_0 (the positive's score, a finite reference), with l and acc either
// holding the positive (l = 1, acc = k) or empty (l = 0, acc = 0).
template <typename T>
void walk_queue(const at::Tensor& qb, const at::Tensor& queue, int64_t c0, int64_t c1,
                const T* pos, Partial<T>& p) {
  const int64_t R = qb.size(0), C = qb.size(1);
  at::Tensor acc = p.acc.narrow(0, 0, R);                         // (R, C)
  T* acc_p = acc.template data_ptr<T>();
  for (int64_t j0 = c0; j0 < c1; j0 += kTile) {
    const int64_t B = std::min(kTile, c1 - j0);
    at::Tensor vt = queue.narrow(1, j0, B).t();                    // (B, C), a strided view
    at::Tensor st = p.st.narrow(0, 0, B * R).view({B, R});         // (B, R)
    at::mm_out(st, vt, qb.t());                                    // S^T = V^T Q^T
    T* st_p = st.template data_ptr<T>();
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {      // inline inside a split
      tile_update(st_p, B, R, r0, r1, pos, p.m.data(), p.l.data(), p.cnt.data(),
                  p.mx.data(), p.sum.data(), p.scale.data());
      for (int64_t r = r0; r < r1; ++r) {
        if (p.scale[r] != T(1)) {
          T* a = acc_p + r * C;
          for (int64_t c = 0; c < C; ++c) a[c] *= p.scale[r];
        }
      }
    });
    acc.addmm_(st.t(), vt);                                        // acc += P (R,B) @ V^T (B,C)
  }
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
  // Split-K over threads: each thread walks its own range of queue columns with
  // single-threaded GEMMs (BLAS runs sequentially inside a parallel region), and the
  // partials are merged per row: one fork/join per row block instead of three per tile.
  // With one thread, or a queue of one tile, a single split uses threaded BLAS instead.
  const int64_t S = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                           (K + kTile - 1) / kTile));
  std::vector<Partial<T>> parts(S);
  for (auto& p : parts) {
    for (auto* v : {&p.m, &p.l, &p.mx, &p.sum, &p.scale}) v->resize(RB);
    p.cnt.resize(RB);
    p.acc = at::empty({RB, C}, qs.options());
    p.st = at::empty({kTile * RB}, qs.options());
  }
  std::vector<T> pos(RB);

  // Scores are computed transposed, S^T = V^T Q^T ([B, R]): with the long dimension B as
  // the GEMM's M, MKL runs this shape markedly faster than Q V ([R, B]).
  for (int64_t rb = 0; rb < N; rb += kRowBlock) {
    const int64_t R = std::min(kRowBlock, N - rb);
    at::Tensor qb = qs.narrow(0, rb, R);                           // (R, C)
    for (int64_t r = 0; r < R; ++r) {                              // the positive's score
      T d = 0;
      for (int64_t c = 0; c < C; ++c) d += qs_p[(rb + r) * C + c] * k_p[(rb + r) * C + c];
      pos[r] = d;
    }
    for (int64_t s = 0; s < S; ++s) {                              // split 0 holds the positive
      Partial<T>& p = parts[s];
      for (int64_t r = 0; r < R; ++r) { p.m[r] = pos[r]; p.l[r] = s == 0 ? 1 : 0; p.cnt[r] = 0; }
      at::Tensor acc = p.acc.narrow(0, 0, R);                      // (R, C)
      if (s == 0) acc.copy_(k.narrow(0, rb, R)); else acc.zero_();
    }
    if (S == 1) {
      walk_queue<T>(qb, queue, 0, K, pos.data(), parts[0]);
    } else {
      at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
        for (int64_t s = s0; s < s1; ++s)
          walk_queue<T>(qb, queue, K * s / S, K * (s + 1) / S, pos.data(), parts[s]);
      });
    }
    // Merge the splits: m = max_s m_s, l = sum_s l_s e^{m_s - m}, acc likewise.
    Partial<T>& p0 = parts[0];
    T* acc_p = p0.acc.template data_ptr<T>();
    for (int64_t s = 1; s < S; ++s) {
      const T* a_s = parts[s].acc.template data_ptr<T>();
      for (int64_t r = 0; r < R; ++r) {
        const T m = std::max(p0.m[r], parts[s].m[r]);
        const T e0 = std::exp(p0.m[r] - m), es = std::exp(parts[s].m[r] - m);
        p0.l[r] = p0.l[r] * e0 + parts[s].l[r] * es;
        p0.m[r] = m;
        p0.cnt[r] += parts[s].cnt[r];
        for (int64_t c = 0; c < C; ++c) acc_p[r * C + c] = acc_p[r * C + c] * e0 + a_s[r * C + c] * es;
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = rb + r;
      const T m = p0.m[r], l = p0.l[r], inv_l = T(1) / l;
      loss_p[i] = m + std::log(l) - pos[r];
      nb_p[i] = p0.cnt[r];
      const T p_pos = std::exp(pos[r] - m) * inv_l;
      for (int64_t c = 0; c < C; ++c) {
        dq_p[i * C + c] = (acc_p[r * C + c] * inv_l - k_p[i * C + c]) * inv_t;
        dk_p[i * C + c] = (p_pos - T(1)) * qs_p[i * C + c];  // qs = q / T
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
