"""PPO for a language model, from scratch: rollouts, KL-shaped rewards, value head, GAE, clipped losses, adaptive β.

Step 2 of RLHF (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022) with PPO (Schulman et al. 2017).
Each iteration: sample responses y ~ π_θ(·|x); score them with the reward model r_φ; give every response token the reward
    r_t = −β · (log π_θ(y_t|·) − log π_ref(y_t|·))          (+ r_φ(x, y) on the last token)
so the return is r_φ − β·KL(π_θ‖π_ref); estimate advantages with GAE(γ, λ) from a value head; then a few epochs of
minibatch updates of the clipped surrogate  min(ρ·A, clip(ρ, 1±ε)·A),  a clipped value loss and an entropy bonus.
β follows Ziegler's adaptive controller: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon).

    python 03_rlhf/ppo.py                          # PPO with the adaptive KL controller, then β = 0 (reward hacking)
    python 03_rlhf/ppo.py --preset tiny --iters 200 --ppo-iters 10 --runs adaptive
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ch01.model import GPT
from ch03.reward_model import RewardModel, add_rm_args, get_reward_model, rm_kwargs
from ch03.rollout import (
    add_policy_args,
    clipped_step,
    decode_responses,
    entropy_from_logits,
    forward_with_hidden,
    generate,
    logprobs_from_logits,
    response_logprobs,
    sample_prompts,
    set_threads,
)
from ch03.true_reward import true_reward
from common.cli import base_parser
from common.seed import seed_everything


@dataclass
class PPOConfig:
    iters: int = 40  # PPO iterations (rollout + update)
    batch_size: int = 32  # rollouts per iteration
    minibatch_size: int = 8
    ppo_epochs: int = 4
    lr: float = 5e-5  # 1e-4 moved the policy faster than the KL controller could follow (measured: README)
    clip_eps: float = 0.2  # policy ratio clip
    vf_clip: float = 0.2  # value clip (in reward units)
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    init_kl_coef: float = 0.2  # β at the start
    target_kl: float | None = 6.0  # nats per response; None = fixed β
    kl_horizon: int = 80  # in rollouts; Ziegler used 10 000 for runs of ~100 000 episodes
    prompt_len: int = 16
    response_len: int = 40
    temperature: float = 1.0


class AdaptiveKLController:
    """Ziegler et al. 2019, eq. 2: proportional control of log β toward a KL target (error clipped to ±20%)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class PolicyWithValue(nn.Module):
    """The policy plus a scalar value head on its final hidden states (shared trunk, as in Ziegler 2019 / old TRL)."""

    def __init__(self, policy: GPT):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, seqs: torch.Tensor, prompt_len: int):
        logits, hidden = forward_with_hidden(self.policy, seqs)  # (B, T, V), (B, T, C)
        values = self.value_head(hidden[:, prompt_len - 1 : -1]).squeeze(-1)  # (B, R): V(state before each token)
        return logits, values


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over (B, R) per-token rewards and values; the state
    after the last token is terminal (value 0). Returns (advantages, returns = advantages + values)."""
    B, R = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype)
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros(B, dtype=values.dtype)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # TD error
        last = delta + gamma * lam * last
        adv[:, t] = last
    return adv, adv + values


def ppo_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    clip_eps: float,
    vf_clip: float,
) -> dict:
    """Clipped surrogate (pessimistic of clipped/unclipped), clipped value loss, and the clip fraction; all (B, R)."""
    ratio = torch.exp(logp - old_logp)  # (B, R) ρ = π_θ / π_θ_old
    pg_loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)).mean()
    values_clipped = old_values + (values - old_values).clamp(-vf_clip, vf_clip)
    vf_loss = 0.5 * torch.maximum((values - returns) ** 2, (values_clipped - returns) ** 2).mean()
    clip_frac = ((ratio - 1).abs() > clip_eps).float().mean()
    return {
        "pg_loss": pg_loss,
        "vf_loss": vf_loss,
        "clip_frac": clip_frac,
        "approx_kl": 0.5 * ((logp - old_logp) ** 2).mean(),
    }


def whiten(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return (x - x.mean()) / (x.std() + eps)


def train_ppo(
    policy: GPT,
    rm: Callable[[torch.Tensor], torch.Tensor] | RewardModel,
    tok,
    prompt_ids: torch.Tensor,
    cfg: PPOConfig,
    seed: int = 0,
    log=print,
) -> tuple[GPT, list[dict]]:
    """Runs PPO on a copy of ``policy`` (which stays the frozen reference); returns (trained policy, per-iteration log).

    ``rm`` is any callable (B, T) sequences -> (B,) scores: the learned reward model, or (as a verifiable reward, and
    in the tests) the true reward itself."""
    seed_everything(seed)
    g = torch.Generator().manual_seed(seed)
    ref = policy.eval()
    model = PolicyWithValue(copy.deepcopy(policy)).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=1e-5)
    kl_ctl = (
        AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)
        if cfg.target_kl
        else FixedKLController(cfg.init_kl_coef)
    )
    P, history = cfg.prompt_len, []
    for it in range(cfg.iters + 1):  # iteration 0 = evaluation of the starting policy
        t0 = time.perf_counter()
        seqs = generate(
            model.policy, sample_prompts(prompt_ids, cfg.batch_size, P, g), cfg.response_len, cfg.temperature, g
        )  # (B, P+R)
        with torch.no_grad():
            logits, old_values = model(seqs, P)  # (B, T, V), (B, R)
            old_logp = logprobs_from_logits(logits, seqs, P)  # (B, R)
            ref_logp = response_logprobs(ref, seqs, P)  # (B, R)
            entropy = entropy_from_logits(logits, P).mean().item()
            rm_score = rm(seqs)  # (B,)
            kl_tok = old_logp - ref_logp  # (B, R) per-token KL sample (k1 estimator)
            rewards = -kl_ctl.value * kl_tok
            rewards[:, -1] += rm_score
            adv, returns = gae(rewards, old_values, cfg.gamma, cfg.lam)
            adv = whiten(adv)
        true = true_reward(decode_responses(tok, seqs, P))
        row = {
            "iter": it,
            "rm_reward": rm_score.mean().item(),
            "true_reward": true.mean().item(),
            "kl": kl_tok.sum(1).mean().item(),
            "entropy": entropy,
            "beta": kl_ctl.value,
        }
        if it == cfg.iters:  # last rollout is evaluation only
            history.append(row | {"clip_frac": float("nan"), "time_s": time.perf_counter() - t0})
            break
        stats = []
        for _ in range(cfg.ppo_epochs):
            for mb in torch.randperm(cfg.batch_size, generator=g).split(cfg.minibatch_size):
                logits, values = model(seqs[mb], P)
                logp = logprobs_from_logits(logits, seqs[mb], P)
                out = ppo_losses(
                    logp, old_logp[mb], adv[mb], values, old_values[mb], returns[mb], cfg.clip_eps, cfg.vf_clip
                )
                ent = entropy_from_logits(logits, P).mean()
                loss = out["pg_loss"] + cfg.vf_coef * out["vf_loss"] - cfg.ent_coef * ent
                clipped_step(opt, loss, model)
                stats.append({k: v.item() for k, v in out.items()})
        kl_ctl.update(row["kl"], cfg.batch_size)
        row |= {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
        row["time_s"] = time.perf_counter() - t0
        history.append(row)
        if it % 5 == 0:
            log(
                f"  iter {it:3d}  RM {row['rm_reward']:+.3f}  true {row['true_reward']:+.3f}  KL {row['kl']:.2f}  "
                f"β {row['beta']:.3f}  H {row['entropy']:.2f}  clip {row['clip_frac']:.3f}"
            )
    return model.policy.eval(), history


@torch.no_grad()
def samples_of(policy: GPT, tok, prompt_ids, n: int, prompt_len: int, response_len: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    seqs = generate(policy, sample_prompts(prompt_ids, n, prompt_len, g), response_len, generator=g)
    return [tok.decode(s.tolist()) for s in seqs]


def plot_runs(runs: dict[str, list[dict]], path, target_kl: float | None = None) -> None:
    import matplotlib.pyplot as plt

    from common.plot import save_fig

    keys = [
        ("rm_reward", "optimised reward (r_φ, or the true one)"),
        ("true_reward", "true reward"),
        ("kl", "KL(π‖π_ref), nats"),
        ("entropy", "entropy / token"),
        ("clip_frac", "clip fraction"),
        ("beta", "β"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for ax, (k, title) in zip(axes.flat, keys):
        for name, hist in runs.items():
            ax.plot([h["iter"] for h in hist], [h[k] for h in hist], label=name)
        ax.set_title(title)
        if k == "kl" and target_kl:
            ax.axhline(target_kl, color="gray", ls="--", lw=1, label="KL target")
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    save_fig(fig, path)


def main(argv=None):
    p = add_rm_args(add_policy_args(base_parser(__doc__.split("\n")[0], device=True, seed=True)))
    defaults = PPOConfig()
    p.add_argument("--ppo-iters", type=int, default=defaults.iters)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--target-kl", type=float, default=defaults.target_kl)
    p.add_argument("--init-kl-coef", type=float, default=defaults.init_kl_coef)
    p.add_argument("--vf-clip", type=float, default=defaults.vf_clip, help="value clip, in reward units")
    p.add_argument("--vf-coef", type=float, default=defaults.vf_coef)
    p.add_argument("--kl-horizon", type=int, default=defaults.kl_horizon, help="controller horizon, in rollouts")
    p.add_argument(
        "--runs",
        default="adaptive,zero",
        help="comma-separated: adaptive (RM reward, adaptive β), zero (RM reward, β = 0: reward hacking), "
        "true (true reward as a verifiable reward, adaptive β)",
    )
    p.add_argument("--plot-name", default="ppo_runs.png")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    set_threads(args.threads, args.device)
    rmd = get_reward_model(args.preset, args.iters, **rm_kwargs(args))
    print(f"reward model: held-out pair accuracy {rmd['metrics']['pair_accuracy']:.3f}")
    cfg = PPOConfig(
        iters=args.ppo_iters,
        batch_size=args.batch_size,
        lr=args.lr,
        target_kl=args.target_kl,
        init_kl_coef=args.init_kl_coef,
        kl_horizon=args.kl_horizon,
        vf_clip=args.vf_clip,
        vf_coef=args.vf_coef,
    )
    P = cfg.prompt_len
    true_fn = lambda seqs: true_reward(decode_responses(rmd["tok"], seqs, P))  # RLVR: the true reward as the reward
    variants = {
        "adaptive": ("PPO (adaptive β)", cfg, rmd["rm"]),
        "zero": ("PPO (β = 0)", PPOConfig(**{**asdict(cfg), "init_kl_coef": 0.0, "target_kl": None}), rmd["rm"]),
        "true": ("PPO (true reward, adaptive β)", cfg, true_fn),
    }
    runs, policies = {}, {}
    for key in [r.strip() for r in args.runs.split(",") if r.strip()]:
        if key not in variants:
            p.error(f"unknown run {key!r}; choose from {', '.join(variants)}")
        name, run_cfg, reward = variants[key]
        print(f"{name}:")
        policies[name], runs[name] = train_ppo(rmd["policy"], reward, rmd["tok"], rmd["train_ids"], run_cfg, args.seed)
    rows = []
    for name, hist in runs.items():
        start, end = hist[0], hist[-1]
        rows.append(
            {
                "run": name,
                "RM start": start["rm_reward"],
                "RM end": end["rm_reward"],
                "true start": start["true_reward"],
                "true end": end["true_reward"],
                "KL end": end["kl"],
                "β end": end["beta"],
                "s/iter": sum(h["time_s"] for h in hist) / len(hist),
            }
        )
    from common.bench import markdown_table

    print(markdown_table(rows))
    for name, pol in policies.items():
        print(f"\n{name} samples:")
        for s in samples_of(pol, rmd["tok"], rmd["train_ids"], 3, cfg.prompt_len, cfg.response_len, args.seed):
            print("   ", repr(s))
    if not args.no_plot:
        from common.plot import assets_dir

        plot_runs(runs, assets_dir(__file__) / args.plot_name, cfg.target_kl)
    return {"rows": rows, "runs": runs, "policies": policies, "rm_metrics": rmd["metrics"]}


if __name__ == "__main__":
    main()
