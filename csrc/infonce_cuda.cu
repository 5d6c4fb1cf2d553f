// CUDA kernels of moco_ext: fused MoCo InfoNCE loss (one pass over the queue) and
// the device-side ring-buffer enqueue. Built only with -DWITH_CUDA (setup.py, JIT).
//
// For row i, v_0 = k_i (positive) and v_j = queue[:, j-1], j = 1..K (negatives):
//   s_ij = q_i.v_j / T,   m_i = max_j s_ij,   l_i = sum_j exp(s_ij - m_i)
//   loss_i    = m_i + log(l_i) - s_i0                        (cross-entropy, label 0)
//   dq_rows_i = (sum_j p_ij v_j - k_i) / T,  p_ij = exp(s_ij - m_i) / l_i
//   dk_rows_i = (p_i0 - 1) q_i / T,   n_beat_i = #{j >= 1 : s_ij > s_i0}
// The [N, 1+K] scores never reach global memory. Three launches on the current stream:
//   1. positive_kernel: s_i0 for every row (one warp per row).
//   2. partials_kernel: grid (row block of 64, queue split). A block walks its share of
//      the queue in tiles of BK columns: S = Q V (tensor cores), an online max/sum per
//      row (the partial output O is rescaled by exp(m_old - m_new)), O += P V^T.
//      It writes (m, l, count, O) of its split.
//   3. merge_kernel: per row, the positive and the splits in a fixed order:
//      M = max(s_i0, m_s),  L = e^{s_i0-M} + sum_s l_s e^{m_s-M},  O = e^{s_i0-M} k_i + sum_s O_s e^{m_s-M}.
// No atomics, so results are bitwise reproducible. Matmul precision: bf16/fp16 operands
// with fp32 accumulation (wmma m16n16k16); fp32 uses TF32 wmma (m16n16k8) when
// torch.backends.cuda.matmul.allow_tf32 is set, plain FFMA otherwise; fp64, or a C too
// large for shared memory, falls back to infonce_loss_composite (ATen).
#ifdef WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "infonce.h"

