"""GRPO from scratch: reinforcement learning from verifiable rewards, no value network, no reward model.

    from ch03.grpo import GRPOConfig, grpo_train, accuracy
    history = grpo_train(model, chat_tok, train_examples, GRPOConfig(steps=60, group_size=8))
    accuracy(model, chat_tok, test_examples)          # {"add": 0.61, ...}: greedy replies, exact match

Each step samples ``prompts_per_step`` questions and G = ``group_size`` replies to each with ch01's ``generate``, scores
every reply with the task's checker (1 right, 0 wrong), and turns rewards into advantages *relative to the group*:
A_i = (r_i − mean_group) / (std_group + 1e-4) — the group is the baseline a PPO critic would have learned. The loss is
PPO's clipped surrogate per token plus a KL penalty to the frozen starting model, with the k3 estimator
exp(ref − logp) − (ref − logp) − 1 (unbiased, always ≥ 0):

    L = −mean_seq mean_tok [ min(ρ_t A, clip(ρ_t, 1−ε, 1+ε) A) − β·KL3_t ],   ρ_t = π_θ(y_t) / π_old(y_t)

``dr_grpo=True`` is Dr. GRPO: no division by the group std (it over-weights groups that are almost all right or all
wrong) and no division by each reply's length (which favours long wrong answers); the token sum is divided by the
constant N·max_new_tokens instead. tests/test_03_posttrain.py checks this loss against TRL's ``GRPOTrainer._compute_loss``
on the same log-probabilities, advantages and masks, for both variants. Refs: Shao et al. 2024 (DeepSeekMath, GRPO),
DeepSeek-AI 2025 (R1), Liu et al. 2025 (Dr. GRPO), Schulman 2020 (k3 KL estimator).

    python 03_rlhf/grpo.py        # toy: a tiny random model learns which letter the reward wants (seconds)
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ch01.chat_template import render_chat
from ch01.generate import generate
from ch03.tasks import Example, check, score_examples


@dataclass
class GRPOConfig:
    steps: int = 40
    prompts_per_step: int = 8
    group_size: int = 8  # G replies per prompt
    max_new_tokens: int = 8
    temperature: float = 1.0
    lr: float = 5e-5
    beta: float = 0.04  # KL coefficient (0 = no reference model)
    epsilon: float = 0.2  # clip range of the importance ratio
    inner_steps: int = 1  # optimizer steps per batch of rollouts (μ; > 1 makes the ratio and clipping matter)
    dr_grpo: bool = False
    grad_clip: float = 1.0
    seed: int = 0


def prompt_ids(tok, messages: list[dict]) -> list[int]:
    """The conversation so far, rendered with the tokenizer's template, ending in the assistant header."""
    return tok.encode(render_chat(tok.chat_template, messages, add_generation_prompt=True))


def sample_replies(model, tok, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, generator=None):
    """(completion ids (N, Tc) padded with 0, mask (N, Tc) 1 on generated tokens incl. the end marker, texts)."""
    outs = generate(model, prompts, max_new_tokens, temperature=temperature, stop_ids=[tok.eos_id], generator=generator)
    width = max(1, max(len(o) for o in outs))
    ids = torch.zeros(len(outs), width, dtype=torch.long)
    mask = torch.zeros(len(outs), width)
    for i, o in enumerate(outs):
        ids[i, : len(o)], mask[i, : len(o)] = torch.tensor(o, dtype=torch.long), 1.0
    texts = [tok.decode([t for t in o if t != tok.eos_id]) for o in outs]
    return ids, mask, texts


