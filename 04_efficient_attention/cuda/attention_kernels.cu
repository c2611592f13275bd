// Chapter 04 CUDA kernels: a fused (online) softmax, a tiled matmul and a tiled attention forward in plain CUDA C++.
// Written for reading, not for peak speed: fp32 only, no tensor cores, no vectorised loads.
// Compile standalone:  nvcc -c attention_kernels.cu -o attention_kernels.o
// Loaded into torch by ../cuda_attention.py (torch.utils.cpp_extension.load with torch_binding.cpp).
// References: Milakov & Gimelshein 2018 (online softmax); Dao et al. 2022 (FlashAttention); CUDA C++ Programming Guide
// (shared-memory matrix multiplication).
#include <math.h>

#include "attention_kernels.cuh"

namespace {

constexpr int kSoftmaxThreads = 256;
constexpr int kMatmulTile = 16;
constexpr int kAttnTile = 32;   // query rows per block (one per thread) = key rows per shared-memory tile
constexpr int kMaxHeadDim = 128;

// Merge two (max, sum-of-exp relative to max) pairs: the heart of the online softmax.
__device__ __forceinline__ void merge_stats(float& m, float& l, float m_other, float l_other) {
  float m_new = fmaxf(m, m_other);
  if (m_new == -INFINITY) return;  // both empty
  l = l * __expf(m - m_new) + l_other * __expf(m_other - m_new);
  m = m_new;
}

__global__ void softmax_rows_kernel(const float* __restrict__ x, float* __restrict__ y, int cols) {
  const float* row = x + static_cast<size_t>(blockIdx.x) * cols;
  float* out = y + static_cast<size_t>(blockIdx.x) * cols;
  float m = -INFINITY, l = 0.f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) merge_stats(m, l, row[c], 1.f);  // pass 1: one read
  for (int offset = 16; offset > 0; offset /= 2) {  // reduce (m, l) inside each warp
    float m_o = __shfl_xor_sync(0xffffffff, m, offset), l_o = __shfl_xor_sync(0xffffffff, l, offset);
    merge_stats(m, l, m_o, l_o);
  }
  __shared__ float warp_m[kSoftmaxThreads / 32], warp_l[kSoftmaxThreads / 32];
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) { warp_m[warp] = m; warp_l[warp] = l; }
  __syncthreads();
  if (threadIdx.x == 0) {  // combine the warps
    for (int w = 1; w < blockDim.x / 32; ++w) merge_stats(m, l, warp_m[w], warp_l[w]);
    warp_m[0] = m; warp_l[0] = l;
  }
  __syncthreads();
  m = warp_m[0];
  float inv_l = 1.f / warp_l[0];
  for (int c = threadIdx.x; c < cols; c += blockDim.x) out[c] = __expf(row[c] - m) * inv_l;  // pass 2
}

__global__ void tiled_matmul_kernel(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ c,
                                    int M, int N, int K) {
  __shared__ float As[kMatmulTile][kMatmulTile], Bs[kMatmulTile][kMatmulTile];
  int row = blockIdx.y * kMatmulTile + threadIdx.y, col = blockIdx.x * kMatmulTile + threadIdx.x;
  float acc = 0.f;
  for (int t = 0; t < K; t += kMatmulTile) {  // each element of A and B is read from DRAM once per tile, not per output
    As[threadIdx.y][threadIdx.x] = (row < M && t + threadIdx.x < K) ? a[row * K + t + threadIdx.x] : 0.f;
    Bs[threadIdx.y][threadIdx.x] = (col < N && t + threadIdx.y < K) ? b[(t + threadIdx.y) * N + col] : 0.f;
    __syncthreads();
    for (int i = 0; i < kMatmulTile; ++i) acc += As[threadIdx.y][i] * Bs[i][threadIdx.x];
    __syncthreads();
  }
  if (row < M && col < N) c[row * N + col] = acc;
}

