"""ch09 STaR round (filtering and rationalisation) and the continuous-depth transformer (Euler x1 == ch01 block,
adjoint == backprop through the block ODE)."""

from __future__ import annotations

import pytest
import torch

import ch09.self_improve as star
from ch01.model import GPT, GPTConfig
from ch09.arith_tasks import make_problems
from ch09.ode_transformer import DepthGPT
from ch09.seq2seq import finetune, task_model, task_tokenizer


def test_final_answer_parsing():
    assert star.final_answer("3*4=12, 12+1=13 #13") == 13
    assert star.final_answer("3*4=12 #1#3") == 3
    assert star.final_answer("no answer") is None and star.final_answer("# x") is None


def test_star_round_keeps_only_correct_and_strips_hints(monkeypatch):
    pool = make_problems(6, seed=2, max_value=9)
    scripted = {}
    for i, p in enumerate(pool):  # plain attempt: right for 0, 1; wrong / malformed for the rest
        scripted[p.text] = star.completion(p) if i < 2 else (f"{p.rationale} #{p.answer + 1}" if i % 2 else "garbage")
        # hinted attempt: right for 2 and 3 only
        scripted[star.hinted(p.text, p.answer)] = star.completion(p) if i in (2, 3) else f"x #{p.answer + 7}"
    calls = []

    def fake_complete(model, tok, prompts, max_new_tokens):
        calls.append(list(prompts))
        return [scripted[q] for q in prompts]

    monkeypatch.setattr(star, "greedy_complete", fake_complete)
    stats = star.star_round(None, None, pool)
    assert stats.correct == 2 and stats.rationalized == 2
    assert [q for q, _ in stats.kept] == [p.text for p in pool[:4]]  # hints removed from the training prompts
    for (_, out), p in zip(stats.kept, pool):
        assert star.final_answer(out) == p.answer
    assert len(calls[1]) == 4 and all("(answer " in q for q in calls[1])  # only failures are rationalised
    assert len(star.star_round(None, None, pool, rationalize=False).kept) == 2


@pytest.mark.timeout(180)
def test_one_real_star_round_on_a_tiny_budget_filters_correctly():
    torch.manual_seed(0)
    tok = task_tokenizer()
    model = task_model(tok, n_layer=1, n_embd=32, block_size=96)
    seed = make_problems(32, seed=0, max_value=5)
    finetune(model, tok, [(p.text, star.completion(p)) for p in seed], iters=30, batch_size=16, lr=3e-3)
    pool = make_problems(12, seed=1, max_value=5)
    stats = star.star_round(model, tok, pool, max_new_tokens=24)
    truth = {p.text: p.answer for p in pool}
    assert len(stats.kept) == stats.correct + stats.rationalized <= len(pool)
    assert all(star.final_answer(out) == truth[q] for q, out in stats.kept)


def test_euler_one_step_is_exactly_the_ch01_block():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16)
    depth = DepthGPT(cfg, "euler", steps=1)
    ref = GPT(cfg)
    ref.load_state_dict(depth.gpt.state_dict())
    idx = torch.randint(0, 20, (2, 10))
    torch.testing.assert_close(depth(idx), ref(idx), rtol=1e-5, atol=1e-6)


def test_block_ode_adjoint_gradients_match_backprop():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16)
    bp = DepthGPT(cfg, "rk4", depth=1.0, steps=8).double()
    adj = DepthGPT(cfg, "rk4", depth=1.0, steps=8, adjoint=True).double()
    adj.load_state_dict(bp.state_dict())
    idx = torch.randint(0, 20, (2, 10))
    for m in (bp, adj):
        m.loss(idx[:, :-1], idx[:, 1:]).backward()
    for (name, a), (_, b) in zip(bp.named_parameters(), adj.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-8, msg=name)
