"""Direct Preference Optimization, from scratch: RLHF without a reward model or sampling during training.

Rafailov et al. 2023 show that the KL-regularised RL objective  max_π E[r] − β·KL(π‖π_ref)  has the closed-form optimum
π*(y|x) ∝ π_ref(y|x)·exp(r(x,y)/β), so r = β·log(π*/π_ref) + const. Put that into the Bradley–Terry likelihood and the
constant cancels:
    L_DPO(θ) = −E[ log σ( β·[log π_θ(y_c|x) − log π_ref(y_c|x)] − β·[log π_θ(y_r|x) − log π_ref(y_r|x)] ) ]
where log π(y|x) is summed over the response tokens. We train on the same labelled pairs the reward model saw and
measure the true reward of samples before and after. ``tests/test_03_dpo.py`` checks that this loss equals TRL's
``DPOTrainer`` loss on the same batch and models.

    python 03_rlhf/dpo.py
    python 03_rlhf/dpo.py --preset tiny --iters 200 --pairs 400
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from ch01.model import GPT
from ch03.evaluate import evaluate_policy
from ch03.reward_model import add_rm_args, get_reward_model, rm_kwargs, subset_pairs
from ch03.rollout import add_policy_args, clipped_step, set_threads
from common.cli import base_parser
from common.seed import seed_everything


def sequence_logps(model: GPT, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Σ_t log π(token_t | tokens_<t) over positions where ``completion_mask`` is 1: (B, T) -> (B,).

    Right padding needs no attention mask in a causal model: padded positions come after every real one."""
    logits = model(input_ids)[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    token_logps = torch.gather(F.log_softmax(logits, -1), 2, input_ids[:, 1:, None]).squeeze(2)  # (B, T-1)
    return (token_logps * completion_mask[:, 1:]).sum(1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict]:
    """The DPO loss from per-sequence log-probs (each (B,)); also the implicit rewards β·log(π/π_ref)."""
    chosen_reward = beta * (policy_chosen - ref_chosen)  # (B,)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
    return loss, {
        "reward_margin": (chosen_reward - rejected_reward).mean().item(),
        "reward_accuracy": (chosen_reward > rejected_reward).float().mean().item(),
    }


def dpo_batch_loss(policy: GPT, ref: GPT, input_ids: torch.Tensor, completion_mask: torch.Tensor, beta: float):
    """TRL's batch layout: rows [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}] of prompt+completion."""
    logps = sequence_logps(policy, input_ids, completion_mask)  # (2B,)
    with torch.no_grad():
        ref_logps = sequence_logps(ref, input_ids, completion_mask)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)


def train_dpo(
    policy: GPT,
    pairs: dict,
    prompt_len: int,
    beta: float = 0.1,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 1e-4,
    seed: int = 0,
    log=print,
) -> tuple[GPT, list[dict]]:
    """DPO on fixed-length pairs (prompt_len + response tokens); ``policy`` itself stays the frozen reference."""
    seed_everything(seed)
    g = torch.Generator().manual_seed(seed)
    ref = policy.eval()
    model = copy.deepcopy(policy).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    n, T = pairs["chosen"].shape
    completion_mask = (torch.arange(T) >= prompt_len).long().expand(2 * batch_size, T)  # (2B, T)
    history = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            j = order[i : i + batch_size]
            input_ids = torch.cat([pairs["chosen"][j], pairs["rejected"][j]])  # (2B, T)
            loss, stats = dpo_batch_loss(model, ref, input_ids, completion_mask, beta)
            clipped_step(opt, loss, model)
            history.append({"loss": loss.item(), **stats})
        recent = history[-10:]
        log(
            f"  DPO epoch {epoch + 1}/{epochs}: loss {sum(h['loss'] for h in recent) / len(recent):.3f}  "
            f"implicit-reward accuracy {sum(h['reward_accuracy'] for h in recent) / len(recent):.2f}"
        )
    return model.eval(), history


def main(argv=None):
    p = add_rm_args(add_policy_args(base_parser(__doc__.split("\n")[0], device=True, seed=True)))
    p.add_argument("--pairs", type=int, default=2000, help="labelled pairs to train on (a random subset of the RM's)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO β (strength of the implicit KL constraint)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-samples", type=int, default=256)
    args = p.parse_args(argv)
    set_threads(args.threads, args.device)
    rmd = get_reward_model(args.preset, args.iters, **rm_kwargs(args))
    P = rmd["settings"]["prompt_len"]
    t0 = time.perf_counter()
    policy, history = train_dpo(
        rmd["policy"],
        subset_pairs(rmd["train_pairs"], args.pairs, args.seed),
        P,
        args.beta,
        args.epochs,
        lr=args.lr,
        seed=args.seed,
    )
    train_s = time.perf_counter() - t0
    ev = lambda pol: evaluate_policy(pol, rmd["policy"], rmd["rm"], rmd["tok"], rmd["train_ids"], args.eval_samples, P)
    rows = [
        {"policy": "SFT (reference)", **ev(rmd["policy"]), "train s": 0.0},
        {"policy": f"DPO β={args.beta}", **ev(policy), "train s": train_s},
    ]
    from common.bench import markdown_table

    print(markdown_table(rows))
    return {"rows": rows, "history": history, "policy": policy}


if __name__ == "__main__":
    main()
