"""Chapter 04's attention switches on the ch01 model: MLA, sliding window + rolling cache (+ sinks), QK-norm, RoPE
scaling — each against a reference form (naive vs absorbed MLA, band-masked full attention, Hugging Face Qwen3 /
Mistral / Llama with mapped weights, transformers' RoPE init functions)."""

import pytest
import torch

from ch01.cache import KVCache
from ch01.generate import generate
from ch01.model import GPT, GPTConfig
from ch04.mla import MLAttention, kv_numbers_per_token
from ch04.rope_scaling import scaled_inv_freq
from ch04.sliding_window import RollingKVCache


def _tiny(**kw) -> GPTConfig:
    return GPTConfig.preset("tiny", vocab_size=97, **kw)


def _decode_stepwise(model, idx, cache, prefill):
    """Logits of a prefill of ``prefill`` tokens, then one token at a time, through ``cache``."""
    outs = [model(idx[:, :prefill], cache=cache)]
    for t in range(prefill, idx.shape[1]):
        outs.append(model(idx[:, t : t + 1], cache=cache))
    return torch.cat(outs, dim=1)  # (B, T, V)


# ------------------------------------------------------------------------------------------------------------ MLA
@torch.no_grad()
def test_mla_absorbed_equals_naive_and_cached_decode_equals_full():
    torch.manual_seed(0)
    cfg = _tiny(mla_kv_rank=16, mla_rope_dim=8, init_std=0.2)
    model = GPT(cfg).eval()
    assert all(isinstance(b.attn, MLAttention) for b in model.blocks)
    idx = torch.randint(0, 97, (2, 24))
    naive = model(idx)
    for b in model.blocks:
        b.attn.form = "absorbed"
    torch.testing.assert_close(model(idx), naive, atol=2e-5, rtol=1e-4)
    for b in model.blocks:
        b.attn.form = "auto"  # a cache switches to the absorbed form
    cache = KVCache(cfg.n_layer)
    torch.testing.assert_close(_decode_stepwise(model, idx, cache, 7), naive, atol=2e-5, rtol=1e-4)
    # the cache holds the latent + the shared RoPE key, nothing per head
    per_token = cache.nbytes / (cfg.n_layer * 2 * cache.k[0].shape[2])  # fp32, batch 2, capacity positions
    assert per_token == 4 * (16 + 8) == 4 * kv_numbers_per_token(cfg)
    assert kv_numbers_per_token(_tiny()) == 2 * 4 * 16  # MHA: k and v of every head


@pytest.mark.parametrize(
    "kw",
    [
        dict(mla_kv_rank=16, mla_rope_dim=8),
        dict(qk_norm=True, n_kv_head=2),
        dict(rope_scaling="yarn", rope_factor=4.0, rope_original_block=16),
        dict(rope_scaling="ntk", rope_factor=2.0),
    ],
)
def test_cached_generate_equals_uncached_greedy(kw):
    torch.manual_seed(0)
    model = GPT(_tiny(init_std=0.2, **kw)).eval()
    out = generate(model, [[1, 2, 3]], 8, temperature=0.0)[0]
    with torch.no_grad():  # greedy without a cache: argmax of the full forward, token by token
        seq = [1, 2, 3]
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[3:]


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(mla_kv_rank=16, attn_impl="flash_pytorch"), "cannot take them"),
        (dict(mla_kv_rank=16, n_kv_head=2), "grouped-query"),
        (dict(mla_kv_rank=16, qk_norm=True), "qk_norm"),
        (dict(mla_kv_rank=16, mla_rope_dim=7), "even"),
        (dict(mla_kv_rank=16, pos_emb="learned"), "pos_emb='rope'"),
        (dict(attn_sinks=2), "needs a sliding_window"),
        (dict(sliding_window=0), "sliding_window must be"),
        (dict(sliding_window=8, attn_impl="window16"), "both windows"),
        (dict(sliding_window=8, layer_pattern="DA"), "mixers take no window mask"),
        (dict(rope_scaling="ntk-aware"), "choose one of"),
        (dict(rope_scaling="yarn", rope_factor=0.5), "rope_factor"),
        (dict(rope_scaling="linear", rope_factor=2.0, pos_emb="learned"), "pos_emb='rope'"),
    ],
)
def test_incompatible_switches_fail_at_config_time(kw, words):
    with pytest.raises(ValueError, match=words):
        _tiny(**kw)


# ------------------------------------------------------------------------------------------------- sliding window
def _band(n: int, window: int, sinks: int) -> torch.Tensor:
    p = torch.arange(n)
    return (p[None, :] <= p[:, None]) & ((p[:, None] - p[None, :] < window) | (p[None, :] < sinks))  # (n, n)