namespace moco_ext {
namespace {
using namespace nvcuda;

constexpr int kBM = 64;          // query rows per block
constexpr int kThreads = 256;    // 8 warps; warp w owns rows w, w+8, ..., w+56
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = kBM / kWarps;
enum Mode { kMma16 = 0, kTF32 = 1, kFFMA = 2 };

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename M> __device__ __forceinline__ M from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Shared-memory carve-up of one block; leading dimensions are padded by 16 bytes
// (fewer bank conflicts, still legal wmma strides) and every array starts on 128 B.
struct Layout {
  int ldq, ldv, lds, ldp, ldo;
  size_t q, v, s, p, o, bytes;
  __host__ __device__ static size_t up(size_t x) { return (x + 127) / 128 * 128; }
  __host__ __device__ Layout(int CP, int BK, int elem) {
    const int pad = 16 / elem;
    const bool p_in_s = elem == 4;  // fp32 modes write P over S in place
    ldq = CP + pad;  ldv = BK + pad;  lds = BK + 4;  ldp = p_in_s ? lds : BK + pad;  ldo = CP + 4;
    q = 0;                                              // Q    [BM][ldq]  operand type
    v = up(q + size_t(kBM) * ldq * elem);               // V    [CP][ldv]  queue tile, C-major
    s = up(v + size_t(CP) * ldv * elem);                // S    [BM][lds]  float scores
    p = p_in_s ? s : up(s + size_t(kBM) * lds * 4);     // P    [BM][ldp]  probabilities
    o = up(p + size_t(kBM) * (p_in_s ? lds * 4 : ldp * elem));  // O [BM][ldo] float
    bytes = o + size_t(kBM) * ldo * 4;
  }
};

template <typename T> constexpr int tile_k() { return sizeof(T) == 2 ? 64 : 32; }

// Ss[BM][BK] = Qs[BM][CP] @ Vs[CP][BK]   (raw dot products, fp32)
template <int MODE, typename M, int BK>
__device__ void tile_scores(const M* Qs, const M* Vs, float* Ss, const Layout& L, int CP) {
  const int warp = threadIdx.x / 32;
  if constexpr (MODE == kFFMA) {
    for (int idx = threadIdx.x; idx < kBM * BK; idx += kThreads) {
      const int r = idx / BK, j = idx % BK;
      float a = 0.f;
      for (int c = 0; c < CP; ++c) a = fmaf(Qs[r * L.ldq + c], Vs[c * L.ldv + j], a);
      Ss[r * L.lds + j] = a;
    }
  } else {
    using F = std::conditional_t<MODE == kTF32, wmma::precision::tf32, M>;
    constexpr int KS = MODE == kTF32 ? 8 : 16;
    for (int f = warp; f < (kBM / 16) * (BK / 16); f += kWarps) {
      const int fm = f / (BK / 16), fn = f % (BK / 16);
      wmma::fragment<wmma::accumulator, 16, 16, KS, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int c0 = 0; c0 < CP; c0 += KS) {
        wmma::fragment<wmma::matrix_a, 16, 16, KS, F, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, KS, F, wmma::row_major> b;
        wmma::load_matrix_sync(a, Qs + fm * 16 * L.ldq + c0, L.ldq);
        wmma::load_matrix_sync(b, Vs + c0 * L.ldv + fn * 16, L.ldv);
        if constexpr (MODE == kTF32) {
          for (int t = 0; t < a.num_elements; ++t) a.x[t] = wmma::__float_to_tf32(a.x[t]);
          for (int t = 0; t < b.num_elements; ++t) b.x[t] = wmma::__float_to_tf32(b.x[t]);
        }
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(Ss + fm * 16 * L.lds + fn * 16, acc, L.lds, wmma::mem_row_major);
    }
  }
}

// Os[BM][CP] += Ps[BM][BK] @ Vs^T, where Vs^T[j][c] = Vs[c * ldv + j] (a col-major view)
template <int MODE, typename M, int BK>
__device__ void tile_accumulate(const M* Ps, const M* Vs, float* Os, const Layout& L, int CP) {
  const int warp = threadIdx.x / 32;
  if constexpr (MODE == kFFMA) {
    for (int idx = threadIdx.x; idx < kBM * CP; idx += kThreads) {
      const int r = idx / CP, c = idx % CP;
      float a = Os[r * L.ldo + c];
      for (int j = 0; j < BK; ++j) a = fmaf(Ps[r * L.ldp + j], Vs[c * L.ldv + j], a);
      Os[r * L.ldo + c] = a;
    }
  } else {
    using F = std::conditional_t<MODE == kTF32, wmma::precision::tf32, M>;
    constexpr int KS = MODE == kTF32 ? 8 : 16;
    for (int f = warp; f < (kBM / 16) * (CP / 16); f += kWarps) {
      const int fm = f / (CP / 16), fn = f % (CP / 16);
      wmma::fragment<wmma::accumulator, 16, 16, KS, float> acc;
      wmma::load_matrix_sync(acc, Os + fm * 16 * L.ldo + fn * 16, L.ldo, wmma::mem_row_major);
      for (int j0 = 0; j0 < BK; j0 += KS) {
        wmma::fragment<wmma::matrix_a, 16, 16, KS, F, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, KS, F, wmma::col_major> b;
        wmma::load_matrix_sync(a, Ps + fm * 16 * L.ldp + j0, L.ldp);
        wmma::load_matrix_sync(b, Vs + fn * 16 * L.ldv + j0, L.ldv);
        if constexpr (MODE == kTF32) {
          for (int t = 0; t < a.num_elements; ++t) a.x[t] = wmma::__float_to_tf32(a.x[t]);
          for (int t = 0; t < b.num_elements; ++t) b.x[t] = wmma::__float_to_tf32(b.x[t]);
        }
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(Os + fm * 16 * L.ldo + fn * 16, acc, L.ldo, wmma::mem_row_major);
    }
  }
}

// pos[i] = q_i.k_i / T in fp32, one warp per row (fixed shuffle tree: deterministic).
template <typename T>
__global__ void positive_kernel(const T* __restrict__ q, const T* __restrict__ k, int N, int C,
                                float inv_t, float* __restrict__ pos) {
  const int row = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= N) return;
  float a = 0.f;
  for (int c = lane; c < C; c += 32)
    a = fmaf(to_f(q[int64_t(row) * C + c]), to_f(k[int64_t(row) * C + c]), a);
  a = warp_sum(a);
  if (lane == 0) pos[row] = a * inv_t;
}

// One block: rows [64*blockIdx.x, +64) against queue tiles [tile0, tile1) of split blockIdx.y.
template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads) partials_kernel(
    const T* __restrict__ q, const T* __restrict__ queue, int64_t qs0, int64_t qs1, bool vec,
    const float* __restrict__ pos, float inv_t, int N, int C, int K, int tiles_per_split,
    float* __restrict__ part_m, float* __restrict__ part_l, int* __restrict__ part_cnt,
    float* __restrict__ part_o) {
  using M = std::conditional_t<MODE == kMma16, T, float>;  // shared-memory operand type
  constexpr int BK = tile_k<T>();
  const int CP = (C + 15) / 16 * 16, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Layout L(CP, BK, sizeof(M));
  extern __shared__ __align__(128) unsigned char smem[];
  M* Qs = reinterpret_cast<M*>(smem + L.q);
  M* Vs = reinterpret_cast<M*>(smem + L.v);
  float* Ss = reinterpret_cast<float*>(smem + L.s);
  M* Ps = reinterpret_cast<M*>(smem + L.p);
  float* Os = reinterpret_cast<float*>(smem + L.o);
  const int row0 = blockIdx.x * kBM, split = blockIdx.y;
  const int tiles = (K + BK - 1) / BK, tile0 = split * tiles_per_split;
  const int tile1 = min(tiles, tile0 + tiles_per_split);

  for (int idx = threadIdx.x; idx < kBM * CP; idx += kThreads) {  // Q block, zero-padded
    const int r = idx / CP, c = idx % CP;
    const bool in = row0 + r < N && c < C;
    Qs[r * L.ldq + c] = from_f<M>(in ? to_f(q[int64_t(row0 + r) * C + c]) : 0.f);
    Os[r * L.ldo + c] = 0.f;
  }
  float m[kRowsPerWarp], l[kRowsPerWarp], s0[kRowsPerWarp];
  int cnt[kRowsPerWarp];
#pragma unroll
  for (int t = 0; t < kRowsPerWarp; ++t) {
    const int row = row0 + warp + t * kWarps;
    m[t] = -INFINITY;  l[t] = 0.f;  cnt[t] = 0;  s0[t] = row < N ? pos[row] : 0.f;
  }

  for (int tile = tile0; tile < tile1; ++tile) {
    const int col0 = tile * BK, valid = min(BK, K - col0);
    __syncthreads();  // the previous tile is finished with Vs and Ps
    if (vec && valid == BK) {  // 16-byte loads of a full tile (M == T here)
      constexpr int V = 16 / sizeof(T);
      for (int idx = threadIdx.x; idx < CP * (BK / V); idx += kThreads) {
        const int c = idx / (BK / V), j = idx % (BK / V) * V;
        *reinterpret_cast<uint4*>(Vs + c * L.ldv + j) =
            c < C ? *reinterpret_cast<const uint4*>(queue + c * qs0 + col0 + j) : uint4{0, 0, 0, 0};
      }
    } else {
      for (int idx = threadIdx.x; idx < CP * BK; idx += kThreads) {  // coalesced along K
        const int c = idx / BK, j = idx % BK;
        const bool in = c < C && j < valid;
        Vs[c * L.ldv + j] = from_f<M>(in ? to_f(queue[c * qs0 + (col0 + j) * qs1]) : 0.f);
      }
    }
    __syncthreads();
    tile_scores<MODE, M, BK>(Qs, Vs, Ss, L, CP);
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kRowsPerWarp; ++t) {  // online softmax of this warp's rows
      const int r = warp + t * kWarps;
      float s[BK / 32], tmax = -INFINITY;
#pragma unroll
      for (int u = 0; u < BK / 32; ++u) {
        const int j = lane + 32 * u;
        s[u] = j < valid ? Ss[r * L.lds + j] * inv_t : -INFINITY;
        tmax = fmaxf(tmax, s[u]);
      }
      const float m_new = fmaxf(m[t], warp_max(tmax));
      const float scale = m[t] == -INFINITY ? 0.f : __expf(m[t] - m_new);
      float psum = 0.f;
#pragma unroll
      for (int u = 0; u < BK / 32; ++u) {
        const int j = lane + 32 * u;
        const float p = j < valid ? __expf(s[u] - m_new) : 0.f;
        Ps[r * L.ldp + j] = from_f<M>(p);  // P may alias S: same thread, same element
        psum += p;
        cnt[t] += __popc(__ballot_sync(0xffffffffu, j < valid && s[u] > s0[t]));
      }
      l[t] = l[t] * scale + warp_sum(psum);
      m[t] = m_new;
      for (int c = lane; c < CP; c += 32) Os[r * L.ldo + c] *= scale;
    }
    __syncthreads();
    tile_accumulate<MODE, M, BK>(Ps, Vs, Os, L, CP);
  }
  __syncthreads();

