"""Chapter 03: the RLHF pieces against hand calculations, and a seeded PPO run that really improves the true reward."""

import math
from dataclasses import replace

import pytest
import torch

from ch03.ppo import AdaptiveKLController, PPOConfig, gae, ppo_losses, train_ppo
from ch03.reward_model import bradley_terry_loss, group_bt_loss, pairs_from_groups
from ch03.true_reward import score_text, true_reward

# short seeded PPO runs on the tiny policy (fixed β, a larger lr than the scripts' so 8-10 iterations show an effect)
SHORT_PPO = PPOConfig(
    iters=8, batch_size=32, minibatch_size=16, ppo_epochs=2, lr=3e-4, target_kl=None, init_kl_coef=0.02, response_len=24
)


def test_bradley_terry_loss_matches_hand_calculation():
    r_c, r_r = torch.tensor([2.0, 0.5, 3.0]), torch.tensor([1.0, 1.5, -2.0])
    sig = lambda x: 1 / (1 + math.exp(-x))
    expected = -(math.log(sig(1.0)) + math.log(sig(-1.0)) + math.log(sig(5.0))) / 3
    assert bradley_terry_loss(r_c, r_r).item() == pytest.approx(expected, rel=1e-6)
    # a huge margin stays finite (logsigmoid, not log(sigmoid))
    assert torch.isfinite(bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0])))


def test_group_bt_loss_uses_exactly_the_pairs_beyond_the_margin():
    # one prompt, K = 3 responses with true rewards 2.0, 1.5, 0.0: with margin 1.0 only (0 ≻ 2) and (1 ≻ 2) are labelled
    true = torch.tensor([[2.0, 1.5, 0.0]])
    scores = torch.tensor([[0.3, -0.2, 0.1]])
    expected = bradley_terry_loss(torch.tensor([0.3, -0.2]), torch.tensor([0.1, 0.1]))
    assert group_bt_loss(scores, true, min_gap=1.0).item() == pytest.approx(expected.item())
    seqs = torch.arange(3)[None, :, None].expand(1, 3, 4)  # (1, K, T): response i is all i
    pairs = pairs_from_groups({"seqs": seqs, "true": true}, min_gap=1.0)
    assert pairs["chosen"][:, 0].tolist() == [0, 1] and pairs["rejected"][:, 0].tolist() == [2, 2]
    # no labelled pair: zero loss, still differentiable
    s = scores.clone().requires_grad_()
    group_bt_loss(s, torch.zeros(1, 3), min_gap=1.0).backward()
    assert s.grad.abs().sum() == 0


def test_gae_matches_hand_computed_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    # δ2 = 1 − 0.7 = 0.3;  δ1 = 0 + 0.7 − 0.6 = 0.1;  δ0 = 0 + 0.6 − 0.5 = 0.1   (γ = 1, terminal after the last token)
    # A2 = 0.3;  A1 = 0.1 + 0.9·0.3 = 0.37;  A0 = 0.1 + 0.9·0.37 = 0.433        (λ = 0.9)
    adv, ret = gae(rewards, values, gamma=1.0, lam=0.9)
    torch.testing.assert_close(adv, torch.tensor([[0.433, 0.37, 0.3]]))
    torch.testing.assert_close(ret, adv + values)
    # λ = 1: returns are the Monte-Carlo discounted reward-to-go, whatever the values
    _, ret1 = gae(rewards, values, gamma=0.5, lam=1.0)
    torch.testing.assert_close(ret1, torch.tensor([[0.25, 0.5, 1.0]]))
    # λ = 0: one-step TD errors
    adv0, _ = gae(rewards, values, gamma=1.0, lam=0.0)
    torch.testing.assert_close(adv0, torch.tensor([[0.1, 0.1, 0.3]]))


def test_ppo_clipped_loss_on_crafted_ratios():
    ratios = torch.tensor([[0.5, 1.0, 1.5, 0.5, 1.0, 1.5]])
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0]])
    logp = ratios.log().requires_grad_()
    zeros = torch.zeros_like(adv)
    out = ppo_losses(logp, zeros, adv, zeros, zeros, zeros, clip_eps=0.2, vf_clip=0.2)
    # per token min(ρA, clip(ρ,0.8,1.2)A): A=+1 -> 0.5, 1.0, 1.2;  A=−1 -> −0.8, −1.0, −1.5
    assert out["pg_loss"].item() == pytest.approx(-(0.5 + 1.0 + 1.2 - 0.8 - 1.0 - 1.5) / 6)
    assert out["clip_frac"].item() == pytest.approx(4 / 6)
    out["pg_loss"].backward()
    # no gradient where the clipped branch is the pessimistic one (ρ>1+ε with A>0, ρ<1−ε with A<0)
    grad = logp.grad[0]
    assert grad[2] == 0 and grad[3] == 0
    assert grad[0] != 0 and grad[5] != 0 and grad[1] != 0


def test_ppo_value_loss_is_clipped():
    values, old, ret = torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]])
    z = torch.zeros(1, 1)
    out = ppo_losses(z, z, z, values, old, ret, clip_eps=0.2, vf_clip=0.2)
    # unclipped (1−2)² = 1; clipped value 0.2 -> (0.2−2)² = 3.24; the max is taken, ×0.5
    assert out["vf_loss"].item() == pytest.approx(0.5 * 3.24)


