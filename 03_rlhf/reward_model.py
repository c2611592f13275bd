"""Reward model: the mini-GPT backbone with a scalar head, trained with the Bradley–Terry loss on preference pairs.

Step 1 of RLHF (Christiano et al. 2017; Stiennon et al. 2020; Ouyang et al. 2022). For each prompt we sample K
continuations from the pretrained (SFT) policy, ask the hidden true reward (``true_reward.py``) to compare them, and
train r_φ so that  P(a ≻ b) = σ(r_φ(x, y_a) − r_φ(x, y_b))  — the Bradley–Terry model — on every labelled pair:

    L(φ) = −E[ log σ(r_φ(x, y_c) − r_φ(x, y_r)) ]

Like InstructGPT, all K(K−1)/2 pairs of a prompt share one forward pass per response. A pair is labelled only when the
true rewards differ by at least ``--rm-gap`` (a clear preference; closer pairs are skipped, for training and held-out
alike). The reward is the mean of per-position head scores over the response. We report held-out pairwise accuracy
(also on the harder pairs with smaller gaps) and Pearson/Spearman correlation of r_φ with the true reward.

    python 03_rlhf/reward_model.py                 # small policy, 1000 prompts × 8 responses, ~3 min on one core
    python 03_rlhf/reward_model.py --preset tiny --iters 200 --rm-prompts 300
"""

from __future__ import annotations

import copy
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ch01.model import GPT
from ch03.rollout import (
    add_policy_args,
    clipped_step,
    decode_responses,
    forward_with_hidden,
    generate,
    load_policy,
    sample_prompts,
    set_threads,
)
from ch03.true_reward import true_reward
from common.cli import base_parser
from common.data import fingerprint, keyed_cache_dir
from common.seed import seed_everything