  const int64_t base = int64_t(split) * N;
#pragma unroll
  for (int t = 0; t < kRowsPerWarp; ++t) {
    const int row = row0 + warp + t * kWarps;
    if (row < N && lane == 0) {
      part_m[base + row] = m[t];  part_l[base + row] = l[t];  part_cnt[base + row] = cnt[t];
    }
  }
  for (int idx = threadIdx.x; idx < kBM * C; idx += kThreads) {
    const int r = idx / C, c = idx % C;
    if (row0 + r < N) part_o[(base + row0 + r) * C + c] = Os[r * L.ldo + c];
  }
}

// One block per row: merge the positive and the S splits in order s = 0..S-1.
template <typename T>
__global__ void merge_kernel(const T* __restrict__ q, const T* __restrict__ k,
                             const float* __restrict__ pos, const float* __restrict__ part_m,
                             const float* __restrict__ part_l, const int* __restrict__ part_cnt,
                             const float* __restrict__ part_o, int S, int N, int C, float inv_t,
                             float* __restrict__ loss, int64_t* __restrict__ n_beat,
                             float* __restrict__ dq, float* __restrict__ dk) {
  const int row = blockIdx.x;
  const float p0 = pos[row];
  float mx = p0;
  for (int s = 0; s < S; ++s) mx = fmaxf(mx, part_m[int64_t(s) * N + row]);
  const float w0 = expf(p0 - mx);
  float sum = w0;
  int64_t cnt = 0;
  for (int s = 0; s < S; ++s) {
    sum += part_l[int64_t(s) * N + row] * expf(part_m[int64_t(s) * N + row] - mx);
    cnt += part_cnt[int64_t(s) * N + row];
  }
  const float inv_l = 1.f / sum;
  if (threadIdx.x == 0) {
    loss[row] = mx + logf(sum) - p0;
    n_beat[row] = cnt;
  }
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const int64_t i = int64_t(row) * C + c;
    const float kc = to_f(k[i]);
    float o = w0 * kc;  // the positive's share of sum_j e^{s_j - M} v_j
    for (int s = 0; s < S; ++s)
      o += part_o[(int64_t(s) * N + row) * C + c] * expf(part_m[int64_t(s) * N + row] - mx);
    dq[i] = (o * inv_l - kc) * inv_t;
    dk[i] = (w0 * inv_l - 1.f) * to_f(q[i]) * inv_t;
  }
}

