"""ch04.sparse_attention: block-skipping sparse attention equals dense attention with the same token mask."""

import pytest
import torch
import torch.nn.functional as F

from ch04.sparse_attention import (
    bigbird_pattern,
    block_sparse_attention,
    dense_masked_attention,
    register_window_attention,
    sliding_window_pattern,
)


def _band(n, window, causal):
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return ((i - j < window) & (j <= i)) if causal else ((i - j).abs() < window)


@pytest.mark.parametrize(
    "n,window,block,causal", [(100, 16, 16, True), (100, 33, 16, True), (64, 8, 16, False), (37, 100, 8, True)]
)
def test_sliding_window_layout_covers_exactly_the_band(n, window, block, causal):
    pat = sliding_window_pattern(n, window, block, causal)
    assert torch.equal(pat.token_mask(), _band(n, window, causal))
    # no computed block is empty: skipping is as aggressive as the band allows
    blocks_hit = F.pad(_band(n, window, causal), (0, -n % block, 0, -n % block))
    nb = pat.layout.shape[0]
    assert torch.equal(pat.layout, blocks_hit.view(nb, block, nb, block).any(3).any(1))


@pytest.mark.parametrize(
    "pattern",
    [
        sliding_window_pattern(90, 20, 16, causal=True),
        sliding_window_pattern(90, 20, 16, causal=False),
        bigbird_pattern(90, 16, local=1, n_global=1, n_random=2, causal=True),
        bigbird_pattern(96, 16, local=1, n_global=1, n_random=1, causal=False, seed=3),
    ],
    ids=["window-causal", "window", "bigbird-causal", "bigbird"],
)
def test_block_sparse_equals_dense_masked_forward_and_backward(pattern):
    gen = torch.Generator().manual_seed(0)
    n = pattern.n
    q, k, v = (torch.randn(2, 2, n, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, ref = block_sparse_attention(q, k, v, pattern), dense_masked_attention(q, k, v, pattern)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b)


def test_bigbird_layout_properties():
    pat = bigbird_pattern(256, 16, local=1, n_global=1, n_random=2, causal=True)
    lay = pat.layout
    nb = lay.shape[0]
    assert not torch.triu(lay, 1).any()  # causal: no block above the diagonal
    assert lay[:, 0].all() and lay.diagonal().all()  # global first block, local diagonal
    assert (lay.sum(1)[4:] >= 4).all()  # rows far from the start: global + 2 local + at least one random
    assert 0 < pat.density() < 0.5 and nb == 16


def test_window_attention_in_model_matches_sdpa_when_window_covers_context_and_cache_agrees():
    from ch01.cache import KVCache
    from ch01.model import GPT, GPTConfig

    torch.manual_seed(0)
    idx = torch.randint(0, 50, (2, 24))
    full = GPT(GPTConfig.preset("tiny", vocab_size=50, block_size=32))
    wide = GPT(GPTConfig.preset("tiny", vocab_size=50, block_size=32, attn_impl=register_window_attention(32, 8)))
    wide.load_state_dict(full.state_dict())
    torch.testing.assert_close(wide(idx), full(idx))
    narrow = GPT(GPTConfig.preset("tiny", vocab_size=50, block_size=32, attn_impl=register_window_attention(5, 8)))
    narrow.load_state_dict(full.state_dict())
    logits = narrow(idx)
    assert not torch.allclose(logits, full(idx), atol=1e-4)  # the window really restricts attention
    cache = KVCache(narrow.config.n_layer)  # decoding with a cache uses the masked fallback path
    first = narrow(idx[:, :10], cache=cache)  # prefill: positions 0 … 9
    rest = [narrow(idx[:, t : t + 1], cache=cache) for t in range(10, 24)]  # one token a step, at cache.length
    torch.testing.assert_close(torch.cat([first, *rest], 1), logits, atol=1e-5, rtol=1e-4)


def test_bad_pattern_input():
    with pytest.raises(ValueError, match="window"):
        sliding_window_pattern(10, 0)
    pat = sliding_window_pattern(10, 4, 4)
    with pytest.raises(ValueError, match="N=10"):
        block_sparse_attention(*(torch.randn(1, 1, 12, 8) for _ in range(3)), pat)