class RewardModel(nn.Module):
    """r_φ(x, y): the policy's transformer (copied) + a linear head, averaged over the response positions.

    Reading only the last token's hidden state (as TRL's ``AutoModelForSequenceClassification`` does) works for big
    models; ours is small and the true reward is a sum over words, so averaging per-position scores is the better
    inductive bias (held-out accuracy ~+20 points in our runs)."""

    def __init__(self, backbone: GPT, prompt_len: int, freeze_layers: int = 0):
        super().__init__()
        self.backbone = backbone
        # the lower blocks of the pretrained LM already spell out characters into word pieces; freezing them (and the
        # embedding) halves the backward pass and generalises better with a few thousand pairs (measured: README)
        frozen = [backbone.tok_emb] + list(backbone.blocks[:freeze_layers]) if freeze_layers else []
        for module in frozen:
            module.requires_grad_(False)
        self.prompt_len = prompt_len
        self.head = nn.Linear(backbone.config.n_embd, 1)
        nn.init.zeros_(self.head.weight)  # start neutral: every answer scores 0
        nn.init.zeros_(self.head.bias)
        # after training: (raw − mean) / std over the SFT policy's samples, so PPO's β has a fixed scale to play with
        self.register_buffer("offset", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        _, hidden = forward_with_hidden(self.backbone, seqs)  # (B, T, C)
        raw = self.head(hidden[:, self.prompt_len :]).squeeze(-1).mean(1)  # (B,)
        return (raw - self.offset) / self.scale


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """−mean log σ(r_c − r_r); ``F.logsigmoid`` keeps it finite for large margins."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


@torch.no_grad()
def sample_groups(
    policy: GPT,
    tok,
    ids: torch.Tensor,
    n_prompts: int,
    k: int,
    prompt_len: int,
    response_len: int,
    generator: torch.Generator,
    batch: int = 256,
) -> dict:
    """K responses per prompt from the SFT policy, each scored by the true reward (InstructGPT's K-wise comparisons:
    K samples give K(K−1)/2 pairs for K forward passes). Returns {"seqs": (N, K, P+R), "true": (N, K)}."""
    seqs, true = [], []
    for i in range(0, n_prompts, batch):
        prompts = sample_prompts(ids, min(batch, n_prompts - i), prompt_len, generator)  # (b, P)
        group = torch.stack([generate(policy, prompts, response_len, generator=generator) for _ in range(k)], 1)
        seqs.append(group)  # (b, K, P+R)
        true.append(true_reward(decode_responses(tok, group.flatten(0, 1), prompt_len)).view(len(prompts), k))
    return {"seqs": torch.cat(seqs), "true": torch.cat(true)}


def preference_mask(true: torch.Tensor, min_gap: float) -> torch.Tensor:
    """(N, K, K) bool: [n, a, b] is True when response a is labelled better than b, i.e. R_a − R_b ≥ min_gap.
    Pairs closer than the margin get no label at all (as human labellers skip pairs they cannot tell apart); the same
    rule labels the training and the held-out pairs."""
    return (true[:, :, None] - true[:, None, :]) >= min_gap


def pairs_from_groups(groups: dict, min_gap: float) -> dict:
    """All labelled pairs of the groups as flat tensors (chosen/rejected sequences and their true rewards)."""
    n, a, b = preference_mask(groups["true"], min_gap).nonzero(as_tuple=True)
    return {
        "chosen": groups["seqs"][n, a],
        "rejected": groups["seqs"][n, b],
        "true_chosen": groups["true"][n, a],
        "true_rejected": groups["true"][n, b],
    }


def subset_pairs(pairs: dict, n: int | None, seed: int = 0) -> dict:
    """A random subset of ``n`` labelled pairs (all of them for n=None), e.g. to give DPO a fixed budget."""
    total = len(pairs["chosen"])
    pick = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: n or total]
    return {k: v[pick] for k, v in pairs.items()}


def group_bt_loss(scores: torch.Tensor, true: torch.Tensor, min_gap: float) -> torch.Tensor:
    """Bradley–Terry loss over every labelled pair inside each group: scores, true (B, K) -> scalar."""
    mask = preference_mask(true, min_gap)  # (B, K, K)
    margins = scores[:, :, None] - scores[:, None, :]  # (B, K, K) r_a − r_b
    if not mask.any():  # no labelled pair in this batch: a zero loss that still has a graph
        return scores.sum() * 0.0
    return bradley_terry_loss(margins[mask], torch.zeros(()))


def train_reward_model(
    policy: GPT,
    groups: dict,
    prompt_len: int,
    min_gap: float,
    epochs: int = 3,
    batch_prompts: int = 16,
    lr: float = 1e-3,
    freeze_layers: int = 2,
    generator: torch.Generator | None = None,
    log=print,
) -> tuple[RewardModel, list[float]]:
    """Bradley–Terry on the K-wise groups: each step scores batch_prompts × K responses once and uses all their pairs."""
    rm = RewardModel(copy.deepcopy(policy), prompt_len, freeze_layers).train()
    opt = torch.optim.AdamW([q for q in rm.parameters() if q.requires_grad], lr=lr, weight_decay=0.0)
    seqs, true = groups["seqs"], groups["true"]
    n, k = true.shape
    steps = epochs * (n // batch_prompts)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / steps))
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_prompts + 1, batch_prompts):
            j = order[i : i + batch_prompts]
            scores = rm(seqs[j].flatten(0, 1)).view(len(j), k)  # (b, K): one pass for every response of the groups
            loss = group_bt_loss(scores, true[j], min_gap)
            clipped_step(opt, loss, rm)
            sched.step()
            losses.append(loss.item())
        log(f"  reward model epoch {epoch + 1}/{epochs}: BT loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    return rm.eval(), losses


@torch.no_grad()
def score(rm: RewardModel, seqs: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([rm(seqs[i : i + batch]) for i in range(0, len(seqs), batch)])


@torch.no_grad()
def evaluate_reward_model(rm: RewardModel, groups: dict, min_gap: float) -> dict:
    """On held-out groups: pairwise accuracy on the pairs labelled with the training rule (|ΔR| ≥ min_gap), the same
    for a few other margins (how it does on harder pairs), and Pearson / Spearman correlation of r_φ with the true
    reward over all held-out responses."""
    n, k = groups["true"].shape
    r = score(rm, groups["seqs"].flatten(0, 1)).view(n, k)  # (N, K)
    correct = (r[:, :, None] - r[:, None, :]) > 0  # (N, K, K)
    acc = lambda gap: (
        (correct & preference_mask(groups["true"], gap)).sum().item()
        / max(1, preference_mask(groups["true"], gap).sum().item())
    )
    flat_r, flat_true = r.flatten(), groups["true"].flatten()
    pearson = torch.corrcoef(torch.stack([flat_r, flat_true]))[0, 1].item()
    rank = lambda x: x.argsort().argsort().float()
    spearman = torch.corrcoef(torch.stack([rank(flat_r), rank(flat_true)]))[0, 1].item()
    return {
        "pair_accuracy": acc(min_gap),
        "held_out_pairs": int(preference_mask(groups["true"], min_gap).sum()),
        "acc_gap_0.25": acc(0.25),
        "acc_gap_0.5": acc(0.5),
        "pearson": pearson,
        "spearman": spearman,
    }


def get_reward_model(
    preset: str = "small",
    iters: int = 2000,
    n_prompts: int = 1000,
    n_eval_prompts: int = 300,
    k: int = 8,
    min_gap: float = 1.0,
    prompt_len: int = 16,
    response_len: int = 40,
    epochs: int = 3,
    lr: float = 1e-3,
    freeze_layers: int = 2,
    seed: int = 1337,
    use_cache: bool = True,
    log=print,
) -> dict:
    """Build (or load from ``.cache/ch03/``) the labelled groups and the reward model; returns everything + metrics.
    ``train_pairs`` / ``test_pairs`` are the labelled pairs as flat tensors (DPO and TRL train on the same ones)."""
    from safetensors.torch import load_file, save_file

    settings = dict(
        preset=preset,
        iters=iters,
        n_prompts=n_prompts,
        n_eval_prompts=n_eval_prompts,
        k=k,
        min_gap=min_gap,
        prompt_len=prompt_len,
        response_len=response_len,
        epochs=epochs,
        lr=lr,
        freeze_layers=freeze_layers,
        seed=seed,
        version=3,
    )
    policy, tok, train_ids = load_policy(preset, iters)
    settings["policy_sha"] = fingerprint(policy)
    d = keyed_cache_dir("ch03", f"rm-{preset}", key=settings)
    if use_cache and (d / "done.json").exists():
        rm = RewardModel(copy.deepcopy(policy), prompt_len)
        rm.load_state_dict(load_file(str(d / "rm.safetensors")))
        data = load_file(str(d / "data.safetensors"))
        info = json.loads((d / "done.json").read_text())
    else:
        seed_everything(seed)
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        train_groups = sample_groups(policy, tok, train_ids, n_prompts, k, prompt_len, response_len, g)
        test_groups = sample_groups(policy, tok, train_ids, n_eval_prompts, k, prompt_len, response_len, g)
        t_data = time.perf_counter() - t0
        log(f"  sampled {n_prompts} + {n_eval_prompts} prompts × {k} responses in {t_data:.1f} s")
        rm, losses = train_reward_model(
            policy, train_groups, prompt_len, min_gap, epochs, lr=lr, freeze_layers=freeze_layers, generator=g, log=log
        )
        with torch.no_grad():  # normalise on the SFT policy's own (held-out) samples: mean 0, std 1
            raw = score(rm, test_groups["seqs"][:, 0])
            rm.offset.fill_(raw.mean())
            rm.scale.fill_(raw.std() + 1e-6)
        data = {
            **{f"train_{k_}": v for k_, v in train_groups.items()},
            **{f"test_{k_}": v for k_, v in test_groups.items()},
        }
        info = {
            "settings": settings,
            "data_s": t_data,
            "train_s": time.perf_counter() - t0 - t_data,
            "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        }
        save_file({k_: v.contiguous() for k_, v in data.items()}, str(d / "data.safetensors"))
        save_file({k_: v.contiguous() for k_, v in rm.state_dict().items()}, str(d / "rm.safetensors"))
        (d / "done.json").write_text(json.dumps(info))
    split = lambda prefix: {k_[len(prefix) :]: v for k_, v in data.items() if k_.startswith(prefix)}
    train_groups, test_groups = split("train_"), split("test_")
    metrics = evaluate_reward_model(rm, test_groups, min_gap)
    return {
        "rm": rm.eval(),
        "policy": policy,
        "tok": tok,
        "train_ids": train_ids,
        "train_groups": train_groups,
        "test_groups": test_groups,
        "train_pairs": pairs_from_groups(train_groups, min_gap),
        "test_pairs": pairs_from_groups(test_groups, min_gap),
        "metrics": metrics,
        "info": info,
        "settings": settings,
    }


def add_rm_args(p):
    """The reward-model flags (shared by every script that needs the reward model; all cached per setting)."""
    p.add_argument("--rm-prompts", type=int, default=1000, help="reward-model training prompts (K responses each)")
    p.add_argument("--rm-eval-prompts", type=int, default=300, help="held-out prompts (K responses each)")
    p.add_argument("--rm-k", type=int, default=8, help="responses per prompt; all K(K-1)/2 pairs get compared")
    p.add_argument("--rm-gap", type=float, default=1.0, help="label a pair only if the true rewards differ this much")
    p.add_argument("--rm-epochs", type=int, default=3)
    p.add_argument("--rm-lr", type=float, default=1e-3)
    p.add_argument("--rm-freeze", type=int, default=2, help="freeze the embedding and this many lower blocks")
    return p


def rm_kwargs(args) -> dict:
    return dict(
        n_prompts=args.rm_prompts,
        n_eval_prompts=args.rm_eval_prompts,
        k=args.rm_k,
        min_gap=args.rm_gap,
        epochs=args.rm_epochs,
        lr=args.rm_lr,
        freeze_layers=args.rm_freeze,
        seed=args.seed,
    )


def main(argv=None):
    p = add_rm_args(add_policy_args(base_parser(__doc__.split("\n")[0], device=True, seed=True)))
    p.add_argument("--no-cache", action="store_true", help="retrain even if .cache/ch03 holds this reward model")
    args = p.parse_args(argv)
    set_threads(args.threads, args.device)
    out = get_reward_model(args.preset, args.iters, **rm_kwargs(args), use_cache=not args.no_cache)
    from common.bench import markdown_table

    row = {
        "policy": f"{args.preset}-{args.iters}",
        "train pairs": len(out["train_pairs"]["chosen"]),
        **out["metrics"],
        "BT loss": out["info"]["final_loss"],
        "data s": out["info"]["data_s"],
        "train s": out["info"]["train_s"],
    }
    print(markdown_table([row]))
    return {**out["metrics"], "info": out["info"]}


if __name__ == "__main__":
    main()
