"""ch05.gated_deltanet: the chunked form equals the recurrent form equals the paper's matrix recurrence; the mixer in
ch01's GPT (layer_pattern) decodes with a constant-size cache exactly as the full forward; bad uses fail clearly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ch01.cache import KVCache
from ch01.generate import generate
from ch01.model import GPT, GPTConfig
from ch05.gated_deltanet import gated_delta_chunked, gated_delta_recurrent


def _inputs(B=2, H=3, T=37, Dk=8, Dv=6, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    q, k, v = r(B, H, T, Dk), F.normalize(r(B, H, T, Dk), dim=-1), r(B, H, T, Dv)
    g = -torch.rand(B, H, T, generator=gen, dtype=torch.float64) * 2  # log alpha in (-2, 0]
    beta = torch.rand(B, H, T, generator=gen, dtype=torch.float64)
    S0 = r(B, H, Dk, Dv)
    ts = [q, k, v, g, beta, S0]
    return [t.requires_grad_(grad) for t in ts]


def test_recurrent_form_is_the_papers_matrix_recurrence():
    """S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T q_t, written with explicit matrices."""
    q, k, v, g, beta, S = _inputs(B=1, H=1, T=6)
    eye = torch.eye(k.shape[-1], dtype=k.dtype)
    outs = []
    for t in range(6):
        kt, vt = k[0, 0, t, :, None], v[0, 0, t, :, None]  # (Dk, 1), (Dv, 1)
        S = g[0, 0, t].exp() * (eye - beta[0, 0, t] * kt @ kt.T) @ S[0, 0] + beta[0, 0, t] * kt @ vt.T
        S = S[None, None]
        outs.append(S[0, 0].T @ q[0, 0, t])
    o, S_end = gated_delta_recurrent(*_inputs(B=1, H=1, T=6))
    torch.testing.assert_close(o[0, 0], torch.stack(outs))
    torch.testing.assert_close(S_end, S)


@pytest.mark.parametrize("T,chunk", [(37, 16), (32, 8), (5, 16), (1, 4)])
def test_chunked_equals_recurrent_values_and_state(T, chunk):
    q, k, v, g, beta, S0 = _inputs(T=T)
    o_ref, s_ref = gated_delta_recurrent(q, k, v, g, beta, S0)
    o, s = gated_delta_chunked(q, k, v, g, beta, S0, chunk=chunk)
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(s, s_ref, atol=1e-10, rtol=1e-10)
    o0, _ = gated_delta_chunked(q, k, v, g, beta, None, chunk=chunk)  # no initial state = zeros
    torch.testing.assert_close(o0, gated_delta_recurrent(q, k, v, g, beta, torch.zeros_like(S0))[0])


def test_chunked_gradients_equal_recurrent_gradients():
    ins = _inputs(T=21, grad=True)
    o, s = gated_delta_chunked(*ins, chunk=8)
    w_o, w_s = torch.randn_like(o), torch.randn_like(s)
    grads = torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), ins)
    o_r, s_r = gated_delta_recurrent(*ins)
    grads_ref = torch.autograd.grad((o_r * w_o).sum() + (s_r * w_s).sum(), ins)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def _hybrid(pattern="DA", **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", vocab_size=65, layer_pattern=pattern, **kw)).eval()


@pytest.mark.parametrize("pattern", ["DA", "AD", "D"])
def test_cached_decoding_equals_the_full_forward(pattern):
    model = _hybrid(pattern)
    assert [type(b.attn).__name__ for b in model.blocks] == [
        {"A": "Attention", "D": "GatedDeltaNet"}[model.config.layer_kind(i)] for i in range(2)
    ]
    idx = torch.randint(0, 65, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(2)
        pieces = [model(idx[:, :17], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(17, 23)]
        pieces.append(model(idx[:, 23:], cache=cache))  # a second multi-token chunk continues the state
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 40
    # ch01's cached generate == greedy decoding by re-running the whole sequence each step
    out = generate(model, idx[:, :5], 12, temperature=0)
    seq = idx[:, :5]
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert out == seq[:, 5:].tolist()


def test_mixer_only_cache_has_constant_size():
    model = _hybrid("D", block_size=512)
    cache = KVCache(2)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
        size = cache.nbytes
        for _ in range(60):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    assert cache.length == 68 and cache.nbytes == size > 0
    hybrid, cache_h = _hybrid("DA", block_size=512), KVCache(2)
    with torch.no_grad():
        hybrid(torch.zeros(1, 8, dtype=torch.long), cache=cache_h)
        small = cache_h.nbytes
        hybrid(torch.zeros(1, 300, dtype=torch.long), cache=cache_h)
    assert cache_h.nbytes > small  # the attention layer's keys grow


def test_bad_patterns_and_uses_fail_clearly():
    with pytest.raises(ValueError, match="layer_pattern"):
        GPTConfig.preset("tiny", layer_pattern="DX")
    with pytest.raises(ValueError, match="must divide n_layer"):
        GPTConfig.preset("tiny", layer_pattern="DDA")  # 2 layers
    model = _hybrid("DA")
    with pytest.raises(ValueError, match="ragged"):
        generate(model, [[1, 2, 3], [4, 5]], 3)
    cache = KVCache(2)
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="recurrent states"):
        cache.crop(3)
    with pytest.raises(ValueError, match="attn_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), attn_mask=torch.ones(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="cannot be exported"):
        from ch01.hf_interop import hf_config

        hf_config(model.config)
    assert model.config.attention_variants() == ["layer_pattern"]  # engines that re-implement attention refuse it


def test_hybrid_trains_and_saves(tmp_path):
    from ch01.train import TrainConfig, prepare_data, train

    tok, tr, va = prepare_data("char")
    tc = TrainConfig(
        max_iters=30,
        batch_size=8,
        lr=3e-3,
        warmup_iters=3,
        eval_iters=4,
        progress=False,
        out_dir=str(tmp_path),
        device="cpu",
    )
    res = train(GPTConfig.preset("tiny", vocab_size=65, block_size=32, layer_pattern="DA"), tc, tr, va)
    assert res["val"][-1][2] < 3.3  # uniform over 65 chars is 4.17
    loaded = GPT.load(tmp_path / "model")
    x = torch.randint(0, 65, (1, 16))
    torch.testing.assert_close(loaded(x), res["model"](x))


def test_hybrid_script_cache_sizes_are_exact(tmp_path):
    from ch05.hybrid import main

    res = main(["--iters", "1", "--max-len", "32", "--out", str(tmp_path), "--device", "cpu"])
    mem, lengths = res["memory"], res["lengths"]
    assert lengths[-1] == 32
    # tiny: 2 layers x (k + v) x 64 floats x 4 bytes per token; KVCache doubles its capacity: 32 = a power of two
    assert mem["A"][-1] == 2 * 2 * 64 * 4 * 32
    assert len(set(mem["D"])) == 1  # DeltaNet-only: the same bytes at every length
    assert mem["A"][-1] // 2 < mem["DA"][-1] < mem["A"][-1]  # half the layers keep keys, plus one fixed state