@pytest.mark.parametrize("sinks, mla", [(0, None), (3, None), (2, 16)])
@torch.no_grad()
def test_rolling_cache_equals_band_masked_full_attention(sinks, mla):
    """Decoding far past the window (and past block_size) through the ring gives full attention's logits with a
    band mask on the same tokens; the ring's memory stays constant."""
    torch.manual_seed(1)
    window, n = 8, 50
    cfg = _tiny(sliding_window=window, attn_sinks=sinks, mla_kv_rank=mla, block_size=16, init_std=0.2)
    model = GPT(cfg).eval()
    full_cfg = GPTConfig.from_dict({**cfg.to_dict(), "sliding_window": None, "attn_sinks": 0, "block_size": 64})
    full = GPT(full_cfg).eval()
    full.load_state_dict(model.state_dict())
    idx = torch.randint(0, 97, (2, n))
    want = full(idx, attn_mask=_band(n, window, sinks).expand(2, n, n))
    torch.testing.assert_close(model(idx), want, atol=2e-5, rtol=1e-4)  # training-time forward (no cache)
    cache = RollingKVCache(cfg.n_layer, window, sinks)
    outs = [model(idx[:, :11], cache=cache)]
    sizes = []
    for t in range(11, n):
        outs.append(model(idx[:, t : t + 1], cache=cache))
        sizes.append(cache.nbytes)
    torch.testing.assert_close(torch.cat(outs, 1), want, atol=2e-5, rtol=1e-4)
    assert len(set(sizes)) == 1  # constant memory from the first step to position 49
    torch.testing.assert_close(_decode_stepwise(model, idx, KVCache(cfg.n_layer), 5), want, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_generate_past_block_size_with_rolling_cache():
    torch.manual_seed(2)
    cfg = _tiny(sliding_window=6, attn_sinks=1, block_size=16)
    model = GPT(cfg).eval()
    out = generate(model, [[5, 6, 7]], 30, temperature=0.0)[0]  # 33 tokens > block_size 16
    seq = [5, 6, 7]
    for _ in range(30):  # reference: greedy with the full windowed forward, no cache
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[3:]
    cache = RollingKVCache(cfg.n_layer, 6, 1)
    model(torch.zeros(2, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="uniform batch"):
        model(torch.zeros(2, 1, dtype=torch.long), positions=torch.tensor([[4], [5]]), cache=cache)


# ----------------------------------------------------------------------------------------- HF interop (QK-norm ...)
@pytest.mark.parametrize(
    "kw, hf_class",
    [
        (dict(qk_norm=True, n_kv_head=2), "Qwen3ForCausalLM"),
        (dict(qk_norm=True, sliding_window=8), "Qwen3ForCausalLM"),
        (dict(sliding_window=8), "MistralForCausalLM"),
        (dict(rope_scaling="yarn", rope_factor=4.0, rope_original_block=16), "LlamaForCausalLM"),
        (dict(rope_scaling="linear", rope_factor=2.0), "LlamaForCausalLM"),
    ],
)
@torch.no_grad()
def test_variants_match_hugging_face(kw, hf_class):
    pytest.importorskip("transformers")
    from ch01.hf_interop import to_hf

    torch.manual_seed(3)
    model = GPT(_tiny(init_std=0.3, **kw)).eval()
    for name, p in model.named_parameters():
        if "norm" in name:  # non-trivial gains, so a wrong q_norm/k_norm mapping shows
            p.uniform_(0.5, 1.5)
    hf = to_hf(model)
    assert type(hf).__name__ == hf_class
    idx = torch.randint(0, 97, (2, 40))  # 40 > the window: HF's sliding-window mask is exercised
    torch.testing.assert_close(model(idx), hf(input_ids=idx).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(mla_kv_rank=16), dict(sliding_window=8, attn_sinks=2), dict(rope_scaling="ntk")])
def test_unmappable_variants_refuse_export(kw):
    pytest.importorskip("transformers")
    from ch01.hf_interop import to_hf

    with pytest.raises(ValueError, match="cannot be exported|no Hugging Face rope_type"):
        to_hf(GPT(_tiny(**kw)))


def test_engines_with_their_own_attention_refuse_variants(tmp_path):
    pytest.importorskip("gguf")
    from ch06.gguf_export import gguf_tensors
    from ch07.fused_decode import FusedDecoder
    from ch08.export_onnx import export_decode

    with pytest.raises(ValueError, match="qk_norm"):
        FusedDecoder(GPT(_tiny(qk_norm=True)), kernels=False)
    with pytest.raises(ValueError, match="sliding_window"):
        gguf_tensors(GPT(_tiny(sliding_window=8)))
    with pytest.raises(ValueError, match="MLA"):
        export_decode(GPT(_tiny(mla_kv_rank=16)), tmp_path / "decode.onnx")


def test_default_config_keeps_state_dict_keys():
    keys = set(GPT(_tiny()).state_dict())
    assert not any("norm" in k and ".attn." in k for k in keys)
    assert set(GPT(_tiny(qk_norm=True)).state_dict()) - keys == {
        f"blocks.{i}.attn.{n}.weight" for i in range(2) for n in ("q_norm", "k_norm")
    }


# --------------------------------------------------------------------------------------------------- RoPE scaling
@pytest.mark.parametrize("kind, factor", [("linear", 4.0), ("ntk", 8.0), ("yarn", 8.0), ("yarn", 2.5)])
def test_rope_tables_match_transformers(kind, factor):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    D, base, original = 32, 10000.0, 64
    common = dict(hidden_size=4 * D, num_attention_heads=4, head_dim=D)
    if kind == "ntk":  # static NTK-aware = HF's dynamic NTK with factor 1 evaluated at factor·original tokens
        params = {"rope_type": "dynamic", "factor": 1.0, "rope_theta": base}
        hf_cfg = LlamaConfig(**common, max_position_embeddings=original, rope_parameters=params)
        ref, ref_scale = ROPE_INIT_FUNCTIONS["dynamic"](hf_cfg, "cpu", seq_len=int(factor * original))
    else:
        params = {"rope_type": kind, "factor": factor, "rope_theta": base}
        if kind == "yarn":
            params["original_max_position_embeddings"] = original
        hf_cfg = LlamaConfig(**common, max_position_embeddings=int(factor * original), rope_parameters=params)
        ref, ref_scale = ROPE_INIT_FUNCTIONS[kind](hf_cfg, "cpu")
    ours, scale = scaled_inv_freq(D, base, kind, factor, original)
    torch.testing.assert_close(ours, ref.float(), atol=1e-7, rtol=1e-6)
    assert scale == pytest.approx(ref_scale)


# ----------------------------------------------------------------------------------------------- capstone + train
def test_capstone_config_carries_switches(tmp_path):
    from ch10.config import load_config, model_config

    path = tmp_path / "variants.toml"
    path.write_text('[model]\npreset = "tiny"\nqk_norm = true\nsliding_window = 32\nattn_sinks = 2\n')
    cfg = model_config(load_config(path), vocab_size=300, device_type="cpu")
    assert (cfg.qk_norm, cfg.sliding_window, cfg.attn_sinks) == (True, 32, 2)
    mla = tmp_path / "mla.toml"
    mla.write_text('[model]\npreset = "tiny"\nmla_kv_rank = 16\n')
    assert model_config(load_config(mla), vocab_size=300, device_type="cuda").attn_impl == "sdpa"  # not Triton
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\npreset = "tiny"\nmla_kv_rank = 16\nn_kv_head = 2\n')
    with pytest.raises(ValueError, match="grouped-query"):
        model_config(load_config(bad), vocab_size=300, device_type="cpu")


@pytest.mark.parametrize(
    "kw",
    [
        dict(qk_norm=True),
        dict(sliding_window=16, attn_sinks=2),
        dict(mla_kv_rank=16),
        dict(rope_scaling="yarn", rope_factor=2.0),
    ],
)
def test_each_switch_trains(kw):
    """ch01's train loop learns a counting sequence (next id = id + 1) with every switch on."""
    from ch01.train import TrainConfig, train

    ids = torch.arange(4000) % 97
    tc = TrainConfig(
        max_iters=25, batch_size=4, lr=1e-2, warmup_iters=1, eval_iters=0, out_dir=None, progress=False, device="cpu"
    )
    losses = train(_tiny(**kw), tc, ids, ids)["train_losses"]
    assert losses[-1] < 0.5 * losses[0]  # from ~ln(97) = 4.6 nats


# ---------------------------------------------------------------------------------------------- the scripts' mains
def test_scripts_measure_what_they_claim():
    from ch04 import mla, qk_norm, rope_scaling, sliding_window

    res = sliding_window.main(["--new-tokens", "48", "--window", "8", "--sinks", "2", "--no-plot"])
    grows, ring = res["curves"].values()
    assert grows[-1][1] > grows[0][1] and len({b for _, b in ring}) == 1  # the ring never grows
    rows = mla.main(["--preset", "tiny", "--train-iters", "0"])["rows"]
    assert all(r["measured fp32 bytes/token/layer"] == 4 * r["KV numbers/token/layer"] for r in rows)
    rows = rope_scaling.main(["--train-iters", "3", "--lengths", "64", "128", "--windows", "2", "--no-plot"])["rows"]
    at_trained = {round(r["mean loss"], 5) for r in rows if r["length"] == 64}
    assert len(at_trained) == 1  # factor 1: every scaling is plain RoPE
    rows = qk_norm.main(["--iters", "4", "--lrs", "0.01", "--no-plot"])["rows"]
    with_norm = next(r for r in rows if r["qk_norm"])
    assert with_norm["max q·k/√D"] <= 4.0 * 1.1**2  # √D · g_q · g_k with D = 16 and gains still near 1
