// Thin torch binding for attention_kernels.cu: checks tensors, allocates outputs, launches on the stream it is given.
// Built by ../cuda_attention.py with torch.utils.cpp_extension.load (needs a CUDA build of torch and nvcc).
// The caller passes torch.cuda.current_stream().cuda_stream as an integer, so this file needs only <torch/extension.h>
// (no ATen/c10 CUDA headers): it also compiles against a CPU-only torch, which the tests use to check it.
#include <torch/extension.h>

#include <cmath>

#include "attention_kernels.cuh"

namespace {

void check_input(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32 (these teaching kernels are fp32 only)");
}

void check_launch(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "kernel launch failed: ", cudaGetErrorString(err)); }

torch::Tensor softmax_rows(torch::Tensor x, int64_t stream) {
  check_input(x, "x");
  auto xc = x.contiguous();
  auto y = torch::empty_like(xc);
  const int cols = xc.size(-1);
  const int rows = cols > 0 ? xc.numel() / cols : 0;
  check_launch(launch_softmax_rows(xc.data_ptr<float>(), y.data_ptr<float>(), rows, cols,
                                   reinterpret_cast<cudaStream_t>(stream)));
  return y;
}

torch::Tensor tiled_matmul(torch::Tensor a, torch::Tensor b, int64_t stream) {
  check_input(a, "a");
  check_input(b, "b");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "tiled_matmul needs (M, K) @ (K, N)");
  auto ac = a.contiguous(), bc = b.contiguous();
  auto c = torch::empty({a.size(0), b.size(1)}, a.options());
  check_launch(launch_tiled_matmul(ac.data_ptr<float>(), bc.data_ptr<float>(), c.data_ptr<float>(), a.size(0),
                                   b.size(1), a.size(1), reinterpret_cast<cudaStream_t>(stream)));
  return c;
}

std::vector<torch::Tensor> flash_attention_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, bool causal,
                                                   int64_t stream) {
  check_input(q, "q");
  check_input(k, "k");
  check_input(v, "v");
  TORCH_CHECK(q.dim() == 4 && q.sizes() == k.sizes() && q.sizes() == v.sizes(), "q, k, v must all be (B, H, N, D)");
  TORCH_CHECK(q.size(3) <= 128, "head dim must be <= 128");
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  auto o = torch::empty_like(qc);
  auto lse = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  const int D = q.size(3);
  check_launch(launch_flash_attention_forward(qc.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(),
                                              o.data_ptr<float>(), lse.data_ptr<float>(), q.size(0) * q.size(1),
                                              q.size(2), D, 1.0f / std::sqrt(static_cast<float>(D)), causal,
                                              reinterpret_cast<cudaStream_t>(stream)));
  return {o, lse};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("softmax_rows", &softmax_rows, "row-wise softmax (online max/sum), float32 CUDA");
  m.def("tiled_matmul", &tiled_matmul, "shared-memory tiled matmul, float32 CUDA");
  m.def("flash_attention_forward", &flash_attention_forward, "tiled attention forward -> (out, lse), float32 CUDA");
}
