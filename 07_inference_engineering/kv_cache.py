"""Decoding with a KV cache, on ch01's seams: a static cache, a no-cache baseline, and ``generate`` with ch07's samplers.

    from ch07.kv_cache import generate, static_cache
    from ch07.sampling import Sampler
    new_ids = generate(model, [prompt_a, prompt_b], 100, Sampler(temperature=0.8, top_p=0.95))  # (B, n) tensor
    new_ids = generate(model, prompt, 200, fused=True)           # decoded by ch07.fused_decode.FusedDecoder
    new_ids = generate(model, prompt, 200, use_cache=False)      # the baseline: the whole prefix again every step

Why a cache: without one, step t re-runs the whole prefix (O(t) work per token, O(n²) for n tokens); with one, step t
runs the model on ONE token and reads the keys/values of earlier tokens from memory.

Nothing here is a second cache or a second decoding loop. The cache is ch01's ``KVCache`` (ch01/cache.py): per layer
one buffer (B, n_kv_heads, capacity, head_dim) written in place at the tokens' positions — with ``max_len`` it is
gpt-fast's static cache (no ``torch.cat`` reallocation per step), and ``static_cache`` allocates those buffers up front
for a model. Rolling back (speculative decoding rejects tokens) is ``crop``. The loop is ``ch01.generate.stream``:
prompts of different lengths are right-padded and every row continues at its OWN positions (the cache's index is the
position, so no padding mask is needed; the tests check batched == each prompt alone, token for token). ``generate``
here plugs in ch07's ``Sampler`` (repetition penalty, min-p), ``eos_id`` and the fused engine, and returns a tensor.

``use_cache=False`` runs the same loop through ``Uncached``, a model wrapper that keeps token ids instead of keys and
values and re-runs the model on the whole prefix at every call: the cost the cache removes, measured side by side.
Run ``python 07_inference_engineering/kv_cache.py`` for a cache-vs-no-cache check and timing on a tiny model.
References: Pope et al. 2022 (Efficiently Scaling Transformer Inference); gpt-fast (PyTorch team, 2023).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ch01.cache import KVCache
from ch01.generate import stream
from ch01.model import GPT
from ch07.sampling import GREEDY, Sampler


def static_cache(model, batch_size: int = 1, max_len: int | None = None) -> KVCache:
    """ch01's ``KVCache`` for ``model`` holding ``max_len`` positions (default: block_size) of ``batch_size`` rows, its
    buffers allocated now (gpt-fast's static cache): decoding never allocates cache memory."""
    cfg = model.config
    cache = KVCache(cfg.n_layer, max_len=max_len or cfg.block_size)
    like = next(model.parameters()).new_empty(batch_size, cfg.n_kv_head, 0, cfg.head_dim)  # batch, heads, dtype, device
    for layer in range(cfg.n_layer):
        cache.buffers(layer, like, cache.max_len)
    return cache


class Uncached:
    """``model`` without a KV cache behind ``GPT.forward``'s contract: it keeps the token ids by position and every call
    re-runs the model on the whole prefix (causal by order, so row b's token at position p sees positions 0 … p and
    never a later, stale id). ``cache`` only marks one generation (a new cache object starts a new one): nothing is
    stored in it."""

    def __init__(self, model):
        self.model, self.config = model, model.config
        self._run, self._ids, self._len = None, None, 0

    def parameters(self):
        return self.model.parameters()

    def __call__(self, idx: torch.Tensor, *, positions=None, cache=None, attn_mask=None) -> torch.Tensor:
        if cache is None:
            return self.model(idx, positions=positions, attn_mask=attn_mask)
        B, T = idx.shape
        if cache is not self._run:  # a new generation
            self._run, self._ids, self._len = cache, idx.new_zeros(B, self.config.block_size), 0
        if positions is None:
            positions = torch.arange(self._len, self._len + T, device=idx.device).expand(B, T)
        self._ids.scatter_(1, positions, idx)
        self._len = int(positions.max()) + 1
        logits = self.model(self._ids[:, : self._len])  # (B, S, V): the whole prefix, again
        return logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))  # (B, T, V)


def _batch_size(prompts) -> int:
    if isinstance(prompts, torch.Tensor):
        return 1 if prompts.dim() == 1 else prompts.shape[0]
    return 1 if len(prompts) and isinstance(prompts[0], int) else len(prompts)


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor | Sequence,
    max_new_tokens: int,
    sampler: Sampler = GREEDY,
    *,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    fused: bool = False,
    cache=None,
) -> torch.Tensor:
    """New token ids (B, n) for a batch of prompts (n = max_new_tokens, fewer if every row hit ``eos_id``; rows that
    finished early are filled with ``eos_id``) — ``ch01.generate.stream`` with ``sampler`` as its draw.
    ``fused=True`` decodes with ``ch07.fused_decode.FusedDecoder(model)`` (same logits, fewer ops); ``model`` may also
    be a ``FusedDecoder`` already (saves rebuilding it per call). ``use_cache=False``: the ``Uncached`` baseline.
    ``cache``: an empty cache of ch01's protocol (default: a ``KVCache`` sized to the generation)."""
    if fused and isinstance(model, GPT):
        from ch07.fused_decode import FusedDecoder

        model = FusedDecoder(model)
    if not use_cache:
        model = Uncached(model)
    stops = () if eos_id is None else (eos_id,)
    steps = list(
        stream(model, prompt_ids, max_new_tokens, sampler=sampler, stop_ids=stops, generator=generator, cache=cache)
    )
    device = next(model.parameters()).device
    if not steps:
        return torch.zeros(_batch_size(prompt_ids), 0, dtype=torch.long, device=device)
    out = torch.stack(steps, 1)  # (B, n): -1 once a row has stopped
    return out if eos_id is None else out.masked_fill(out < 0, eos_id)


def main(argv=None):
    from ch01.model import GPTConfig
    from common.bench import markdown_table
    from common.cli import base_parser
    from common.seed import seed_everything

    p = base_parser(__doc__.split("\n")[0], seed=True)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--prompt-len", type=int, default=16)
    args = p.parse_args(argv)
    seed_everything(args.seed)
    model = GPT(GPTConfig.preset("tiny", block_size=args.prompt_len + args.new_tokens)).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len))
    rows, outs = [], {}
    for use_cache in (False, True):
        t0 = time.perf_counter()
        outs[use_cache] = generate(model, prompt, args.new_tokens, use_cache=use_cache)
        dt = time.perf_counter() - t0
        rows.append({"decoding": "static cache" if use_cache else "no cache", "tokens/s": args.new_tokens / dt})
    same = torch.equal(outs[False], outs[True])
    print(markdown_table(rows), f"\ngreedy outputs identical: {same}")
    return {"rows": rows, "identical": same}


if __name__ == "__main__":
    main()
