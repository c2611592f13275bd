// Launchers for the kernels in attention_kernels.cu: plain CUDA C++, no torch headers, so the .cu compiles standalone
// (`nvcc -c attention_kernels.cu`) and torch_binding.cpp only needs these declarations.
#pragma once
#include <cuda_runtime.h>

// Row-wise softmax of a (rows, cols) row-major float32 matrix: one pass for (max, sum) with the online rescaling trick,
// one pass to write. Returns the launch error code.
cudaError_t launch_softmax_rows(const float* x, float* y, int rows, int cols, cudaStream_t stream);

// C (M, N) = A (M, K) @ B (K, N), row-major float32, 16 x 16 shared-memory tiles.
cudaError_t launch_tiled_matmul(const float* a, const float* b, float* c, int M, int N, int K, cudaStream_t stream);

// Tiled attention forward (FlashAttention-style, float32): q, k, v, o are contiguous (BH, N, D) with D <= 128;
// lse (BH, N) receives the natural-log log-sum-exp of each row. One thread per query row, K/V tiles in shared memory.
cudaError_t launch_flash_attention_forward(const float* q, const float* k, const float* v, float* o, float* lse, int BH,
                                           int N, int D, float scale, bool causal, cudaStream_t stream);
