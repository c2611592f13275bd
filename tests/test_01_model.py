"""ch01.model: attention backends agree, KV-cache decoding equals full forward, HF Llama parity, save/load."""

from __future__ import annotations

import pytest
import torch

from ch01.hf_interop import from_hf, save_hf, to_hf
from ch01.model import GPT, DynamicKVCache, GPTConfig, filter_logits


def _model(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", vocab_size=61, **kw)).eval()


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}, {"n_kv_head": 1, "tie_weights": True},
                                {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu"}])
def test_naive_equals_sdpa(kw):
    m = _model(**kw)
    m2 = GPT(GPTConfig.preset("tiny", vocab_size=61, attn_impl="naive", **kw)).eval()
    m2.load_state_dict(m.state_dict())
    x = torch.randint(0, 61, (3, 40))
    torch.testing.assert_close(m(x), m2(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "naive"])
def test_kv_cache_chunks_equal_full_forward(attn):
    m = _model(n_kv_head=2, attn_impl=attn)
    x = torch.randint(0, 61, (2, 30))
    full = m(x)
    cache = DynamicKVCache(m.config.n_layer)
    parts, pos = [], 0
    for size in (11, 1, 7, 1, 10):  # prefill, single steps, multi-token chunks
        parts.append(m(x[:, pos:pos + size], kv_cache=cache, start_pos=pos))
        pos += size
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    again = m(x[:, 20:30], kv_cache=cache, start_pos=20)  # roll back 10 positions and redo them
    torch.testing.assert_close(again, full[:, 20:30], atol=1e-5, rtol=1e-5)


def test_left_padding_does_not_change_outputs():
    m = _model()
    seq = torch.randint(1, 61, (1, 12))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), seq], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 12, dtype=torch.bool)], 1)
    out = m(padded, key_padding_mask=mask)[:, 5:]
    torch.testing.assert_close(out, m(seq), atol=1e-5, rtol=1e-5)  # RoPE is relative: shift-invariant


def test_param_count_and_flops():
    m = _model()
    cfg = m.config
    per_block = 4 * cfg.n_embd**2 + 3 * cfg.n_embd * cfg.ffn_hidden + 2 * cfg.n_embd
    expected = 2 * cfg.vocab_size * cfg.n_embd + cfg.n_layer * per_block + cfg.n_embd
    assert m.num_params() == expected
    assert m.flops_per_token(64) == 6 * (expected - cfg.vocab_size * cfg.n_embd) + 12 * 2 * 64 * 64
    tied = _model(tie_weights=True)
    assert tied.num_params() == expected - cfg.vocab_size * cfg.n_embd


def test_config_validation_and_block_size():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.preset("huge")
    with pytest.raises(ValueError, match="block_size"):
        _model()(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown attention"):
        GPT(GPTConfig.preset("tiny", attn_impl="nope"))(torch.zeros(1, 4, dtype=torch.long))


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist() == [[False, False, False, True]]
    assert not torch.isinf(filter_logits(logits, top_p=0.99)).any()


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.8), (10, 0.5)])
def test_filter_logits_matches_hf_warpers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    ref = logits.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p:
        ref = TopPLogitsWarper(top_p)(None, ref)
    assert torch.equal(torch.isinf(filter_logits(logits, top_k, top_p)), torch.isinf(ref))


@pytest.mark.parametrize("kw", [{"n_kv_head": 2}, {"tie_weights": True}])
def test_hf_llama_parity_both_directions(kw):
    torch.manual_seed(0)
    m = GPT(GPTConfig.preset("tiny", vocab_size=61, init_std=0.3, **kw)).eval()  # big init: wrong maps can't hide
    x = torch.randint(0, 61, (2, 64))
    hf = to_hf(m)
    with torch.no_grad():
        ours, theirs = m(x), hf(input_ids=x).logits
    assert ours.abs().max() > 1.0
    assert (ours - theirs).abs().max().item() < 1e-4
    back = from_hf(hf)
    with torch.no_grad():
        assert (back(x) - theirs).abs().max().item() < 1e-4


def test_save_hf_loads_with_automodel(tmp_path):
    from transformers import AutoModelForCausalLM

    m = _model(n_kv_head=2)
    save_hf(m, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 61, (1, 20))
    with torch.no_grad():
        assert (hf(input_ids=x).logits - m(x)).abs().max().item() < 1e-4


def test_gpt2_variant_refuses_hf_mapping():
    with pytest.raises(ValueError, match="Llama-style"):
        to_hf(_model(pos_emb="learned", norm="layernorm", mlp="gelu"))


def test_save_load_round_trip(tmp_path):
    m = _model(n_kv_head=2, tie_weights=True)
    m.save(tmp_path / "m")
    m2 = GPT.load(tmp_path / "m")
    assert m2.config == m.config
    x = torch.randint(0, 61, (1, 9))
    assert torch.equal(m(x), m2(x))
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.load(tmp_path)
