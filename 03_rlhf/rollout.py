"""Shared plumbing for chapter 03: the policy, prompts, sampling, per-token log-probs and hidden states.

    from ch03.rollout import load_policy, sample_prompts, generate, response_logprobs
    policy, tok, train_ids = load_policy("tiny", 200)
    prompts = sample_prompts(train_ids, 8, prompt_len=16, generator=g)          # (8, 16)
    seqs = generate(policy, prompts, response_len=48, generator=g)               # (8, 64)
    logp = response_logprobs(policy, seqs, prompt_len=16)                        # (8, 48)

Every response has the same length (``response_len`` characters; the char model has no end-of-text token), so batches
need no padding and "the last token" is simply position -1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ch01.generate import generate as generate_ids
from ch01.model import GPT
from ch01.pretrained import pretrained_char_model


def add_policy_args(p, preset: str = "small", iters: int = 2000):
    """The CLI flags every chapter-03 script shares."""
    p.add_argument("--preset", default=preset, help="ch01 pretrained char model preset (the policy)")
    p.add_argument("--iters", type=int, default=iters, help="its pretraining iterations (cached after the first run)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 is fastest for these tiny matmuls and stays fast on a shared machine",
    )
    return p


def set_threads(n: int, device: str = "cpu") -> None:
    """Apply ``--threads``; chapter 03's models are tiny, so its scripts run on the CPU whatever ``--device`` says."""
    if device not in ("auto", "cpu"):
        print(f"note: chapter 03 runs on the CPU (0.8 M-parameter models); ignoring --device {device}")
    if n > 0:
        torch.set_num_threads(n)


def clipped_step(opt: torch.optim.Optimizer, loss: torch.Tensor, module: torch.nn.Module, max_norm: float = 1.0):
    """One update of every chapter-03 learner (reward model, PPO, DPO): backward, clip the global gradient norm to
    ``max_norm`` (as ch01's training loop does), step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
    opt.step()


def load_policy(preset: str = "small", max_iters: int = 2000, device: str = "cpu"):
    """(policy in eval mode, CharTokenizer, train_ids) — the ch01 pretrained char model (cached after its first run)."""
    model, tok, (train_ids, _val_ids) = pretrained_char_model(preset, max_iters=max_iters, device=device)
    return model, tok, train_ids


def sample_prompts(ids: torch.Tensor, n: int, prompt_len: int, generator: torch.Generator) -> torch.Tensor:
    """(n, prompt_len) windows of the corpus that start at the beginning of a line (so they read like a speech opening)."""
    starts = _line_starts(ids, prompt_len)
    pick = starts[torch.randint(len(starts), (n,), generator=generator)]  # (n,)
    return ids[pick[:, None] + torch.arange(prompt_len)]  # (n, P)


_LINE_STARTS: dict[tuple[int, int, int], torch.Tensor] = {}


def _line_starts(ids: torch.Tensor, prompt_len: int, newline_id: int = 0) -> torch.Tensor:
    key = (ids.data_ptr(), len(ids), prompt_len)
    if key not in _LINE_STARTS:  # id 0 is "\n" in the sorted char vocabulary of tiny-shakespeare
        nl = torch.nonzero(ids[: -prompt_len - 1] == newline_id).squeeze(1) + 1  # (L,)
        _LINE_STARTS[key] = nl[ids[nl] != newline_id]  # skip blank lines
    return _LINE_STARTS[key]


@torch.no_grad()
def generate(
    model: GPT,
    prompts: torch.Tensor,
    response_len: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, P) prompts -> (B, P + response_len) sequences by plain temperature sampling (no top-k: the policy-gradient
    maths needs samples from the very distribution whose log-probs we train). ch01's cached ``generate`` feeds one
    token per step instead of the whole prefix (rollouts are most of RLHF's compute); the log-probs PPO needs come
    afterwards from one forward over the finished sequences (``response_logprobs``), with gradients where needed."""
    if prompts.shape[1] + response_len > model.config.block_size:
        raise ValueError(
            f"prompt {prompts.shape[1]} + response {response_len} exceeds block_size {model.config.block_size}"
        )
    was_training = model.training
    model.eval()
    new = generate_ids(model, prompts, response_len, temperature=temperature, generator=generator)  # B lists of R
    model.train(was_training)
    return torch.cat(
        [prompts, torch.tensor(new, dtype=torch.long, device=prompts.device).view(len(new), response_len)], 1
    )


def forward_with_hidden(model: GPT, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, T, V), final-norm hidden states (B, T, C)) from one forward pass.

    A forward hook on ``model.norm`` catches the hidden states, so value and reward heads sit on the ch01 model without
    a second copy of its forward code."""
    store = {}
    handle = model.norm.register_forward_hook(lambda _m, _inp, out: store.__setitem__("h", out))
    try:
        logits = model(idx)  # (B, T, V)
    finally:
        handle.remove()
    return logits, store["h"]


def logprobs_from_logits(logits: torch.Tensor, seqs: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Log-prob of each response token: logits (B, T, V) predicting seqs[:, 1:] -> (B, R)."""
    resp_logits = logits[:, prompt_len - 1 : -1].float()  # (B, R, V): position t predicts token t+1
    return torch.gather(F.log_softmax(resp_logits, -1), 2, seqs[:, prompt_len:, None]).squeeze(2)  # (B, R)


def response_logprobs(model: GPT, seqs: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(B, R) log π(response token | prefix); differentiable unless called under no_grad."""
    return logprobs_from_logits(model(seqs), seqs, prompt_len)


def entropy_from_logits(logits: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(B, R) entropy of the policy at each response position."""
    logp = F.log_softmax(logits[:, prompt_len - 1 : -1].float(), -1)  # (B, R, V)
    return -(logp.exp() * logp).sum(-1)


def decode_responses(tok, seqs: torch.Tensor, prompt_len: int) -> list[str]:
    return [tok.decode(s[prompt_len:].tolist()) for s in seqs]
