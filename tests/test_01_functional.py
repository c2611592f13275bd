"""ch01.functional: every from-scratch piece against its torch counterpart."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ch01 import functional as Fn


def test_linear_embedding_silu_softmax():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 5, 7), torch.randn(4, 7), torch.randn(4)
    torch.testing.assert_close(Fn.linear(x, w, b), F.linear(x, w, b))
    ids, table = torch.randint(0, 10, (2, 6)), torch.randn(10, 3)
    torch.testing.assert_close(Fn.embedding(ids, table), F.embedding(ids, table))
    torch.testing.assert_close(Fn.silu(x), F.silu(x))
    big = torch.randn(4, 9) * 1000  # exp() would overflow without the max trick
    torch.testing.assert_close(Fn.softmax(big, -1), torch.softmax(big, -1))
    assert torch.isfinite(Fn.softmax(big, 0)).all()


def test_rmsnorm_matches_torch():
    x, g = torch.randn(2, 5, 16), torch.randn(16)
    torch.testing.assert_close(Fn.rmsnorm(x, g, 1e-5), torch.nn.functional.rms_norm(x, (16,), g, 1e-5))


def test_swiglu_matches_composition():
    x, w1, w2, w3 = torch.randn(3, 8), torch.randn(12, 8), torch.randn(8, 12), torch.randn(12, 8)
    torch.testing.assert_close(Fn.swiglu(x, w1, w2, w3), F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2))


@pytest.mark.parametrize("leading", [(), (3,), (2, 3)])
def test_sdpa_any_leading_dims_with_mask(leading):
    q, k, v = torch.randn(*leading, 5, 8), torch.randn(*leading, 7, 8), torch.randn(*leading, 7, 8)
    mask = torch.rand(5, 7) > 0.3
    mask[:, 0] = True  # every query sees something
    torch.testing.assert_close(
        Fn.scaled_dot_product_attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    )


def test_rope_matches_hf_llama_rotary():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(
        hidden_size=64, num_attention_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 500.0}
    )
    x = torch.randn(1, 4, 9, 16)
    pos = torch.arange(3, 12)
    cos, sin = LlamaRotaryEmbedding(cfg)(x, pos[None])
    ref, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(Fn.rope(x, pos, theta=500.0), ref)
    # a rotation: norms are preserved and q·k depends only on the position difference
    q, k = torch.randn(16), torch.randn(16)
    d1 = Fn.rope(q[None], torch.tensor([5]))[0] @ Fn.rope(k[None], torch.tensor([2]))[0]
    d2 = Fn.rope(q[None], torch.tensor([13]))[0] @ Fn.rope(k[None], torch.tensor([10]))[0]
    torch.testing.assert_close(d1, d2)


def test_cross_entropy_stable_and_ignore_index():
    logits, t = torch.randn(2, 6, 11) * 50, torch.randint(0, 11, (2, 6))
    t[0, 0] = -100
    torch.testing.assert_close(Fn.cross_entropy(logits, t), F.cross_entropy(logits.view(-1, 11), t.view(-1)))


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p) * 5
        q.grad = p.grad.clone()
    n1 = Fn.clip_grad_norm(a, 1.0)
    n2 = torch.nn.utils.clip_grad_norm_(b, 1.0)
    torch.testing.assert_close(n1, n2)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)


def test_adamw_matches_torch_over_1000_steps():
    torch.manual_seed(0)
    m1 = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    m2 = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    m2.load_state_dict(m1.state_dict())
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    o1, o2 = Fn.AdamW(m1.parameters(), **kw), torch.optim.AdamW(m2.parameters(), **kw)
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 3, dtype=torch.float64)
    for _ in range(1000):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert (p - q).abs().max().item() < 1e-6


def test_cosine_lr_schedule_shape():
    lr = lambda it: Fn.cosine_lr(it, 1.0, 0.1, 10, 110)
    assert lr(0) == 0.0 and lr(5) == 0.5 and lr(10) == 1.0
    assert math.isclose(lr(60), 0.55) and lr(110) == 0.1 and lr(500) == 0.1
    assert all(lr(i) >= lr(i + 1) for i in range(10, 120))


def test_checkpoint_helpers_round_trip(tmp_path):
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    Fn.save_checkpoint(m, opt, 17, tmp_path / "c.safetensors")
    m2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(m2.parameters())
    assert Fn.load_checkpoint(tmp_path / "c.safetensors", m2, opt2) == 17
    assert torch.equal(m.weight, m2.weight)
    assert torch.equal(opt.state[m.weight]["exp_avg"], opt2.state[m2.weight]["exp_avg"])
