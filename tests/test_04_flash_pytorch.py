"""ch04.flash_pytorch (tiled online softmax) vs torch softmax / SDPA, and its memory claim vs naive attention."""

import pytest
import torch
import torch.nn.functional as F

from ch01.model import naive_attention
from ch04.flash_pytorch import (
    flash_attention_pytorch,
    online_softmax,
    tiled_attention_backward,
    tiled_attention_forward,
)
from common.bench import peak_memory, release_free_memory


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_online_softmax_matches_torch(chunk):
    x = torch.randn(4, 37, dtype=torch.float64) * 10
    torch.testing.assert_close(online_softmax(x, chunk), torch.softmax(x, -1))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("N,bq,bk", [(64, 16, 16), (70, 16, 32), (53, 32, 8)])
def test_forward_backward_match_sdpa(causal, N, bq, bk):
    gen = torch.Generator().manual_seed(N)
    q, k, v = (torch.randn(2, 3, N, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 3, N, 16, generator=gen, dtype=torch.float64)
    out = flash_attention_pytorch(q, k, v, causal, bq, bk)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out, ref)
    for ours, theirs in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(ours, theirs)


def test_lse_is_logsumexp_of_scaled_scores_and_cross_lengths():
    q, k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    out, lse = tiled_attention_forward(q, k, v, block_q=4, block_k=7)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / 8**0.5, -1))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    dq, dk, dv = tiled_attention_backward(q, k, v, out, lse, torch.ones_like(out), block_q=4, block_k=7)
    assert dk.shape == k.shape and dv.shape == v.shape and dq.shape == q.shape


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="causal"):
        flash_attention_pytorch(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8), True)
    with pytest.raises(ValueError, match="expected q"):
        flash_attention_pytorch(torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8))


@pytest.mark.timeout(300)
def test_tiled_peak_memory_is_a_small_fraction_of_naive():
    """The chapter's claim at a test-sized N: naive holds N x N scores, tiles do not (RSS sampled while running)."""
    N, H = 2048, 4
    q, k, v = (torch.randn(1, H, N, 32) for _ in range(3))
    with torch.no_grad():
        release_free_memory()
        naive = peak_memory(lambda: naive_attention(q, k, v, causal=True))
        release_free_memory()
        tiled = peak_memory(lambda: flash_attention_pytorch(q, k, v, True, 256, 256))
    scores_bytes = H * N * N * 4
    assert naive >= scores_bytes  # at least one (H, N, N) float32 matrix really existed
    assert tiled <= naive / 8
