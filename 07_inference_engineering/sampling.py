"""Composable next-token sampling: repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw.

    from ch07.sampling import Sampler
    sampler = Sampler(temperature=0.8, top_k=50, top_p=0.95, min_p=0.05, repetition_penalty=1.1)
    next_ids = sampler(logits, generated_ids, generator)      # logits (B, V) -> next ids (B,)
    probs = sampler.probs(logits, generated_ids)              # the distribution it draws from (B, V)

Every transform works on a batch of logit rows (B, V) and each is optional; ``temperature=0`` is greedy (argmax, and
``probs`` is the one-hot of the argmax, which is what speculative decoding needs to reproduce greedy output).
The order is the one Hugging Face ``generate`` applies (penalty first, then the warpers), and the tests check each step
against ``transformers``' logits processors. ``generated_ids`` may hold negative ids (padding), which are ignored.

Top-k and top-p come from chapter 01 (``ch01.model.filter_logits``); this file adds min-p and the repetition penalty.
References: Holtzman et al. 2020 (nucleus / top-p sampling); Fan et al. 2018 (top-k); Keskar et al. 2019 (CTRL,
repetition penalty); Nguyen et al. 2024 (min-p sampling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ch01.generate import filter_logits


def apply_repetition_penalty(logits: torch.Tensor, generated_ids: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """CTRL's penalty: for every id already in the context, divide a positive logit by ``penalty``, multiply a negative
    one (so the token always becomes less likely). logits (B, V), generated_ids (B, S), negative ids ignored."""
    if generated_ids is None or penalty == 1.0 or generated_ids.numel() == 0:
        return logits
    V = logits.shape[-1]
    ids = generated_ids.to(logits.device).long()  # (B, S)
    ids = torch.where(ids < 0, V, ids)  # padding -> an extra column that is dropped again below
    padded = torch.nn.functional.pad(logits, (0, 1))  # (B, V + 1)
    seen = padded.gather(-1, ids)  # (B, S)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(-1, ids, seen)[..., :V]  # scatter of duplicates writes the same value: order does not matter


def apply_min_p(logits: torch.Tensor, min_p: float | None) -> torch.Tensor:
    """Keep tokens whose probability is at least ``min_p`` × the top token's probability (Nguyen 2024)."""
    if min_p is None or min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)  # (B, V)
    threshold = min_p * probs.amax(-1, keepdim=True)  # (B, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))  # the top token always survives (p_max >= min_p·p_max)


@dataclass
class Sampler:
    """Sampling settings as one callable. All fields optional; the defaults draw from the plain softmax."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or None = off), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def process(self, logits: torch.Tensor, generated_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The filtered, temperature-scaled logits (B, V) in float32; removed tokens are -inf."""
        logits = apply_repetition_penalty(logits.float(), generated_ids, self.repetition_penalty)
        if self.greedy:
            return logits
        logits = filter_logits(logits / self.temperature, self.top_k, self.top_p)  # ch01: top-k, then top-p
        return apply_min_p(logits, self.min_p)

    def probs(self, logits: torch.Tensor, generated_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The distribution (B, V) the sampler draws from (one-hot of the argmax when greedy)."""
        logits = self.process(logits, generated_ids)
        if self.greedy:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        return logits.softmax(-1)

    def __call__(
        self, logits: torch.Tensor, generated_ids: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """logits (B, V) -> next token ids (B,)."""
        if logits.dim() != 2:
            raise ValueError(f"expected logits of shape (B, V), got {tuple(logits.shape)}")
        if self.greedy:
            return self.process(logits, generated_ids).argmax(-1)
        return torch.multinomial(self.probs(logits, generated_ids), 1, generator=generator).squeeze(-1)  # (B,)


GREEDY = Sampler(temperature=0.0)


def sample_rows(
    logits: torch.Tensor,
    samplers: list[Sampler],
    generated_ids: list[torch.Tensor | None] | None = None,
    generators: list[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """One sampler (and generator) per row — what a server with per-request settings needs. logits (B, V) -> (B,)."""
    B = logits.shape[0]
    if len(samplers) != B:
        raise ValueError(f"{len(samplers)} samplers for {B} rows")
    generated_ids = generated_ids or [None] * B
    generators = generators or [None] * B
    out = [
        s(logits[i : i + 1], None if g is None else g.view(1, -1), gen)
        for i, (s, g, gen) in enumerate(zip(samplers, generated_ids, generators))
    ]
    return torch.cat(out)  # (B,)
