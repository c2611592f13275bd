"""A preallocated (static) KV cache and the generate loop that uses it: prefill the prompt once, then one token a step.

    from ch07.kv_cache import StaticKVCache, generate
    from ch07.sampling import Sampler
    new_ids = generate(model, [prompt_a, prompt_b], max_new_tokens=100, sampler=Sampler(temperature=0.8, top_p=0.95))

Why a cache: without one, step t re-runs the whole prefix (O(t) work per token, O(n²) for n tokens); with one, step t
runs the model on ONE token and reads the keys/values of earlier tokens from memory. The cache here is gpt-fast style:
per layer one buffer (B, n_kv_heads, max_seq, head_dim) allocated up front, written in place at ``start_pos`` — no
``torch.cat`` reallocations per step (``ch01.model.DynamicKVCache`` is the concat version). Rolling back (speculative
decoding rejects tokens) is just moving the write position back.

Prompts of different lengths are batched with LEFT padding plus ``key_padding_mask``: every row's last prompt token sits
in the same column, so one (B, 1) decode step serves all rows; RoPE only sees relative positions, so the padding does
not change any row's logits (the tests check batched == each prompt alone, token for token).

``compile_step=True`` wraps the decode step in ``torch.compile(dynamic=True)`` (the key length grows every step; dynamic
shapes avoid one recompile per length). Whether that helps is measured in bench_decode.py.
Run ``python 07_inference_engineering/kv_cache.py`` for a cache-vs-no-cache check and timing on a tiny model.
References: Pope et al. 2022 (Efficiently Scaling Transformer Inference); gpt-fast (PyTorch team, 2023).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ch01.model import GPT
from ch07.sampling import GREEDY, Sampler


class StaticKVCache:
    """Per layer, keys and values in preallocated buffers (B, n_kv_heads, max_seq_len, head_dim).

    Implements ch01's cache protocol ``update(layer, k, v, start_pos) -> (k_all, v_all)``.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_seq_len: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        shape = (batch_size, n_kv_head, max_seq_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_seq_len = max_seq_len
        self.length = 0  # positions [0, length) hold valid keys/values

    @classmethod
    def for_model(cls, model: GPT, batch_size: int = 1, max_seq_len: int | None = None) -> StaticKVCache:
        cfg = model.config
        p = next(model.parameters())
        return cls(
            cfg.n_layer, batch_size, cfg.n_kv_head, max_seq_len or cfg.block_size, cfg.head_dim, p.device, p.dtype
        )

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start_pos: int):
        B, _, T, _ = k.shape  # (B, Hkv, T, D)
        end = start_pos + T
        if end > self.max_seq_len:
            raise ValueError(f"cache holds {self.max_seq_len} positions, asked to write up to {end}")
        if B > self.k[layer].shape[0]:
            raise ValueError(f"cache was built for batch {self.k[layer].shape[0]}, got batch {B}")
        self.k[layer][:B, :, start_pos:end] = k  # in place: no reallocation
        self.v[layer][:B, :, start_pos:end] = v
        self.length = end  # writing at start_pos < length is a rollback: later positions are simply overwritten
        return self.k[layer][:B, :, :end], self.v[layer][:B, :, :end]  # (B, Hkv, end, D) views

    def rollback(self, length: int) -> None:
        """Forget positions >= length (speculative decoding's rejected tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: cache holds {self.length} positions")
        self.length = length

    def reset(self) -> None:
        self.length = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def left_pad(prompts: torch.Tensor | Sequence, pad_id: int = 0, device: torch.device | str = "cpu"):
    """Prompts (a (B, T) / (T,) tensor, one list of ids, or a list of id sequences) -> (ids (B, Tmax), key_padding_mask (B, Tmax) | None).

    The mask is None when all prompts have the same length (the common fast path: plain causal attention)."""
    if isinstance(prompts, torch.Tensor):
        ids = prompts.view(1, -1) if prompts.dim() == 1 else prompts
        return ids.long().to(device), None
    if len(prompts) and isinstance(prompts[0], int):  # one prompt given as a list of ids
        prompts = [prompts]
    rows = [torch.as_tensor(p, dtype=torch.long).view(-1) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = r
        mask[i, T - len(r) :] = True
    return ids.to(device), (None if mask.all() else mask.to(device))


def _decode_step(model: GPT, tokens: torch.Tensor, cache, start_pos: int, key_padding_mask: torch.Tensor | None):
    """One cached forward of (B, 1) new tokens -> next-token logits (B, V)."""
    return model(tokens, kv_cache=cache, start_pos=start_pos, key_padding_mask=key_padding_mask)[:, -1, :]


_compiled_decode_step = None


def compiled_decode_step():
    """``_decode_step`` under ``torch.compile(dynamic=True)``, built once per process."""
    global _compiled_decode_step
    if _compiled_decode_step is None:
        _compiled_decode_step = torch.compile(_decode_step, dynamic=True)
    return _compiled_decode_step


@torch.no_grad()
def generate(
    model: GPT,
    prompt_ids: torch.Tensor | Sequence,
    max_new_tokens: int,
    sampler: Sampler = GREEDY,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    cache: StaticKVCache | None = None,
    compile_step: bool = False,
    pad_id: int = 0,
    fused: bool = False,
) -> torch.Tensor:
    """New token ids (B, n) for a batch of prompts (n = max_new_tokens, fewer if every row hit ``eos_id``; rows that
    finished early are filled with ``eos_id``). ``use_cache=False`` re-runs the whole sequence every step (baseline).
    ``fused=True`` decodes with ``ch07.fused_decode.FusedDecoder(model)`` (same logits, fewer ops); ``model`` may also
    be a ``FusedDecoder`` already (saves rebuilding it per call)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if fused and isinstance(model, GPT):
        from ch07.fused_decode import FusedDecoder

        model = FusedDecoder(model)
    device = next(model.parameters()).device
    ids, pad_mask = left_pad(prompt_ids, pad_id, device)  # (B, T0), (B, T0) | None
    B, T0 = ids.shape
    total = T0 + max_new_tokens
    if total > model.config.block_size:
        raise ValueError(
            f"prompt ({T0}) + max_new_tokens ({max_new_tokens}) exceeds block_size {model.config.block_size}"
        )
    seq = torch.full((B, total), pad_id, dtype=torch.long, device=device)  # (B, total): prompt + generated
    seq[:, :T0] = ids
    mask = None
    if pad_mask is not None:
        mask = torch.ones(B, total, dtype=torch.bool, device=device)  # (B, total)
        mask[:, :T0] = pad_mask
    need_context = sampler.repetition_penalty != 1.0
    context = seq.masked_fill(~mask, -1) if (need_context and mask is not None) else seq  # padding ignored
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    if use_cache:
        if cache is None:
            cache = StaticKVCache.for_model(model, B, total)
        cache.reset()
        step_fn = compiled_decode_step() if compile_step else _decode_step
        logits = model(ids, kv_cache=cache, start_pos=0, key_padding_mask=pad_mask)[:, -1, :]  # prefill: (B, V)
    else:
        logits = model(ids, key_padding_mask=pad_mask)[:, -1, :]
    n = 0
    for n in range(1, max_new_tokens + 1):
        pos = T0 + n - 1  # where the new token goes
        nxt = sampler(logits, context[:, :pos] if need_context else None, generator)  # (B,)
        if eos_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
            finished |= nxt == eos_id
        seq[:, pos] = nxt
        if context is not seq:
            context[:, pos] = nxt
        if n == max_new_tokens or (eos_id is not None and bool(finished.all())):
            break
        step_mask = None if mask is None else mask[:, : pos + 1]
        if use_cache:
            logits = step_fn(model, seq[:, pos : pos + 1], cache, pos, step_mask)  # (B, V)
        else:
            logits = model(seq[:, : pos + 1], key_padding_mask=step_mask)[:, -1, :]  # whole prefix again
    return seq[:, T0 : T0 + n]


def main(argv=None):
    from common.bench import markdown_table
    from common.cli import base_parser
    from common.seed import seed_everything

    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--prompt-len", type=int, default=16)
    args = p.parse_args(argv)
    seed_everything(args.seed)
    from ch01.model import GPTConfig

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
