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
with greedy settings (p and q one-hot) the output is token-for-token the target's greedy output. Both models keep
static KV caches; after a round, the target's cache is rolled back past the rejected tokens and the draft's cache to
the longest prefix it got right (it catches up on the missing tokens in its next forward).

Run ``python 07_inference_engineering/speculative.py`` (trains/caches the chapter's target/draft pair on first use).
References: Leviathan, Kalman, Matias 2023 (Fast Inference from Transformers via Speculative Decoding);
Chen et al. 2023 (Accelerating LLM Decoding with Speculative Sampling).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ch01.model import GPT
from ch07.fused_decode import FusedDecoder
from ch07.kv_cache import StaticKVCache, generate
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


def _probs(sampler: Sampler, logits: torch.Tensor, context: list[int], drafts: list[int]) -> torch.Tensor:
    """Sampler distributions (n, V) for n consecutive positions; row i sees context + drafts[:i] (repetition penalty)."""
    if sampler.repetition_penalty == 1.0:
        return sampler.probs(logits)
    rows = [sampler.probs(logits[i : i + 1], torch.tensor([context + drafts[:i]])) for i in range(len(logits))]
    return torch.cat(rows)


def _last_logits(model, idx: torch.Tensor, cache: StaticKVCache, start_pos: int, last: int) -> torch.Tensor:
    """Logits (B, last, V) of the last ``last`` positions; a ``FusedDecoder`` skips the LM head for the others."""
    if isinstance(model, FusedDecoder):
        return model(idx, kv_cache=cache, start_pos=start_pos, last=last)
    return model(idx, kv_cache=cache, start_pos=start_pos)[:, -last:]


@torch.no_grad()
def _greedy_speculative(target, draft, prompt: torch.Tensor, max_new_tokens: int, k: int, eos_id: int | None):
    """The greedy special case with cheap bookkeeping: tokens stay in one preallocated id buffer, each draft token is
    the argmax fed straight into the next draft step (no one-hot distributions, no per-token Python conversions), the
    target verifies all k drafts in one forward and ONE ``tolist()`` per round compares them with its argmaxes.
    Rejection is just moving a cache's length back. Same tokens as the general path with ``GREEDY``."""
    device = prompt.device
    n0 = prompt.numel()
    max_len = n0 + max_new_tokens
    buf = torch.zeros(1, max_len, dtype=torch.long, device=device)  # prompt, emitted tokens, then this round's drafts
    buf[0, :n0] = prompt
    tcache, dcache = StaticKVCache.for_model(target, 1, max_len), StaticKVCache.for_model(draft, 1, max_len)
    t_len = d_len = 0  # valid cache lengths; each cache holds a prefix of buf[:, :n-1]
    n = n0  # tokens in buf that are final
    stats = SpecStats()
    while n - n0 < max_new_tokens:
        k_eff = min(k, max_new_tokens - (n - n0) - 1)  # never draft past the requested length
        if k_eff:
            dcache.rollback(d_len)
            logits = _last_logits(draft, buf[:, d_len:n], dcache, d_len, 1)  # (1, 1, V): 1 or 2 pending tokens
            for i in range(k_eff):
                torch.argmax(logits[:, -1], -1, keepdim=True, out=buf[:, n + i : n + i + 1])  # draft token i
                if i + 1 < k_eff:
                    logits = _last_logits(draft, buf[:, n + i : n + i + 1], dcache, n + i, 1)
            d_len = n + k_eff - 1
        tcache.rollback(t_len)
        verify = _last_logits(target, buf[:, t_len : n + k_eff], tcache, t_len, k_eff + 1)  # (1, k_eff + 1, V)
        best = verify[0].argmax(-1).tolist()  # the target's greedy token after each prefix
        drafts = buf[0, n : n + k_eff].tolist()
        accepted = 0
        while accepted < k_eff and drafts[accepted] == best[accepted]:
            accepted += 1
        buf[0, n + accepted] = best[accepted]  # the correction, or the bonus token if all were accepted
        stats.rounds += 1
        stats.proposed += k_eff
        stats.accepted += accepted
        stats.emitted += accepted + 1
        new = drafts[:accepted] + [best[accepted]]
        n += accepted + 1
        t_len = n - 1  # target cache: keep buf[:, :n-1]
        d_len = min(d_len, n - 1)  # draft cache: keep what agrees with buf
        if eos_id is not None and eos_id in new:
            n -= len(new) - 1 - new.index(eos_id)  # stop right after the first eos
            break
    return buf[:, n0:n], stats


@torch.no_grad()
def speculative_generate(
    target: GPT,
    draft: GPT,
    prompt_ids,
    max_new_tokens: int,
    k: int = 4,
    sampler: Sampler = GREEDY,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    fast_greedy: bool = True,
) -> tuple[torch.Tensor, SpecStats]:
    """New token ids (1, n) for one prompt, plus acceptance statistics. ``target``/``draft`` may be ch01 ``GPT``s or
    ``FusedDecoder``s. Greedy decoding takes a cheaper special case (``fast_greedy=False`` forces the general
    accept/reject path, which gives the same tokens)."""
    if k < 1:
        raise ValueError(f"k (draft tokens per round) must be >= 1, got {k}")
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError("target and draft must share a vocabulary")
    seq = [int(t) for t in torch.as_tensor(prompt_ids).view(-1).tolist()]
    if not seq:
        raise ValueError("the prompt needs at least one token")
    n0 = len(seq)
    max_len = n0 + max_new_tokens  # a round never writes past the last position it may emit
    if max_len > min(target.config.block_size, draft.config.block_size):
        raise ValueError(f"prompt + max_new_tokens = {max_len} exceeds a model's block_size")
    device = next(target.parameters()).device
    if sampler.greedy and sampler.repetition_penalty == 1.0 and fast_greedy:
        prompt = torch.tensor(seq, device=device)
        return _greedy_speculative(target, draft, prompt, max_new_tokens, k, eos_id)
    tcache, dcache = StaticKVCache.for_model(target, 1, max_len), StaticKVCache.for_model(draft, 1, max_len)
    t_len = d_len = 0  # valid cache lengths; invariant: each cache holds a prefix of seq[:-1]
    stats = SpecStats()

    def uniform() -> float:
        return float(torch.rand((), generator=generator, device=generator.device if generator else "cpu"))

    while len(seq) - n0 < max_new_tokens:
        n = len(seq)
        k_eff = min(k, max_new_tokens - (n - n0) - 1)  # never draft past the requested length
        drafts, q = [], []
        if k_eff:
            dcache.rollback(d_len)
            pending = torch.tensor([seq[d_len:]], device=device)  # 1 token, or 2 after a round that accepted all
            logits = _last_logits(draft, pending, dcache, d_len, 1)[:, -1]  # (1, V)
            for i in range(k_eff):
                qi = _probs(sampler, logits, seq, drafts)[0]  # (V,)
                d = int(qi.argmax()) if sampler.greedy else int(torch.multinomial(qi, 1, generator=generator))
                drafts.append(d)
                q.append(qi)
                if i + 1 < k_eff:
                    logits = _last_logits(draft, torch.tensor([[d]], device=device), dcache, n + i, 1)[:, -1]
            d_len = n + k_eff - 1
        tcache.rollback(t_len)
        verify = torch.tensor([seq[t_len:] + drafts], device=device)  # (1, n - t_len + k_eff)
        p_logits = _last_logits(target, verify, tcache, t_len, k_eff + 1)[0]  # (k_eff + 1, V)
        p = _probs(sampler, p_logits, seq, drafts)  # (k_eff + 1, V)
        accepted = 0
        new_token = None
        for i, d in enumerate(drafts):
            if uniform() * float(q[i][d]) < float(p[i, d]):  # accept with prob min(1, p/q)
                accepted += 1
                continue
            residual = (p[i] - q[i]).clamp(min=0)  # the part of p that q under-covers
            residual = residual / residual.sum() if residual.sum() > 0 else p[i]
            new_token = (
                int(residual.argmax()) if sampler.greedy else int(torch.multinomial(residual, 1, generator=generator))
            )
            break
        if new_token is None:  # all accepted: a free bonus token from the target's last distribution
            last = p[k_eff]
            new_token = int(last.argmax()) if sampler.greedy else int(torch.multinomial(last, 1, generator=generator))
        stats.rounds += 1
        stats.proposed += k_eff
        stats.accepted += accepted
        new = drafts[:accepted] + [new_token]
        seq += new
        stats.emitted += len(new)
        t_len = n + accepted  # target cache: keep seq[:-1]
        d_len = min(d_len, n + accepted)  # draft cache: keep what agrees with seq
        if eos_id is not None and eos_id in new:
            break
    out = seq[n0 : n0 + max_new_tokens]
    if eos_id is not None and eos_id in out:
        out = out[: out.index(eos_id) + 1]
    return torch.tensor([out], device=device), stats


def main(argv=None):
    from ch07.models import data_trained_draft, decode_models
    from common.bench import hardware_info, markdown_table
    from common.cli import base_parser
    from common.seed import seed_everything

    p = base_parser("speculative decoding vs plain greedy on the chapter's target/draft pair (same fused engine)")
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
