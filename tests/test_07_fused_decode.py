"""ch07 FusedDecoder: GPT.forward's contract with ch01's logits (prefill, chunked prefill, decode, GQA, per-row
positions, any cache of ch01's protocol) and the same greedy tokens through ch01's generate; RoPE as a rotation matrix
equals ch01's apply_rope."""

import copy

import pytest
import torch

from ch01.cache import KVCache
from ch01.functional import rope
from ch01.generate import generate as ch01_generate
from ch01.model import GPT, GPTConfig
from ch07.fused_decode import FusedDecoder, main, rope_matrices
from ch07.kv_cache import generate, static_cache
from ch07.speculative import speculative_generate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def model(request):
    torch.manual_seed(0)
    cfg = GPTConfig.preset("tiny", vocab_size=32, block_size=96, n_kv_head=request.param, init_std=0.5)
    return GPT(cfg).eval()


def test_rope_matrix_equals_apply_rope():
    x = torch.randn(2, 3, 10, 16)  # (B, H, T, D)
    pos = torch.arange(10)
    rotated = (x.unsqueeze(-2) @ rope_matrices(16, 10, 10000.0)).squeeze(-2)  # (B, H, T, D)
    torch.testing.assert_close(rotated, rope(x, pos), atol=1e-6, rtol=1e-6)


def test_full_forward_equals_model(model):
    x = torch.randint(0, 32, (3, 40))
    fused, plain = FusedDecoder(model)(x), model(x)  # logits up to ~±15 here
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-5)
    with torch.no_grad():  # folding the norm gains into the weights only reorders float32 rounding:
        exact = copy.deepcopy(model).double()(x)  # both are as far from the float64 result as float32 allows
    assert (fused.double() - exact).abs().max() <= 2 * (plain.double() - exact).abs().max() + 1e-6


def test_cached_prefill_and_decode_equal_model(model):
    x = torch.randint(0, 32, (2, 30))
    fused, cache = FusedDecoder(model), static_cache(model, 2, 30)
    parts = [fused(x[:, :12], cache=cache), fused(x[:, 12:20], cache=cache)]  # positions continue cache.length
    parts += [fused(x[:, t : t + 1], cache=cache) for t in range(20, 30)]  # one token a step
    torch.testing.assert_close(torch.cat(parts, 1), model(x), atol=1e-4, rtol=1e-4)  # logits ~±10 here
    assert cache.length == 30
    last = fused(x[:, :5], last=1)
    torch.testing.assert_close(last, model(x[:, :5])[:, -1:], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kernels", [True, False], ids=["c-kernels", "torch"])
def test_one_sequence_few_token_path_equals_model(model, kernels):
    """B = 1 with a cache and up to 16 new tokens takes FusedDecoder's decode/verify path (ch07.decode_kernels, or
    batched-matmul attention in torch); longer chunks the general one. Chunks of 1..17 tokens must all give the model's logits."""
    x = torch.randint(0, 32, (1, 90))
    fused = FusedDecoder(model, kernels=kernels)
    cache = KVCache(model.config.n_layer)  # ch01's growing cache: the fast path allocates its buffers as needed
    parts, pos = [], 0
    for T in (3, 1, 17, 5, 1, 2, 16, 7, 1, 3, 9, 1, 4, 6, 3, 1, 10):
        parts.append(fused(x[:, pos : pos + T], cache=cache))
        pos += T
        assert cache.length == pos
    assert pos == 90
    torch.testing.assert_close(torch.cat(parts, 1), model(x), atol=1e-4, rtol=1e-4)
    cache.crop(40)  # verify-style: the last 2 of 5 new tokens' logits only
    torch.testing.assert_close(fused(x[:, 40:45], cache=cache, last=2), model(x)[:, 43:45], atol=1e-4, rtol=1e-4)


class ProtocolOnly:
    """A cache known only by ch01's protocol (``update`` + ``length``), as ch07's paged view is: no fast path."""

    def __init__(self, n_layer: int):
        self.inner = KVCache(n_layer)

    @property
    def length(self) -> int:
        return self.inner.length

    def update(self, layer, k, v, positions):
        return self.inner.update(layer, k, v, positions)


@pytest.mark.parametrize("B", [1, 3])
def test_per_row_positions_and_protocol_caches_equal_model(model, B):
    """The general path with per-row positions (each row continuing at its own length) and a cache used only through
    its protocol gives GPT.forward's logits for the same call."""
    x = torch.randint(0, 32, (B, 20))
    lengths = torch.tensor([7, 12, 3])[:B]
    fused = FusedDecoder(model)
    cf, cm = ProtocolOnly(model.config.n_layer), KVCache(model.config.n_layer)
    with torch.no_grad():
        torch.testing.assert_close(fused(x[:, :12], cache=cf), model(x[:, :12], cache=cm), atol=1e-4, rtol=1e-4)
        for step in range(4):  # each row continues at its own position
            pos = (lengths + step)[:, None]  # (B, 1)
            tok = x.gather(1, pos)
            out_f, out_m = fused(tok, positions=pos, cache=cf), model(tok, positions=pos, cache=cm)
            torch.testing.assert_close(out_f, out_m, atol=1e-4, rtol=1e-4)
        mask = torch.ones(B, 20, 20, dtype=torch.bool)
        mask[:, :, 5] = False  # an extra mask is ANDed in, as in GPT.forward
        torch.testing.assert_close(fused(x, attn_mask=mask), model(x, attn_mask=mask), atol=1e-4, rtol=1e-4)
        pos = torch.arange(20).expand(B, 20) + 3  # positions without a cache only move RoPE
        torch.testing.assert_close(fused(x, positions=pos), model(x, positions=pos), atol=1e-4, rtol=1e-4)


def test_ragged_batch_generate_equals_unfused(model):
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3], [8, 9, 7, 9, 3]]
    fused = generate(model, prompts, 30, fused=True)
    assert torch.equal(fused, generate(model, prompts, 30))
    assert fused.tolist() == ch01_generate(FusedDecoder(model), prompts, 30, temperature=0)  # ch01's loop runs it
    for i, p in enumerate(prompts):  # and each row equals that prompt decoded alone
        assert torch.equal(fused[i : i + 1], generate(model, [p], 30, fused=True))
    assert len(set(fused[0].tolist())) > 3  # a real path, not one repeated token


def test_speculative_with_fused_models_equals_target_greedy(model):
    torch.manual_seed(1)
    draft = GPT(GPTConfig.preset("tiny", vocab_size=32, block_size=96, n_layer=1, init_std=0.5)).eval()
    prompt = torch.randint(0, 32, (6,))
    out, stats = speculative_generate(FusedDecoder(model), FusedDecoder(draft), prompt, 40, k=3)
    assert torch.equal(out, generate(model, prompt, 40))
    assert stats.rounds < 40  # the verify forward ran on several tokens at once


def test_unsupported_architecture_is_refused():
    gpt2 = GPT(GPTConfig.preset("tiny", vocab_size=32, pos_emb="learned", norm="layernorm", mlp="gelu"))
    with pytest.raises(ValueError, match="Llama-style"):
        FusedDecoder(gpt2)


def test_main_three_engines_same_tokens():
    results = main(["--preset", "tiny", "--new-tokens", "24"])
    assert set(results) == {"ch01 GPT", "FusedDecoder, torch", "FusedDecoder, C kernels"}
    assert all(same and tps > 0 for tps, same in results.values())
