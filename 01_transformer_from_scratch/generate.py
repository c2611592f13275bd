"""The course's one decoding loop: a cached, batched, streaming ``generate`` for any model with ch01's forward seam.

    from ch01.generate import generate, stream
    new = generate(model, [[1, 2, 3], [4, 5]], 50, temperature=0.8, top_k=40, stop_ids=[0])  # list of id lists
    for tokens in stream(model, [prompt_ids], 50):                                             # one step at a time
        print(tokens)                                                                          # (B,) ids, -1 = row done

How it works: the prompts are right-padded into one (B, T0) prefill whose positions are 0 … T0-1 in every row; each row
then continues from ITS OWN length, so a decode step feeds (B, 1) tokens at per-row positions and the cache (index =
position, see cache.py) shows every row exactly its own tokens. Each row gets the tokens it gets alone (a test checks
this). ``sampler`` replaces the default temperature / top-k / top-p draw (chapter 07's ``Sampler`` adds repetition
penalty and min-p); ``model`` may be any callable with ``model(idx, positions=, cache=)`` (chapter 07's fused decoder).

A uniform batch may generate past ``block_size``: from then on each step re-runs the model on the last ``block_size``
tokens without a cache (a sliding window, as nanoGPT's sampler does; positions restart inside the window so a cache
cannot be reused). References: Holtzman et al. 2020 (nucleus sampling); Pope et al. 2022 (KV caching).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ch01.cache import KVCache

SampleFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Generator | None], torch.Tensor]


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Keep the top-k logits and/or the smallest set whose probability mass reaches top_p; the rest -> -inf."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # drop tokens once the mass before them reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next ids (B,) from logits (B, V): argmax at temperature 0, else a draw from the filtered softmax."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _as_rows(prompts) -> list[list[int]]:
    """A (B, T) / (T,) tensor, one list of ids or a list of id lists -> list of non-empty id lists."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.view(1, -1).tolist() if prompts.dim() == 1 else prompts.tolist()
    elif len(prompts) and isinstance(prompts[0], int):
        prompts = [prompts]
    rows = [[int(t) for t in (p.tolist() if isinstance(p, torch.Tensor) else p)] for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    return rows


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def stream(
    model,
    prompts: torch.Tensor | Sequence,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    sampler: SampleFn | None = None,
    stop_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
    cache=None,
) -> Iterator[torch.Tensor]:
    """Yield the (B,) new token ids of each step; a row that has produced a stop id yields -1 from then on.

    ``sampler(logits (B, V) float, context (B, L) ids so far with -1 where a row has none yet, generator) -> (B,)``.
    ``cache``: any cache of the protocol, empty (default: a ``KVCache`` sized to the whole generation)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    rows = _as_rows(prompts)
    cfg = model.config
    windowed = getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "pos_emb", "rope") == "rope"
    block_size = float("inf") if windowed else cfg.block_size  # a sliding window never looks > window back
    device = _device_of(model)
    B, lengths = len(rows), torch.tensor([len(r) for r in rows], device=device)
    T0, ragged = max(len(r) for r in rows), len({len(r) for r in rows}) > 1
    total = T0 + max_new_tokens
    if ragged and total > block_size:
        raise ValueError(f"longest prompt ({T0}) + max_new_tokens ({max_new_tokens}) exceeds block_size {block_size}")
    if T0 > block_size:
        raise ValueError(f"a prompt of {T0} tokens exceeds block_size {block_size}")
    draw = sampler or (lambda lg, ctx, gen: sample_next(lg, temperature, top_k, top_p, gen))
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    seq = torch.full((B, total), -1, dtype=torch.long, device=device)  # prompt + new ids; -1 = nothing yet
    for b, r in enumerate(rows):
        seq[b, : len(r)] = torch.tensor(r)
    cache = cache if cache is not None else _default_cache(cfg, total, ragged)
    positions = torch.arange(T0, device=device).expand(B, T0) if ragged else None
    logits = model(seq[:, :T0].clamp(min=0), positions=positions, cache=cache)  # (B, T0, V), pads at the end
    logits = logits[torch.arange(B, device=device), lengths - 1]  # (B, V): each row's last prompt token
    rows, cur = torch.arange(B, device=device), lengths.clone()  # where each row's next token goes
    done = torch.zeros(B, dtype=torch.bool, device=device) if len(stops) else None  # None: no row can stop early
    for step in range(max_new_tokens):
        end = T0 + step  # = cur.max(): every row moves one position per step (known here, no device sync)
        context = seq[:, :end] if sampler is not None else None  # the default draw needs none
        nxt = draw(logits.float(), context, generator).to(device)  # (B,)
        if done is not None:
            nxt = nxt.masked_fill(done, -1)
            done |= torch.isin(nxt, stops)
        if ragged:
            seq[rows, cur] = nxt
        else:
            seq[:, end] = nxt
        yield nxt
        if step == max_new_tokens - 1 or (done is not None and bool(done.all())):
            return
        if end + 1 > block_size:  # uniform batch past block_size: sliding window, no cache
            logits = model(seq[:, end + 1 - block_size : end + 1])[:, -1]
        else:
            tok = (nxt.clamp(min=0) if done is not None else nxt)[:, None]  # (B, 1)
            logits = model(tok, positions=cur[:, None] if ragged else None, cache=cache)[:, -1]  # (B, V)
        if ragged:
            cur += 1


def _default_cache(cfg, total: int, ragged: bool):
    """A static KVCache for the whole generation; a sliding-window model gets chapter 04's rolling cache (constant
    memory), or for a ragged batch, which a ring cannot hold, a growing KVCache."""
    if getattr(cfg, "sliding_window", None) is None:
        return KVCache(cfg.n_layer, max_len=min(total, cfg.block_size))
    if ragged:
        return KVCache(cfg.n_layer)
    rolling = importlib.import_module("ch04.sliding_window").RollingKVCache
    return rolling(cfg.n_layer, cfg.sliding_window, cfg.attn_sinks)


def generate(model, prompts: torch.Tensor | Sequence, max_new_tokens: int, **kwargs) -> list[list[int]]:
    """The new token ids of every row (a stop id, when hit, is the row's last id). Arguments as for ``stream``."""
    out: list[list[int]] = [[] for _ in _as_rows(prompts)]
    for step in stream(model, prompts, max_new_tokens, **kwargs):
        for row, t in zip(out, step.tolist()):
            if t >= 0:
                row.append(t)
    return out


def main(argv=None) -> dict:
    """Usage example: a ragged batch on a random tiny model gives each row the tokens it gets alone."""
    from ch01.model import GPT, GPTConfig
    from common.cli import base_parser

    p = base_parser("ragged batched generate == each prompt alone (random tiny model)", seed=True)
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig.preset("tiny")).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    kw = dict(temperature=args.temperature)
    batch = generate(model, prompts, args.max_new_tokens, generator=torch.Generator().manual_seed(args.seed), **kw)
    alone = [
        generate(model, [p], args.max_new_tokens, generator=torch.Generator().manual_seed(args.seed), **kw)[0]
        for p in prompts
    ]
    for prompt, row in zip(prompts, batch):
        print(f"{prompt} -> {row}")
    print(f"batched == each row alone: {batch == alone}")
    return {"batch": batch, "alone": alone}


if __name__ == "__main__":
    main()
