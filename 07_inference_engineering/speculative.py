"""Speculative decoding: a small draft model guesses k tokens, the big target model checks all of them in ONE forward.

    from ch07.speculative import speculative_generate
    new_ids, stats = speculative_generate(target, draft, prompt_ids, max_new_tokens=256, k=4, sampler=GREEDY)
    stats.acceptance_rate, stats.tokens_per_target_forward

One round (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023):
  1. the draft samples d_1..d_k autoregressively from its distributions q_1..q_k (k cheap forwards);
  2. the target runs once on [last token, d_1..d_k] and yields p_1..p_{k+1} (one forward of k+1 tokens costs about
     one forward of 1 token when decoding is memory-bound: the weights are read once either way);
  3. for i = 1..k: accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection, sample a
     replacement from norm(max(0, p_i − q_i)) and stop; if all k were accepted, sample a bonus token from p_{k+1}.
Every emitted token is distributed exactly as the target's own sampler would draw it (proof sketch in the README), and
with greedy settings (p and q one-hot) the output is token-for-token the target's greedy output. One loop serves both:
only the draw and the acceptance test look at the sampler, and the greedy ones are the general rule on one-hot
distributions written as argmax comparisons (tokens stay in one id buffer, one ``tolist()`` per round), which keeps the
bookkeeping cheap enough for a fast engine. Both models keep ch01 ``KVCache``s (static: allocated up front); after a
round, the target's cache is cropped past the rejected tokens and the draft's to the longest prefix it got right (it
catches up on the missing tokens in its next forward). The forwards continue from ``cache.length`` (ch01's default
positions), so rolling back is all ``crop`` does.

Run ``python 07_inference_engineering/speculative.py`` (trains/caches the chapter's target/draft pair on first use).
References: Leviathan, Kalman, Matias 2023 (Fast Inference from Transformers via Speculative Decoding);
Chen et al. 2023 (Accelerating LLM Decoding with Speculative Sampling).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ch01.cache import KVCache
from ch07.fused_decode import FusedDecoder
from ch07.kv_cache import generate, static_cache
from ch07.sampling import GREEDY, Sampler


@dataclass
class SpecStats:
    rounds: int = 0
    proposed: int = 0  # draft tokens offered to the target
    accepted: int = 0  # draft tokens the target kept
    emitted: int = 0  # tokens produced (accepted + one corrected/bonus token per round)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposed, 1)

    @property
    def tokens_per_target_forward(self) -> float:
        return self.emitted / max(self.rounds, 1)


def _processed(sampler: Sampler, logits: torch.Tensor, buf: torch.Tensor, start: int) -> torch.Tensor:
    """The sampler's processed logits (m, V) for m consecutive positions from ``start``; row i's context (for a
    repetition penalty) is ``buf[0, :start + i]``: the prompt, the emitted tokens and the drafts before it."""
    if sampler.repetition_penalty == 1.0:
        return sampler.process(logits)
    return torch.cat([sampler.process(logits[i : i + 1], buf[:, : start + i]) for i in range(len(logits))])


def _last_logits(model, idx: torch.Tensor, cache: KVCache, last: int) -> torch.Tensor:
    """Logits (B, last, V) of the last ``last`` new positions (continuing the cache); a ``FusedDecoder`` skips the LM
    head for the others."""
    if isinstance(model, FusedDecoder):
        return model(idx, cache=cache, last=last)
    return model(idx, cache=cache)[:, -last:]


def _draft(draft, cache: KVCache, buf: torch.Tensor, n: int, k: int, sampler: Sampler, generator) -> list:
    """The draft proposes buf[0, n : n+k], one forward per token (the first also catches up on tokens its cache lacks);
    returns the distributions q_i it drew them from (when sampling; greedy needs none)."""
    q = []
    logits = _last_logits(draft, buf[:, cache.length : n], cache, 1)[:, -1]  # (1, V)
    for i in range(k):
        z = _processed(sampler, logits, buf, n + i)
        if sampler.greedy:  # straight into the token buffer: no host sync per draft token
            torch.argmax(z, -1, keepdim=True, out=buf[:, n + i : n + i + 1])
        else:
            q.append(z.softmax(-1)[0])  # (V,)
            buf[0, n + i] = torch.multinomial(q[-1], 1, generator=generator)[0]
        if i + 1 < k:
            logits = _last_logits(draft, buf[:, n + i : n + i + 1], cache, 1)[:, -1]
    return q


def _accept(sampler: Sampler, z: torch.Tensor, q: list, drafts: list[int], generator) -> tuple[int, int]:
    """(accepted drafts, next token) from the target's processed logits z (k+1, V) at the k draft positions and after.

    The rule (Leviathan et al.): accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection draw
    from norm(max(0, p_i − q_i)); after k acceptances draw a bonus token from p_{k+1}. Greedy p and q are one-hot, so
    the same rule reads "keep drafts while they equal the target's argmax, then take the target's argmax" — applied
    here without building the one-hots (one ``tolist()`` per round; a test checks it against the general rule)."""
    if sampler.greedy:
        best = z.argmax(-1).tolist()  # the target's greedy token after each prefix
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == best[accepted]:
            accepted += 1
        return accepted, best[accepted]
    p = z.softmax(-1)  # (k+1, V)
    gen_device = generator.device if generator is not None else "cpu"
    for i, d in enumerate(drafts):
        if float(torch.rand((), generator=generator, device=gen_device)) * float(q[i][d]) < float(p[i, d]):
            continue
        residual = (p[i] - q[i]).clamp(min=0)  # the part of p that q under-covers
        residual = residual / residual.sum() if residual.sum() > 0 else p[i]
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))


@torch.no_grad()
def speculative_generate(
    target,
    draft,
    prompt_ids,
    max_new_tokens: int,
    k: int = 4,
    sampler: Sampler = GREEDY,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
) -> tuple[torch.Tensor, SpecStats]:
    """New token ids (1, n) for one prompt, plus acceptance statistics. ``target``/``draft`` may be ch01 ``GPT``s or
    ``FusedDecoder``s (anything with ``GPT.forward``'s contract)."""
    if k < 1:
        raise ValueError(f"k (draft tokens per round) must be >= 1, got {k}")
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError("target and draft must share a vocabulary")
    prompt = torch.as_tensor(prompt_ids).view(-1)
    n0 = prompt.numel()
    if n0 == 0:
        raise ValueError("the prompt needs at least one token")
    max_len = n0 + max_new_tokens  # a round never writes past the last position it may emit
    if max_len > min(target.config.block_size, draft.config.block_size):
        raise ValueError(f"prompt + max_new_tokens = {max_len} exceeds a model's block_size")
    device = next(target.parameters()).device
    buf = torch.zeros(1, max_len, dtype=torch.long, device=device)  # prompt, emitted tokens, then this round's drafts
    buf[0, :n0] = prompt.to(device)
    tcache, dcache = static_cache(target, 1, max_len), static_cache(draft, 1, max_len)  # each: a prefix of buf[:n-1]
    n, stats = n0, SpecStats()  # n: tokens in buf that are final
    while n - n0 < max_new_tokens:
        k_eff = min(k, max_new_tokens - (n - n0) - 1)  # never draft past the requested length
        q = _draft(draft, dcache, buf, n, k_eff, sampler, generator) if k_eff else []
        verify = _last_logits(target, buf[:, tcache.length : n + k_eff], tcache, k_eff + 1)[0]  # (k_eff + 1, V)
        drafts = buf[0, n : n + k_eff].tolist()
        accepted, token = _accept(sampler, _processed(sampler, verify, buf, n), q, drafts, generator)
        buf[0, n + accepted] = token  # the correction, or the bonus token if all were accepted
        new = drafts[:accepted] + [token]
        stats.rounds += 1
        stats.proposed += k_eff
        stats.accepted += accepted
        stats.emitted += len(new)
        n += len(new)
        tcache.crop(n - 1)  # rejection is moving a cache's length back: the target keeps buf[:, :n-1]
        dcache.crop(min(dcache.length, n - 1))  # the draft keeps what agrees with buf
        if eos_id is not None and eos_id in new:
            n -= len(new) - 1 - new.index(eos_id)  # stop right after the first eos
            break
    return buf[:, n0:n], stats


def main(argv=None):
    from ch07.models import data_trained_draft, decode_models
    from common.bench import hardware_info, markdown_table
    from common.cli import base_parser
    from common.seed import seed_everything

    p = base_parser(
        "speculative decoding vs plain greedy on the chapter's target/draft pair (same fused engine)", seed=True
    )
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--k", type=int, nargs="+", default=[2, 4, 6])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (1 is steadiest on a shared CPU)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    target, draft, tok, val_ids = decode_models()
    drafts = {"data-trained": data_trained_draft(verbose=False), "distilled on-policy": draft}
    target = FusedDecoder(target)  # target and drafts on the same engine: a fair ratio
    drafts = {name: FusedDecoder(d) for name, d in drafts.items()}
    prompt = val_ids[: args.prompt_len]
    generate(target, prompt, 8), speculative_generate(target, drafts["distilled on-policy"], prompt, 8)  # warm-up
    t0 = time.perf_counter()
    ref = generate(target, prompt, args.new_tokens)  # target-only greedy with a static cache
    base_s = time.perf_counter() - t0
    rows = [
        {
            "draft": "(none: target greedy)",
            "k": "",
            "tokens/s": args.new_tokens / base_s,
            "speedup": 1.0,
            "acceptance": "",
            "tokens/target fwd": 1.0,
            "identical": True,
        }
    ]
    for name, d in drafts.items():
        for k in args.k:
            t0 = time.perf_counter()
            out, st = speculative_generate(target, d, prompt, args.new_tokens, k=k)
            dt = time.perf_counter() - t0
            rows.append(
                {
                    "draft": name,
                    "k": k,
                    "tokens/s": args.new_tokens / dt,
                    "speedup": base_s / dt,
                    "acceptance": f"{st.acceptance_rate:.2f}",
                    "tokens/target fwd": st.tokens_per_target_forward,
                    "identical": torch.equal(out, ref),
                }
            )
    print(hardware_info(), f"(intra-op threads {args.threads}); {args.new_tokens} new tokens, prompt {args.prompt_len}")
    print(markdown_table(rows, floatfmt=".2f"))
    print("sample:", repr(tok.decode(ref[0].tolist())[:120]))
    return rows


if __name__ == "__main__":
    main()
