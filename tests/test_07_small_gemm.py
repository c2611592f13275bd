"""ch07 small-batch GEMM kernel: equal to torch's matmul (with the fused RMSNorm and residual add) for every row
count and odd shapes, in place on the residual, and the torch fallback gives the same numbers."""

import pytest
import torch
import torch.nn.functional as F

from ch07 import small_gemm
from ch07.small_gemm import MAX_FAST_ROWS, PackedWeight

pytestmark = pytest.mark.usefixtures("one_thread")

needs_kernel = pytest.mark.skipif(small_gemm.load_library() is None, reason="no C compiler: torch fallback only")


@needs_kernel
@pytest.mark.parametrize("K,N", [(256, 768), (64, 65), (33, 17), (1, 5), (40, 1)])
@pytest.mark.parametrize("M", [1, 2, 5, 6, 7, 12])
def test_kernel_equals_torch(M, K, N):
    torch.manual_seed(M * 1000 + K + N)
    W, x = torch.randn(K, N), torch.randn(M, K) * 3
    pw = PackedWeight(W)
    assert pw.lib is not None
    torch.testing.assert_close(pw(x), x @ W, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(pw(x, rms_eps=1e-5), F.rms_norm(x, (K,), None, 1e-5) @ W, atol=1e-4, rtol=1e-5)
    res = torch.randn(M, N)
    expected = res + F.rms_norm(x, (K,), None, 1e-5) @ W
    out = pw(x, residual=res, rms_eps=1e-5)
    assert out.data_ptr() == res.data_ptr()  # added in place: the residual stream is updated, not copied
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)


@needs_kernel
def test_non_contiguous_input_and_bad_residual():
    W = torch.randn(16, 24)
    pw = PackedWeight(W)
    x = torch.randn(16, 3).t()  # (3, 16), not contiguous
    torch.testing.assert_close(pw(x), x @ W, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="residual"):
        pw(x, residual=torch.randn(24, 3).t())


def test_fallback_matches_kernel_and_large_batches_use_torch():
    torch.manual_seed(0)
    W = torch.randn(48, 40)
    fallback, fast = PackedWeight(W, use_kernel=False), PackedWeight(W)
    assert fallback.lib is None
    for M in (1, 4, MAX_FAST_ROWS + 1, 64):  # above MAX_FAST_ROWS even the kernel object uses torch
        x, res = torch.randn(M, 48), torch.randn(M, 40)
        torch.testing.assert_close(fallback(x, rms_eps=1e-6), fast(x, rms_eps=1e-6), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            fallback(x, residual=res.clone()), fast(x, residual=res.clone()), atol=1e-5, rtol=1e-5
        )


def test_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("LLM_ROADMAP_NO_KERNELS", "1")
    small_gemm.load_library.cache_clear()
    try:
        assert small_gemm.load_library() is None
        assert PackedWeight(torch.randn(4, 4)).lib is None
    finally:
        monkeypatch.delenv("LLM_ROADMAP_NO_KERNELS")
        small_gemm.load_library.cache_clear()
