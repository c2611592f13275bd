"""ch04 CUDA sources: they compile with nvcc where it exists; on a GPU the kernels match torch."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from ch04 import cuda_attention as ca

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")


@needs_nvcc
@pytest.mark.timeout(600)
def test_kernels_compile_standalone_with_nvcc(tmp_path):
    obj = tmp_path / "attention_kernels.o"
    res = ca.nvcc_compile(obj)
    assert res.returncode == 0, res.stderr
    assert obj.stat().st_size > 0


@needs_nvcc
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_torch_binding_compiles_against_torch_headers():
    res = ca.binding_syntax_check()
    assert res.returncode == 0, res.stderr[-3000:]


def test_main_without_gpu_says_why():
    if torch.cuda.is_available() and torch.version.cuda is not None:
        pytest.skip("a GPU is present: the real comparison runs in test_kernels_match_torch_on_gpu")
    res = ca.main([])
    assert res["rows"] == [] and "CUDA" in res["skipped"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.timeout(900)
def test_kernels_match_torch_on_gpu():
    ext = ca.load_extension()
    x = torch.randn(37, 1000, device="cuda")
    torch.testing.assert_close(ca.softmax_rows(ext, x), torch.softmax(x, -1))
    a, b = torch.randn(33, 47, device="cuda"), torch.randn(47, 29, device="cuda")
    torch.testing.assert_close(ca.tiled_matmul(ext, a, b), a @ b, atol=1e-4, rtol=1e-4)
    for causal in (False, True):
        q, k, v = (torch.randn(2, 3, 77, 64, device="cuda") for _ in range(3))
        out, lse = ca.flash_attention_forward(ext, q, k, v, causal)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), atol=1e-4, rtol=1e-4)
        scores = q @ k.transpose(-1, -2) / 8.0
        if causal:
            scores = scores.masked_fill(~torch.ones(77, 77, dtype=torch.bool, device="cuda").tril(), float("-inf"))
        torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-4, rtol=1e-4)