__global__ void flash_attention_forward_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                               const float* __restrict__ v, float* __restrict__ o,
                                               float* __restrict__ lse, int N, int D, float scale, bool causal) {
  __shared__ float Ks[kAttnTile][kMaxHeadDim], Vs[kAttnTile][kMaxHeadDim];
  const size_t base = static_cast<size_t>(blockIdx.y) * N * D;  // this (batch, head)
  const int row = blockIdx.x * kAttnTile + threadIdx.x;         // this thread's query
  float qr[kMaxHeadDim], acc[kMaxHeadDim];
  for (int d = 0; d < D; ++d) {
    qr[d] = row < N ? q[base + static_cast<size_t>(row) * D + d] * scale : 0.f;
    acc[d] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  const int kv_end = causal ? min(N, (blockIdx.x + 1) * kAttnTile) : N;  // causal: later tiles are skipped entirely
  for (int t0 = 0; t0 < kv_end; t0 += kAttnTile) {
    const int kr = t0 + threadIdx.x;  // each thread loads one key row and one value row of the tile
    for (int d = 0; d < D; ++d) {
      Ks[threadIdx.x][d] = kr < N ? k[base + static_cast<size_t>(kr) * D + d] : 0.f;
      Vs[threadIdx.x][d] = kr < N ? v[base + static_cast<size_t>(kr) * D + d] : 0.f;
    }
    __syncthreads();
    if (row < N) {
      float s[kAttnTile], tile_max = -INFINITY;
      for (int j = 0; j < kAttnTile; ++j) {
        const int key = t0 + j;
        s[j] = -INFINITY;
        if (key >= N || (causal && key > row)) continue;
        float dot = 0.f;
        for (int d = 0; d < D; ++d) dot += qr[d] * Ks[j][d];
        s[j] = dot;
        tile_max = fmaxf(tile_max, dot);
      }
      const float m_new = fmaxf(m, tile_max);
      if (m_new != -INFINITY) {  // rows with no visible key in this tile change nothing
        const float alpha = __expf(m - m_new);  // rescale what was accumulated under the old max
        l *= alpha;
        for (int d = 0; d < D; ++d) acc[d] *= alpha;
        for (int j = 0; j < kAttnTile; ++j) {
          const float p = __expf(s[j] - m_new);  // exp(-inf) = 0 for masked keys
          l += p;
          for (int d = 0; d < D; ++d) acc[d] += p * Vs[j][d];
        }
        m = m_new;
      }
    }
    __syncthreads();
  }
  if (row < N) {
    for (int d = 0; d < D; ++d) o[base + static_cast<size_t>(row) * D + d] = acc[d] / l;
    lse[static_cast<size_t>(blockIdx.y) * N + row] = m + logf(l);
  }
}

}  // namespace

cudaError_t launch_softmax_rows(const float* x, float* y, int rows, int cols, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaErrorInvalidValue;
  softmax_rows_kernel<<<rows, kSoftmaxThreads, 0, stream>>>(x, y, cols);
  return cudaGetLastError();
}

cudaError_t launch_tiled_matmul(const float* a, const float* b, float* c, int M, int N, int K, cudaStream_t stream) {
  if (M <= 0 || N <= 0 || K <= 0) return cudaErrorInvalidValue;
  dim3 block(kMatmulTile, kMatmulTile), grid((N + kMatmulTile - 1) / kMatmulTile, (M + kMatmulTile - 1) / kMatmulTile);
  tiled_matmul_kernel<<<grid, block, 0, stream>>>(a, b, c, M, N, K);
  return cudaGetLastError();
}

cudaError_t launch_flash_attention_forward(const float* q, const float* k, const float* v, float* o, float* lse, int BH,
                                           int N, int D, float scale, bool causal, cudaStream_t stream) {
  if (BH <= 0 || N <= 0 || D <= 0 || D > kMaxHeadDim) return cudaErrorInvalidValue;
  dim3 grid((N + kAttnTile - 1) / kAttnTile, BH);
  flash_attention_forward_kernel<<<grid, kAttnTile, 0, stream>>>(q, k, v, o, lse, N, D, scale, causal);
  return cudaGetLastError();
}
