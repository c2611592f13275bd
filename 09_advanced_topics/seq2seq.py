"""Prompt -> completion fine-tuning and batched greedy decoding for the ch01 mini-GPT (shared by pal.py and STaR).

Each example is ``prompt + ">" + completion + "|"`` at character level; the loss covers only the completion and the end
marker ``|`` (prompt positions get target -100). Decoding hands a batch of prompts of different lengths to ch01's
``generate``, which continues each row at its own positions over one KV cache (one forward per new character serves the
whole batch) and stops a row at ``|``.
"""

from __future__ import annotations

import time

import torch

from ch01.char_tokenizer import CharTokenizer
from ch01.functional import cosine_lr
from ch01.generate import generate
from ch01.model import GPT, GPTConfig
from ch01.train import TrainConfig, make_optimizer
from ch09.arith_tasks import alphabet

SEP, END = ">", "|"


def task_tokenizer() -> CharTokenizer:
    return CharTokenizer(alphabet())


def task_model(tok: CharTokenizer, n_layer: int = 4, n_embd: int = 128, n_head: int = 4, block_size: int = 192) -> GPT:
    return GPT(
        GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    )


def encode_pairs(tok: CharTokenizer, pairs: list[tuple[str, str]], block_size: int):
    """(x, y) int64 (N, L): inputs right-padded with the first char; targets -100 except completion + END."""
    seqs, starts = [], []
    for prompt, completion in pairs:
        ids = tok.encode(prompt + SEP + completion + END)
        if len(ids) > block_size + 1:
            raise ValueError(f"example of {len(ids)} characters exceeds block_size={block_size}: {prompt[:40]!r}...")
        seqs.append(ids)
        starts.append(len(prompt) + 1)  # first completion character
    L = max(len(s) for s in seqs) - 1
    x = torch.zeros(len(seqs), L, dtype=torch.long)  # (N, L)
    y = torch.full((len(seqs), L), -100, dtype=torch.long)  # (N, L)
    for i, (ids, s) in enumerate(zip(seqs, starts)):
        t = torch.tensor(ids)
        x[i, : len(ids) - 1] = t[:-1]
        y[i, s - 1 : len(ids) - 1] = t[s:]  # predict completion chars and END from the char before them
    return x, y


def finetune(
    model: GPT,
    tok: CharTokenizer,
    pairs: list[tuple[str, str]],
    iters: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    log_every: int = 0,
) -> list[float]:
    """AdamW (ch01's optimizer groups) with warm-up + cosine LR on completion tokens; returns per-step losses."""
    if not pairs:
        raise ValueError("finetune needs at least one (prompt, completion) pair")
    x, y = encode_pairs(tok, pairs, model.config.block_size)
    device = next(model.parameters()).device
    tc = TrainConfig(lr=lr, weight_decay=0.01)
    opt = make_optimizer(model, tc)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses, t0 = [], time.perf_counter()
    for it in range(iters):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(it, lr, lr / 10, max(1, iters // 20), iters)
        ix = torch.randint(len(x), (batch_size,), generator=gen)
        xb, yb = x[ix], y[ix]  # (B, L)
        keep = int((yb != -100).any(0).nonzero().max()) + 1  # trim padding columns every row ignores
        loss = model.loss(xb[:, :keep].to(device), yb[:, :keep].to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (it + 1) % log_every == 0:
            print(
                f"  step {it + 1}/{iters} loss {sum(losses[-log_every:]) / log_every:.4f} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    model.eval()
    return losses


@torch.no_grad()
def greedy_complete(
    model: GPT,
    tok: CharTokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 128,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Completion of each ``prompt + SEP`` up to END (exclusive); greedy unless ``temperature`` > 0."""
    model.eval()
    end_id = tok.encode(END)[0]
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = [tok.encode(p + SEP) for p in prompts[i : i + batch_size]]  # ragged: each row at its own positions
        budget = min(max_new_tokens, model.config.block_size - max(len(c) for c in chunk))
        new = generate(model, chunk, budget, temperature=temperature, stop_ids=[end_id], generator=generator)
        outs += [tok.decode(row).split(END)[0] for row in new]
    return outs
