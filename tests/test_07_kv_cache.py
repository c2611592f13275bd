"""ch07 KV cache on ch01's seams: the static cache is ch01's KVCache preallocated; cached greedy decoding == uncached
greedy decoding == a plain argmax loop, token for token (single and ragged batches); crop rolls back."""

import pytest
import torch

from ch01.cache import KVCache
from ch01.model import GPT, GPTConfig
from ch07.kv_cache import Uncached, generate, static_cache
from ch07.sampling import Sampler

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # init_std 0.5: peaked, input-dependent logits, so greedy paths are not all the same token
    return GPT(GPTConfig.preset("tiny", vocab_size=32, block_size=96, n_kv_head=2, init_std=0.5)).eval()


@torch.no_grad()
def argmax_loop(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """The reference: re-run the model on the whole sequence and take the argmax, n times (no cache at all)."""
    ids = prompt.view(1, -1)
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[:, prompt.numel() :]


def test_static_cache_is_ch01_kvcache_preallocated(model):
    x = torch.randint(0, 32, (2, 20))
    static, growing = static_cache(model, 2, 40), KVCache(model.config.n_layer)
    assert type(static) is KVCache and static.max_len == 40
    cfg = model.config
    assert all(k.shape == (2, cfg.n_kv_head, 40, cfg.head_dim) for k in static.k + static.v)  # allocated up front
    buffers = [k.data_ptr() for k in static.k]
    with torch.no_grad():
        for cache in (static, growing):
            a = model(x[:, :12], cache=cache)
            b = model(x[:, 12:], cache=cache)  # chunked prefill: T > 1 continuing from cache.length
            torch.testing.assert_close(torch.cat([a, b], 1), model(x), atol=1e-5, rtol=1e-5)
    assert [k.data_ptr() for k in static.k] == buffers  # written in place, never reallocated
    for layer in range(cfg.n_layer):
        torch.testing.assert_close(static.k[layer][:, :, :20], growing.k[layer][:, :, :20])


@pytest.mark.parametrize("prompt_len,new", [(1, 40), (7, 30), (33, 50)])
def test_greedy_cache_equals_no_cache(model, prompt_len, new):
    prompt = torch.randint(0, 32, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    with_cache = generate(model, prompt, new, use_cache=True)
    without = generate(model, prompt, new, use_cache=False)
    assert torch.equal(with_cache, without)
    assert len(set(with_cache[0].tolist())) > 3  # a real path, not one repeated token
    assert torch.equal(with_cache, argmax_loop(model, prompt, new))


def test_uncached_wrapper_keeps_the_forward_contract(model):
    x = torch.randint(0, 32, (2, 12))
    nc, marker = Uncached(model), object()
    with torch.no_grad():
        full = model(x)
        torch.testing.assert_close(nc(x[:, :8], cache=marker), full[:, :8])  # prefill
        torch.testing.assert_close(nc(x[:, 8:9], cache=marker), full[:, 8:9])  # continues at position 8
        pos = torch.tensor([[9], [9]])
        torch.testing.assert_close(nc(x[:, 9:10], positions=pos, cache=marker), full[:, 9:10])
        torch.testing.assert_close(nc(x), full)  # without a cache: the model itself


def test_batched_different_lengths_equals_each_alone(model):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 32, (n,), generator=g) for n in (3, 11, 6, 1)]
    batched = generate(model, prompts, 25)
    batched_nocache = generate(model, prompts, 25, use_cache=False)
    assert torch.equal(batched, batched_nocache)
    for i, p in enumerate(prompts):
        assert torch.equal(batched[i], generate(model, p, 25)[0]), f"row {i}"
        assert torch.equal(batched[i], generate(model, p.tolist(), 25)[0])  # a plain list of ids is one prompt
        assert torch.equal(batched[i : i + 1], argmax_loop(model, p, 25))


def test_sampling_with_seed_is_reproducible_and_cache_independent(model):
    prompt = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(2))
    s = Sampler(temperature=0.9, top_k=10, repetition_penalty=1.2)
    a = generate(model, prompt, 30, s, generator=torch.Generator().manual_seed(7))
    b = generate(model, prompt, 30, s, use_cache=False, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(model, prompt, 30))  # really sampled


def test_eos_stops_and_fills(model):
    prompt = torch.randint(0, 32, (1, 4), generator=torch.Generator().manual_seed(3))
    full = generate(model, prompt, 30)[0]
    eos = int(full[5])
    first = full.tolist().index(eos)
    out = generate(model, prompt, 30, eos_id=eos)[0]
    assert out.tolist() == full[: first + 1].tolist()
    other = torch.randint(0, 32, (7,), generator=torch.Generator().manual_seed(4))
    both = generate(model, [prompt[0], other], 30, eos_id=eos)  # the row that stops first is filled with eos
    alone = generate(model, other, 30, eos_id=eos)[0]
    assert both[0, : first + 1].tolist() == out.tolist() and (both[0, first:] == eos).all()
    assert both[1, : len(alone)].tolist() == alone.tolist()


def test_crop_rolls_back_and_errors(model):
    cache = static_cache(model, 1, 16)
    x = torch.randint(0, 32, (1, 10))
    with torch.no_grad():
        model(x, cache=cache)
        cache.crop(6)
        logits = model(x[:, 6:8], cache=cache)  # continues at position 6, overwriting what was there
        # masked (chunk at position 6) vs causal-flag SDPA kernels: float32 rounding differs by ~2e-5 on logits ~±10
        torch.testing.assert_close(logits, model(x[:, :8])[:, 6:], atol=1e-4, rtol=1e-5)
    assert cache.length == 8
    with pytest.raises(ValueError):
        cache.crop(9)
    with pytest.raises(ValueError):
        model(torch.zeros(1, 20, dtype=torch.long), cache=static_cache(model, 1, 16))
    with pytest.raises(ValueError):
        generate(model, torch.zeros(1, 100, dtype=torch.long), 10)  # the prompt alone exceeds block_size
    with pytest.raises(ValueError):
        generate(model, [[1, 2], []], 5)
    assert generate(model, [[1, 2], [3]], 0).shape == (2, 0)
