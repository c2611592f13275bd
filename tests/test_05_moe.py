"""ch05.moe: the MoE layer against a dense MLP, hand-computed routing / aux losses, capacity dropping and residual pass."""

import math

import pytest
import torch

from ch01.model import GPT, MLP, Block, GPTConfig, attention_mask
from ch05.moe import MoE, MoEConfig, MoEGPT, load_balancing_loss, router_z_loss

CFG = GPTConfig.preset("tiny", vocab_size=65)


def test_one_expert_equals_dense_mlp():
    torch.manual_seed(0)
    dense = MLP(CFG)
    moe = MoE(CFG, MoEConfig(n_experts=1, top_k=1))
    moe.experts[0].load_state_dict(dense.state_dict())
    x = torch.randn(3, 10, CFG.n_embd)
    torch.testing.assert_close(moe(x), dense(x), rtol=0, atol=1e-6)


def test_one_expert_moegpt_equals_gpt():
    torch.manual_seed(0)
    gpt = GPT(CFG)
    moe_gpt = MoEGPT(CFG, MoEConfig(n_experts=1, top_k=1))
    state = {k.replace(".mlp.", ".mlp.experts.0."): v for k, v in gpt.state_dict().items()}
    for i in range(CFG.n_layer):
        state[f"blocks.{i}.mlp.router.weight"] = moe_gpt.blocks[i].mlp.router.weight
    moe_gpt.load_state_dict(state)
    idx = torch.randint(0, 65, (2, 16))
    torch.testing.assert_close(moe_gpt(idx), gpt(idx), rtol=0, atol=1e-5)
    assert moe_gpt.num_active_params() == moe_gpt.num_params()


def _planted_router(moe: MoE, n_embd: int):
    """Router logit of expert i = 10 · x[i]: the experts a token picks are the coordinates where it is largest."""
    w = torch.zeros(moe.moe.n_experts, n_embd)
    w[:, : moe.moe.n_experts] = 10 * torch.eye(moe.moe.n_experts)
    moe.router.weight.data.copy_(w)


@pytest.mark.parametrize("top_k", [1, 2])
def test_routing_picks_planted_experts_and_combines(top_k):
    torch.manual_seed(0)
    n = 4
    moe = MoE(CFG, MoEConfig(n_experts=n, top_k=top_k))
    _planted_router(moe, CFG.n_embd)
    x = 0.01 * torch.randn(1, 6, CFG.n_embd)
    want = [(2, 0), (1, 3), (3, 2), (0, 1), (2, 1), (3, 0)]  # (first, second) choice per token
    for t, (a, b) in enumerate(want):
        x[0, t, a], x[0, t, b] = 1.0, 0.6
    probs, gates, idx, _ = moe.route(x[0])
    assert idx.tolist() == [list(w[:top_k]) for w in want]
    out = moe(x)[0]
    for t in range(len(want)):  # by hand: Σ gate · expert(x), gates renormalised over the k chosen (k = 2)
        p = probs[t, list(want[t][:top_k])]
        g = p / p.sum() if top_k > 1 else p
        manual = sum(g[j] * moe.experts[e](x[0, t : t + 1])[0] for j, e in enumerate(want[t][:top_k]))
        torch.testing.assert_close(out[t], manual, rtol=1e-5, atol=1e-6)
    moe.dispatch = "naive"
    torch.testing.assert_close(moe(x)[0], out, rtol=1e-5, atol=1e-6)


def test_aux_losses_match_hand_calculation():
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 3.0, 0.0], [0.2, 0.0, 0.1]])
    chosen = torch.tensor([[0], [0], [1], [0]])  # top-1 of each row
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]
    f = [3 / 4, 1 / 4, 0.0]
    P = [sum(r[i] for r in probs) / 4 for i in range(3)]
    want_lb = 3 * sum(fi * pi for fi, pi in zip(f, P))
    got_lb = load_balancing_loss(logits.softmax(-1), chosen, 3)
    assert got_lb.item() == pytest.approx(want_lb, rel=1e-6)
    want_z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 4
    assert router_z_loss(logits).item() == pytest.approx(want_z, rel=1e-6)
    uniform = torch.full((8, 4), 0.25)  # perfectly balanced routing gives exactly 1
    assert load_balancing_loss(uniform, torch.arange(8).remainder(4)[:, None], 4).item() == pytest.approx(1.0)


def test_capacity_drops_and_dropped_tokens_ride_the_residual():
    torch.manual_seed(0)
    n, S = 4, 16
    moe = MoE(CFG, MoEConfig(n_experts=n, top_k=1, capacity_factor=1.0))
    moe.router.weight.data.zero_()
    moe.router.weight.data[0] = 1.0  # every (positive) token prefers expert 0
    x = torch.rand(1, S, CFG.n_embd) + 0.1
    cap = moe.capacity(S)
    assert cap == 4
    out = moe(x)[0]
    assert moe.last_counts.tolist() == [cap, 0, 0, 0]
    assert moe.last_dropped == pytest.approx(1 - cap / S)
    assert out[:cap].abs().sum(-1).gt(0).all()  # first come, first served
    assert torch.equal(out[cap:], torch.zeros_like(out[cap:]))
    block = Block(CFG, 0)
    block.mlp = moe
    mask = attention_mask(torch.arange(S), S, None, None)  # plain causal, as GPT.forward builds it (no RoPE here)
    with torch.no_grad():
        y = block(x, None, None, None, mask)
        attn_only = x + block.attn(block.attn_norm(x), None, None, None, mask)
    torch.testing.assert_close(y[0, cap:], attn_only[0, cap:])  # dropped: residual only
    assert not torch.allclose(y[0, :cap], attn_only[0, :cap])
    moe.moe.capacity_factor = None  # dropless
    moe(x)
    assert moe.last_counts.tolist() == [S, 0, 0, 0] and moe.last_dropped == 0.0


def test_moegpt_aux_loss_has_router_gradient():
    torch.manual_seed(0)
    model = MoEGPT(CFG, MoEConfig(n_experts=4, top_k=2))
    idx = torch.randint(0, 65, (2, 16))
    model.loss(idx, idx).backward(retain_graph=False)
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0  # through the gates
    model.zero_grad()
    model(idx)
    model.aux_loss().backward()
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0  # through P_i and the z-loss
    expert = sum(p.numel() for p in model.blocks[0].mlp.experts[0].parameters())
    assert model.num_params() - model.num_active_params() == 2 * expert * CFG.n_layer
