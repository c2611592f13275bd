"""ch01.model: attention backends agree, KV-cache decoding equals full forward, HF Llama parity, save/load."""

from __future__ import annotations

import pytest
import torch

from ch01.cache import KVCache
from ch01.generate import filter_logits, generate, stream
from ch01.hf_interop import from_hf, save_hf, to_hf
from ch01.model import GPT, GPTConfig


def _model(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", vocab_size=61, **kw)).eval()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"n_kv_head": 2},
        {"n_kv_head": 1, "tie_weights": True},
        {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu"},
    ],
)
def test_naive_equals_sdpa(kw):
    m = _model(**kw)
    m2 = GPT(GPTConfig.preset("tiny", vocab_size=61, attn_impl="naive", **kw)).eval()
    m2.load_state_dict(m.state_dict())
    x = torch.randint(0, 61, (3, 40))
    torch.testing.assert_close(m(x), m2(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "naive"])
@pytest.mark.parametrize("max_len", [None, 30])
def test_kv_cache_chunks_equal_full_forward(attn, max_len):
    m = _model(n_kv_head=2, attn_impl=attn)
    x = torch.randint(0, 61, (2, 30))
    full = m(x)
    cache = KVCache(m.config.n_layer, max_len=max_len)
    parts = []
    for size in (11, 1, 7, 1, 10):  # prefill, single steps, multi-token chunks; positions continue from the cache
        pos = cache.length
        parts.append(m(x[:, pos : pos + size], cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    cache.crop(20)  # roll back 10 positions and redo them
    again = m(x[:, 20:30], cache=cache)
    torch.testing.assert_close(again, full[:, 20:30], atol=1e-5, rtol=1e-5)


def test_per_row_positions_in_one_forward():
    """Row b continues from its own length: one (B, 1) step at positions (7, 3) equals each row's own forward."""
    m = _model(n_kv_head=2)
    a, b = torch.randint(0, 61, (1, 8)), torch.randint(0, 61, (1, 4))
    cache = KVCache(m.config.n_layer)
    prompt = torch.cat([a[:, :7], torch.cat([b[:, :3], torch.zeros(1, 4, dtype=torch.long)], 1)])  # right-padded
    m(prompt, positions=torch.arange(7).expand(2, 7), cache=cache)
    step = m(torch.cat([a[:, 7:], b[:, 3:]]), positions=torch.tensor([[7], [3]]), cache=cache)[:, -1]  # (2, V)
    torch.testing.assert_close(step[0], m(a)[0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1], m(b)[0, -1], atol=1e-5, rtol=1e-5)


def test_positions_shift_rope_but_not_causality_without_cache():
    m = _model()
    x = torch.randint(0, 61, (1, 12))
    shifted = m(x, positions=torch.arange(5, 17)[None])
    torch.testing.assert_close(shifted, m(x), atol=1e-4, rtol=1e-4)  # RoPE is relative: a shift changes nothing
    learned = _model(pos_emb="learned", norm="layernorm", mlp="gelu")
    assert not torch.allclose(learned(x, positions=torch.arange(5, 17)[None]), learned(x))


def test_attn_mask_separates_packed_documents():
    m = _model()
    d1, d2 = torch.randint(0, 61, (1, 5)), torch.randint(0, 61, (1, 7))
    packed = torch.cat([d1, d2], 1)
    doc = torch.tensor([0] * 5 + [1] * 7)
    same_doc = (doc[:, None] == doc[None, :])[None]  # (1, T, T)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    out = m(packed, positions=pos, attn_mask=same_doc)
    torch.testing.assert_close(out[:, 5:], m(d2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, :5], m(d1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2, "pos_emb": "learned", "norm": "layernorm", "mlp": "gelu"}])
def test_ragged_batch_generate_equals_each_row_alone(kw):
    m = _model(init_std=0.2, **kw)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15]]
    batched = generate(m, prompts, 20, temperature=0)
    assert batched == [generate(m, [p], 20, temperature=0)[0] for p in prompts]
    uncached = []  # and equal to plain greedy decoding by full forwards, token for token
    for p in prompts:
        ids = torch.tensor([p])
        for _ in range(20):
            ids = torch.cat([ids, m(ids)[:, -1].argmax(-1, keepdim=True)], 1)
        uncached.append(ids[0, len(p) :].tolist())
    assert batched == uncached


def test_generate_stop_ids_stream_and_sampling():
    m = _model(init_std=0.2)
    prompts = [[1, 2, 3], [4, 5]]
    greedy = generate(m, prompts, 15, temperature=0)
    stop = greedy[0][4]
    stopped = generate(m, prompts, 15, temperature=0, stop_ids=[stop])
    first = greedy[0].index(stop)
    assert stopped[0] == greedy[0][: first + 1]  # the stop id ends the row and is its last token
    assert stopped[1] == (greedy[1][: greedy[1].index(stop) + 1] if stop in greedy[1] else greedy[1])
    steps = list(stream(m, prompts, 15, temperature=0, stop_ids=[stop]))
    assert [int(s[0]) for s in steps[first + 1 :]] == [-1] * (len(steps) - first - 1)
    draws = [generate(m, prompts, 15, top_k=5, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert draws[0] == draws[1] and draws[0] != draws[2]  # seeded: reproducible, and a new seed differs
    full = m.generate(torch.tensor([[1, 2, 3]]), 100, temperature=0)  # past block_size 64: sliding window
    assert full.shape == (1, 103)
    assert full[0, 3:18].tolist() == greedy[0]  # the cached steps before the window slides


def test_every_registered_attention_loads_in_a_fresh_process():
    import subprocess
    import sys

    names = ["naive", "sdpa", "flash_pytorch", "flash_triton", "window16", "sdpa_export"]
    code = (
        "import torch, sys\nfrom ch01.model import GPT, GPTConfig\n"
        "for name in sys.argv[1:]:\n"
        "    m = GPT(GPTConfig.preset('tiny', attn_impl=name)).eval()\n"
        "    print(name, tuple(m(torch.zeros(1, 8, dtype=torch.long)).shape))\n"
    )
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:-1] == [f"{n} (1, 8, 65)" for n in names]


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