def completion_logprobs(model, prompts: list[list[int]], completions: torch.Tensor, temperature: float = 1.0):
    """log π(completion token | everything before it), (N, Tc); prompts may differ in length (no padding inside)."""
    N, Tc = completions.shape
    device = next(model.parameters()).device
    lens = torch.tensor([len(p) for p in prompts], device=device)  # (N,)
    seq = torch.zeros(N, int(lens.max()) + Tc, dtype=torch.long, device=device)  # (N, T): prompt, reply, padding
    for i, p in enumerate(prompts):
        seq[i, : len(p)] = torch.tensor(p)
        seq[i, len(p) : len(p) + Tc] = completions[i]
    logits = model(seq[:, :-1]).float() / temperature  # (N, T-1, V); padding after a row never reaches its reply
    logp = logits.log_softmax(-1).gather(-1, seq[:, 1:, None]).squeeze(-1)  # (N, T-1): log p of each next token
    where = lens[:, None] - 1 + torch.arange(Tc, device=device)  # (N, Tc): the slot predicting reply token j
    return logp.gather(1, where)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """(N,) rewards of N/G groups -> advantages: minus the group mean; ``scale``: divided by the group's (unbiased)
    std + 1e-4 (GRPO; Dr. GRPO does not scale)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.view(-1, group_size).float()  # (groups, G)
    adv = r - r.mean(1, keepdim=True)
    if scale:
        adv = adv / (r.std(1, keepdim=True) + 1e-4)
    return adv.flatten()


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, *, beta=0.04, epsilon=0.2, dr_grpo=False, max_len=None):
    """The GRPO (or Dr. GRPO) loss from per-token log-probs (N, Tc) and advantages (N,); returns (loss, stats)."""
    ratio = torch.exp(logps - old_logps)  # (N, Tc): 1 on the first step after sampling, gradient ∇logp
    adv = advantages[:, None]  # (N, 1)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon) * adv)  # (N, Tc)
    kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1 if beta else torch.zeros_like(logps)  # k3, (N, Tc)
    per_token = per_token + beta * kl
    if dr_grpo:
        loss = (per_token * mask).sum() / (len(logps) * (max_len or logps.shape[1]))
    else:
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
    n = mask.sum().clamp(min=1.0)
    stats = {"kl": float((kl.detach() * mask).sum() / n), "clip_frac": float((clipped.float() * mask).sum() / n)}
    return loss, stats


RewardFn = Callable[[Example, str], float]


def _rollout(model, tok, batch: list[Example], cfg: GRPOConfig, gen, reward_fn: RewardFn):
    prompts = [prompt_ids(tok, ex.prompt_messages()) for ex in batch for _ in range(cfg.group_size)]
    model.eval()
    ids, mask, texts = sample_replies(model, tok, prompts, cfg.max_new_tokens, cfg.temperature, gen)
    exs = [ex for ex in batch for _ in range(cfg.group_size)]
    rewards = torch.tensor([float(reward_fn(ex, t)) for ex, t in zip(exs, texts)])  # (N,)
    return prompts, ids, mask, rewards


def grpo_train(
    model, tok, examples: list[Example], cfg: GRPOConfig, reward_fn: RewardFn = check, callback=None
) -> dict:
    """Train ``model`` in place with GRPO on prompts drawn from ``examples``; rewards from ``reward_fn(example,
    reply text)`` (default: the task checker). Returns {'reward': mean per step, 'kl': ..., 'clip_frac': ...}."""
    if len(examples) < cfg.prompts_per_step:
        raise ValueError(f"need at least prompts_per_step={cfg.prompts_per_step} examples, got {len(examples)}")
    torch.manual_seed(cfg.seed)
    rng, gen = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if cfg.beta else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    history: dict[str, list[float]] = {"reward": [], "kl": [], "clip_frac": []}
    for step in range(cfg.steps):
        prompts, ids, mask, rewards = _rollout(
            model, tok, rng.sample(examples, cfg.prompts_per_step), cfg, gen, reward_fn
        )
        adv = group_advantages(rewards, cfg.group_size, scale=not cfg.dr_grpo)
        with torch.no_grad():
            old = completion_logprobs(model, prompts, ids, cfg.temperature)
            ref_lp = completion_logprobs(ref, prompts, ids, cfg.temperature) if ref is not None else old
        model.train()
        for _ in range(cfg.inner_steps):
            logps = completion_logprobs(model, prompts, ids, cfg.temperature)
            kw = dict(beta=cfg.beta, epsilon=cfg.epsilon, dr_grpo=cfg.dr_grpo, max_len=cfg.max_new_tokens)
            loss, stats = grpo_loss(logps, old, ref_lp, adv, mask, **kw)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
        history["reward"].append(float(rewards.mean()))
        for k, v in stats.items():
            history[k].append(v)
        if callback is not None:
            callback(step, history)
    model.eval()
    return history


def accuracy(model, tok, examples: list[Example], max_new_tokens: int = 12, batch_size: int = 64) -> dict[str, float]:
    """Held-out exact-match accuracy per task: greedy replies checked by the task checker (``tasks.score_examples``)."""
    return score_examples(model, tok, examples, max_new_tokens, batch_size)


def plot_history(history: dict, path, title: str = "GRPO"):
    """Reward and KL to the reference per step (common.plot)."""
    from common.plot import line_plot

    steps = range(1, len(history["reward"]) + 1)
    series = {"mean reward": (steps, history["reward"]), "KL to reference (k3)": (steps, history["kl"])}
    return line_plot(series, path, title=title, xlabel="GRPO step", ylabel="value", marker="")


def toy_problem(seed: int = 0):
    """(tiny random model, tokenizer, prompts, reward): the reward is 1 when the reply starts with "a" (about 1 in 20
    random replies at first) — small enough for CPU seconds, enough signal to learn."""
    from ch01.char_tokenizer import CharTokenizer
    from ch01.model import GPT, GPTConfig
    from ch03.sft import ChatTokenizer

    torch.manual_seed(seed)
    tok = ChatTokenizer(CharTokenizer("abcdefgh? \n"), extra_chars="usernti")  # + the role names
    model = GPT(GPTConfig.preset("tiny", vocab_size=tok.vocab_size))
    toy = [Example("toy", q, "a", q) for q in ("abc?", "bad?", "cab?", "fed?", "hag?", "bed?", "dab?", "gag?")]
    return model, tok, toy, lambda ex, text: float(text.startswith("a"))


def main(argv=None) -> dict:
    from common.cli import base_parser
    from common.plot import assets_dir

    p = base_parser(__doc__, seed=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--dr-grpo", action="store_true", help="Dr. GRPO: no std / length normalisation")
    args = p.parse_args(argv)
    model, tok, toy, reward = toy_problem(args.seed)
    cfg = GRPOConfig(steps=args.steps, max_new_tokens=2, lr=3e-3, dr_grpo=args.dr_grpo, seed=args.seed)
    history = grpo_train(model, tok, toy, cfg, reward_fn=reward)
    path = plot_history(history, assets_dir(__file__) / "grpo_toy.png", title="GRPO toy: reply starting with 'a'")
    first, last = history["reward"][:5], history["reward"][-5:]
    print(f"mean reward: first 5 steps {sum(first) / 5:.2f} -> last 5 steps {sum(last) / 5:.2f}; plot: {path}")
    return history


if __name__ == "__main__":
    main()