template <typename T, int MODE>
void launch_loss(const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue, float inv_t,
                 const Layout& L, at::Tensor& loss, at::Tensor& n_beat, at::Tensor& dq,
                 at::Tensor& dk) {
  const int N = q.size(0), C = q.size(1), K = queue.size(1);
  constexpr int BK = tile_k<T>();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const T* qp = reinterpret_cast<const T*>(q.data_ptr());
  const T* kp = reinterpret_cast<const T*>(k.data_ptr());
  at::Tensor pos = at::empty({N}, q.options().dtype(at::kFloat));
  positive_kernel<T><<<(N + kWarps - 1) / kWarps, kThreads, 0, stream>>>(
      qp, kp, N, C, inv_t, pos.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Split the queue so that about one wave of blocks fills the GPU; no split is empty.
  auto kernel = partials_kernel<T, MODE>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      int(L.bytes)));
  int per_sm = 1;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                               L.bytes));
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int row_blocks = (N + kBM - 1) / kBM, tiles = (K + BK - 1) / BK;
  int splits = 0, tiles_per_split = 1;
  if (tiles > 0) {
    splits = std::min(tiles, std::max(1, (std::max(per_sm, 1) * sms + row_blocks - 1) / row_blocks));
    tiles_per_split = (tiles + splits - 1) / splits;
    splits = (tiles + tiles_per_split - 1) / tiles_per_split;
  }
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor part_m = at::empty({splits, N}, f32), part_l = at::empty({splits, N}, f32);
  at::Tensor part_o = at::empty({splits, N, C}, f32);
  at::Tensor part_cnt = at::empty({splits, N}, q.options().dtype(at::kInt));
  // 16-byte loads need a unit stride along K, aligned rows and an aligned base.
  const int64_t V = 16 / sizeof(T);
  const bool vec = queue.stride(1) == 1 && queue.stride(0) % V == 0 &&
                   reinterpret_cast<uintptr_t>(queue.data_ptr()) % 16 == 0;
  if (splits > 0) {
    kernel<<<dim3(row_blocks, splits), kThreads, L.bytes, stream>>>(
        qp, reinterpret_cast<const T*>(queue.data_ptr()), queue.stride(0), queue.stride(1), vec,
        pos.data_ptr<float>(), inv_t, N, C, K, tiles_per_split, part_m.data_ptr<float>(),
        part_l.data_ptr<float>(), part_cnt.data_ptr<int>(), part_o.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  merge_kernel<T><<<N, 128, 0, stream>>>(
      qp, kp, pos.data_ptr<float>(), part_m.data_ptr<float>(), part_l.data_ptr<float>(),
      part_cnt.data_ptr<int>(), part_o.data_ptr<float>(), splits, N, C, inv_t,
      loss.data_ptr<float>(), n_beat.data_ptr<int64_t>(), dq.data_ptr<float>(),
      dk.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int MODE>
bool fits(int C) {
  using M = std::conditional_t<MODE == kMma16, T, float>;
  const Layout L((C + 15) / 16 * 16, tile_k<T>(), sizeof(M));
  return L.bytes <= at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
}

template <typename T, int MODE>
void run_loss(const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue, double T_,
              at::Tensor& loss, at::Tensor& n_beat, at::Tensor& dq, at::Tensor& dk) {
  using M = std::conditional_t<MODE == kMma16, T, float>;
  const Layout L((q.size(1) + 15) / 16 * 16, tile_k<T>(), sizeof(M));
  launch_loss<T, MODE>(q, k, queue, float(1.0 / T_), L, loss, n_beat, dq, dk);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> infonce_loss_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue, double T) {
  auto [N, C, K] = check_infonce_inputs(q, k, queue, T, "infonce_loss");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto dt = q.scalar_type();
  TORCH_CHECK(N <= INT32_MAX && C <= INT32_MAX && K <= INT32_MAX,
              "infonce_loss: sizes must fit in int32, got N=", N, ", C=", C, ", K=", K);
  const bool tf32 = at::globalContext().allowTF32CuBLAS();
  const bool fused = (dt == at::kBFloat16 && fits<__nv_bfloat16, kMma16>(C)) ||
                     (dt == at::kHalf && fits<__half, kMma16>(C)) ||
                     (dt == at::kFloat && (tf32 ? fits<float, kTF32>(C) : fits<float, kFFMA>(C)));
  if (!fused) return infonce_loss_composite(q, k, queue, T);  // fp64, or C too large
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({N}, f32), dq = at::empty({N, C}, f32), dk = at::empty({N, C}, f32);
  at::Tensor n_beat = at::empty({N}, q.options().dtype(at::kLong));
  if (N == 0) return {loss, n_beat, dq, dk};
  // q and k are small ([N, C]): contiguous copies are cheap. The queue is read in place.
  const at::Tensor qc = q.contiguous(), kc = k.contiguous();
  if (dt == at::kBFloat16)
    run_loss<__nv_bfloat16, kMma16>(qc, kc, queue, T, loss, n_beat, dq, dk);
  else if (dt == at::kHalf)
    run_loss<__half, kMma16>(qc, kc, queue, T, loss, n_beat, dq, dk);
  else if (tf32)
    run_loss<float, kTF32>(qc, kc, queue, T, loss, n_beat, dq, dk);
  else
    run_loss<float, kFFMA>(qc, kc, queue, T, loss, n_beat, dq, dk);
  return {loss, n_beat, dq, dk};
}

// queue[:, (p + i) % K] = keys[i] with p = *ptr read on the device (taken mod K).
// Threads run along i, so the writes to a [C, K] queue are coalesced.
template <typename T>
__global__ void enqueue_kernel(T* __restrict__ queue, int64_t qs0, int64_t qs1,
                               const T* __restrict__ keys, int64_t ks0, int64_t ks1,
                               const int64_t* __restrict__ ptr, int64_t N, int64_t C, int64_t K) {
  const int64_t p = ((*ptr % K) + K) % K;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < N * C;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx % N, c = idx / N;
    queue[c * qs0 + ((p + i) % K) * qs1] = keys[i * ks0 + c * ks1];
  }
}

// A second launch on the same stream, so every block above has read the old pointer.
__global__ void advance_ptr_kernel(int64_t* ptr, int64_t N, int64_t K) {
  *ptr = (((*ptr % K) + K) % K + N) % K;
}

void enqueue_cuda(at::Tensor& queue, at::Tensor& ptr, const at::Tensor& keys) {
  check_enqueue_inputs(queue, ptr, keys);
  const int64_t N = keys.size(0), C = queue.size(0), K = queue.size(1);
  if (N == 0) return;
  const c10::cuda::CUDAGuard guard(queue.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int blocks = int(std::min<int64_t>((N * C + 255) / 256, 4096));
  if (C > 0) {  // C == 0: nothing to copy, but ptr advances, as on the CPU
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, queue.scalar_type(), "enqueue_", [&] {
      enqueue_kernel<scalar_t><<<blocks, 256, 0, stream>>>(
          queue.data_ptr<scalar_t>(), queue.stride(0), queue.stride(1), keys.data_ptr<scalar_t>(),
          keys.stride(0), keys.stride(1), ptr.data_ptr<int64_t>(), N, C, K);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  advance_ptr_kernel<<<1, 1, 0, stream>>>(ptr.data_ptr<int64_t>(), N, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor infonce_logits_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue,
                               double T) {
  const c10::cuda::CUDAGuard guard(q.device());
  return infonce_logits_impl(q, k, queue, T);  // cuBLAS GEMM into the output buffer
}

}  // namespace
}  // namespace moco_ext

TORCH_LIBRARY_IMPL(moco_ext, CUDA, m) {
  m.impl("infonce_logits", &moco_ext::infonce_logits_cuda);
  m.impl("infonce_loss", &moco_ext::infonce_loss_cuda);
  m.impl("enqueue", &moco_ext::enqueue_cuda);
}
#endif  // WITH_CUDA
