"""One yardstick for every method in chapter 03: sample from a policy on a fixed set of evaluation prompts and measure the true reward,
the reward-model score and the KL to the reference (SFT) policy.

    from ch03.evaluate import evaluate_policy
    evaluate_policy(policy, ref, rm, tok, val_ids)   # {"true_reward": ..., "rm_reward": ..., "kl": ...}

KL is the Monte-Carlo estimate E_y~π[Σ_t log π(y_t|·) − log π_ref(y_t|·)] in nats per response, on the same samples.
"""

from __future__ import annotations

import torch

from ch01.model import GPT
from ch03.rollout import decode_responses, generate, response_logprobs, sample_prompts
from ch03.true_reward import true_reward


@torch.no_grad()
def evaluate_policy(
    policy: GPT,
    ref: GPT,
    rm,
    tok,
    prompt_ids: torch.Tensor,
    n: int = 256,
    prompt_len: int = 16,
    response_len: int = 40,
    seed: int = 2024,
    batch: int = 128,
    best_of: int = 1,
) -> dict:
    """Mean true reward / RM reward / KL over ``n`` samples. ``best_of > 1`` evaluates best-of-n sampling from
    ``policy`` (pick the highest-RM of ``best_of`` samples per prompt); its KL is the analytic bound
    log n − (n−1)/n (Stiennon et al. 2020, appendix), since the picked sample has no tractable likelihood."""
    g = torch.Generator().manual_seed(seed)
    trues, rms, kls = [], [], []
    for i in range(0, n, batch):
        prompts = sample_prompts(prompt_ids, min(batch, n - i), prompt_len, g)  # (b, P)
        cands = [generate(policy, prompts, response_len, generator=g) for _ in range(best_of)]  # best_of × (b, P+R)
        scores = torch.stack([rm(c) for c in cands])  # (best_of, b)
        pick = scores.argmax(0)  # (b,)
        seqs = torch.stack(cands)[pick, torch.arange(len(prompts))]  # (b, P+R)
        rms.append(scores.max(0).values)
        trues.append(true_reward(decode_responses(tok, seqs, prompt_len)))
        if best_of == 1:
            kls.append((response_logprobs(policy, seqs, prompt_len) - response_logprobs(ref, seqs, prompt_len)).sum(1))
    if best_of == 1:
        kl = torch.cat(kls).mean().item()
    else:
        kl = float(torch.log(torch.tensor(float(best_of))) - (best_of - 1) / best_of)
    return {"true_reward": torch.cat(trues).mean().item(), "rm_reward": torch.cat(rms).mean().item(), "kl": kl}