def test_adaptive_kl_controller_moves_beta_the_right_way():
    ctl = AdaptiveKLController(0.1, target=4.0, horizon=100)
    assert ctl.update(6.0, n_steps=10) > 0.1  # too much KL -> stronger penalty
    ctl = AdaptiveKLController(0.1, target=4.0, horizon=100)
    assert ctl.update(2.0, n_steps=10) < 0.1  # too little -> weaker
    ctl = AdaptiveKLController(0.1, target=4.0, horizon=100)
    assert ctl.update(4.0, n_steps=10) == pytest.approx(0.1)
    ctl = AdaptiveKLController(0.1, target=4.0, horizon=100)  # error clipped at +20%: β·(1 + 0.2·10/100)
    assert ctl.update(400.0, n_steps=10) == pytest.approx(0.1 * 1.02)


def test_rollout_tokens_and_logprobs_are_pinned():
    """Tokens and log-prob sums recorded with the pre-refactor rollout loop; now ch01's ``generate`` draws the tokens
    (same tokens, same RNG use) and PPO's log-probs come from one forward over the finished sequences."""
    from ch01.model import GPT, GPTConfig
    from ch03.rollout import generate, response_logprobs

    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=65)).eval()
    prompts = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    greedy = generate(model, prompts, 20, temperature=0)
    assert greedy[:, 4:14].tolist() == [[28] * 6 + [3, 16, 9, 47], [0, 53, 45, 44, 60, 31, 33, 53, 45, 44]]
    seqs = generate(model, prompts, 20, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert seqs[:, 4:12].tolist() == [[58, 38, 48, 46, 49, 49, 30, 32], [9, 62, 51, 28, 55, 13, 62, 57]]
    with torch.no_grad():
        logp = response_logprobs(model, seqs, 4)  # (2, 20)
    assert logp.sum(1).tolist() == pytest.approx([-83.00709, -83.1692], abs=1e-3)
    # greedy tokens are each step's most likely token under that same forward
    with torch.no_grad():
        assert torch.equal(model(greedy)[:, 3:-1].argmax(-1), greedy[:, 4:])


def test_true_reward_prefers_varied_positive_real_words():
    good = score_text(" O sweet and gentle love, be merry and kind to me.")["reward"]
    neutral = score_text(" I will not speak with him, my lord, for he is\n")["reward"]
    assert good > neutral > score_text(" death and blood, thou villain, thou art a traitor")["reward"]
    assert neutral > score_text(" love love love love love love love love love lo")["reward"]  # repetition
    assert neutral > score_text(" lovelyswee tlovefai rgoodgentl ejoyhapp ynoble")["reward"]  # non-words
    assert true_reward(["a", "b"]).shape == (2,)


@pytest.mark.timeout(240)
def test_short_ppo_run_raises_true_reward_of_tiny_policy(one_thread):
    """PPO machinery end to end: with the true reward as a (verifiable) reward, a seeded short run must improve it."""
    from ch03.evaluate import evaluate_policy
    from ch03.rollout import decode_responses, load_policy

    policy, tok, ids = load_policy("tiny", 200)

    def reward_fn(seqs):
        return true_reward(decode_responses(tok, seqs, 16))

    cfg = SHORT_PPO
    trained, hist = train_ppo(policy, reward_fn, tok, ids, cfg, seed=0, log=lambda *a: None)
    assert len(hist) == cfg.iters + 1 and all(math.isfinite(h["kl"]) for h in hist)
    kw = dict(n=128, response_len=24, seed=7)
    before = evaluate_policy(policy, policy, reward_fn, tok, ids, **kw)["true_reward"]
    after = evaluate_policy(trained, policy, reward_fn, tok, ids, **kw)
    assert after["true_reward"] > before + 0.2, (before, after)
    assert after["kl"] > 0  # it moved away from the reference


@pytest.mark.timeout(300)
def test_short_ppo_run_against_a_learned_reward_model_raises_true_reward(one_thread):
    """The full RLHF loop on the tiny policy: a reward model learned from labelled pairs only, then PPO against it
    (the true reward is used only to label pairs and to evaluate) must raise the true reward on fresh prompts, and
    beat a same-seed PPO run whose reward carries no information (a constant)."""
    from ch03.evaluate import evaluate_policy
    from ch03.reward_model import get_reward_model
    from ch03.rollout import decode_responses

    out = get_reward_model(
        "tiny",
        200,
        n_prompts=300,
        n_eval_prompts=100,
        k=6,
        min_gap=0.25,
        epochs=2,
        use_cache=False,
        log=lambda *a: None,
    )
    policy, tok, ids, rm = out["policy"], out["tok"], out["train_ids"], out["rm"]
    cfg = replace(SHORT_PPO, iters=10)
    quiet = lambda *a: None
    trained, hist = train_ppo(policy, rm, tok, ids, cfg, seed=0, log=quiet)
    control, _ = train_ppo(policy, lambda seqs: torch.zeros(len(seqs)), tok, ids, cfg, seed=0, log=quiet)
    true_fn = lambda seqs: true_reward(decode_responses(tok, seqs, 16))
    kw = dict(n=128, response_len=24, seed=7)
    before = evaluate_policy(policy, policy, true_fn, tok, ids, **kw)["true_reward"]
    after = evaluate_policy(trained, policy, true_fn, tok, ids, **kw)["true_reward"]
    after_control = evaluate_policy(control, policy, true_fn, tok, ids, **kw)["true_reward"]
    assert hist[-1]["rm_reward"] > hist[0]["rm_reward"]  # it optimised the reward model ...
    assert after > before + 0.3, (before, after)  # ... and that carried over to the hidden true reward
    assert after > after_control + 0.3, (after_control, after)
