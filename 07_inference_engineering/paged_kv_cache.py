"""vLLM-style paged KV cache: keys/values live in a pool of fixed-size blocks; each sequence owns a block table.

API (what a continuous-batching server uses — chapter 08 builds on exactly this):

    from ch07.paged_kv_cache import PagedKVCache, paged_forward
    cache = PagedKVCache(model.config, num_blocks=256, block_size=16)    # the whole KV memory, allocated once

    n_cached = cache.add_sequence("req-1", prompt_ids)   # register a request; returns how many prompt tokens are
                                                         # already cached (shared full blocks of an identical prefix)
    logits = paged_forward(model, cache, {"req-1": prompt_ids[n_cached:]})   # prefill -> (1, V) last-token logits
    ...
    # every server step: ONE batched forward over all running sequences, one new token each (or a prompt chunk each);
    # every sequence has its own length and its own position
    logits = paged_forward(model, cache, {"req-1": [tok1], "req-7": [tok7], "req-9": prompt9})  # (3, V), in dict order
    cache.fork("req-1", "req-1b")   # parallel sampling / beams: share all blocks, copy-on-write on the next append
    cache.free("req-7")             # finished: its blocks go back to the pool (shared ones when their last user leaves)
    # for the scheduler: admission and preemption decisions before a step (paged_forward raises OutOfBlocks otherwise,
    # leaving every sequence unchanged)
    cache.can_append(["req-1", ...], [1, ...])  cache.blocks_needed_new(len(prompt))  cache.num_free_blocks
    cache.length("req-1")  cache.block_table("req-1")
    # sampling per request: ch07.sampling.sample_rows(logits, [Sampler(...) per row], generated_ids, generators)

``paged_forward(..., all_logits=True)`` returns (B, T, V) logits for every fed token (right-padded per row) instead.
Prefix sharing covers full blocks whose sequences are still alive: a block leaves the prefix table when its last user
is freed (vLLM keeps such blocks as an evictable LRU cache; not done here). Sequences are capped at the model's
block_size positions.

How it works: the pool is one tensor per layer of shape (num_blocks · block_size, n_kv_heads, head_dim) — one row per
token "slot". Sequence s's token at position p lives in slot ``table[s][p // block_size] · block_size + p % block_size``.
A forward writes the new tokens' keys/values into their slots, then gathers each sequence's slots into a padded
(B, n_kv_heads, S_max, head_dim) tensor and attends with a (causal & length) mask. vLLM's CUDA kernel reads the blocks
in place instead of gathering; the arithmetic is the same, and the test checks the logits equal the model's own.
Memory: a sequence holds ceil(len / block_size) blocks, so waste is < one block per sequence instead of the
(max_seq_len − len) a contiguous preallocation reserves — the point of Kwon et al. 2023.

The forward reuses the ch01 model's own modules (embedding, norms, projections, MLP, lm_head and its registered
attention function); only the per-row positions and the paged storage differ from ``GPT.forward``.
Run ``python 07_inference_engineering/paged_kv_cache.py`` for a simulated serving run (memory vs a static cache).
Reference: Kwon et al. 2023, "Efficient Memory Management for LLM Serving with PagedAttention" (vLLM).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ch01.functional import apply_rope, rope_cache
from ch01.model import GPT, GPTConfig, get_attention


@dataclass
class _Seq:
    blocks: list[int] = field(default_factory=list)  # block table: logical block i -> physical block id
    tokens: list[int] = field(default_factory=list)  # tokens whose keys/values are stored (for prefix hashing)


class OutOfBlocks(RuntimeError):
    """The pool has no free block left: the scheduler should preempt or wait."""


class PagedKVCache:
    def __init__(
        self,
        cfg: GPTConfig,
        num_blocks: int,
        block_size: int = 16,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        prefix_caching: bool = True,
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.cfg, self.num_blocks, self.block_size, self.prefix_caching = cfg, num_blocks, block_size, prefix_caching
        shape = (num_blocks * block_size, cfg.n_kv_head, cfg.head_dim)  # one row per token slot
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.refcount = [0] * num_blocks
        self.free_blocks = list(range(num_blocks - 1, -1, -1))  # a stack: pop() hands out low ids first
        self.seqs: dict[Hashable, _Seq] = {}
        self.prefix_table: dict[tuple[int, ...], int] = {}  # full-block token prefix -> physical block
        self.block_prefix: dict[int, tuple[int, ...]] = {}  # reverse map, to unregister a freed block

    # ------------------------------------------------------------------------------------------- bookkeeping
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def length(self, seq_id: Hashable) -> int:
        return len(self._seq(seq_id).tokens)

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._seq(seq_id).blocks)

    def _seq(self, seq_id: Hashable) -> _Seq:
        if seq_id not in self.seqs:
            raise KeyError(f"unknown sequence {seq_id!r}")
        return self.seqs[seq_id]

    def _alloc(self) -> int:
        if not self.free_blocks:
            raise OutOfBlocks(f"all {self.num_blocks} KV blocks are in use")
        b = self.free_blocks.pop()
        self.refcount[b] = 1
        return b

    def _decref(self, b: int) -> None:
        self.refcount[b] -= 1
        if self.refcount[b] == 0:
            prefix = self.block_prefix.pop(b, None)
            if prefix is not None:
                del self.prefix_table[prefix]
            self.free_blocks.append(b)

    def blocks_needed(self, seq_id: Hashable, n_new: int) -> int:
        """Blocks an append of n_new tokens would allocate (including a copy-on-write copy)."""
        s = self._seq(seq_id)
        L, bs = len(s.tokens), self.block_size
        need = -(-(L + n_new) // bs) - len(s.blocks)
        cow = n_new > 0 and L % bs != 0 and self.refcount[s.blocks[-1]] > 1
        return need + int(cow)

    def blocks_needed_new(self, n_tokens: int) -> int:
        """Blocks a new sequence of n_tokens needs (ignoring prefix sharing, so an upper bound)."""
        return -(-n_tokens // self.block_size)

    def can_append(self, seq_ids: Sequence[Hashable], n_new: Sequence[int]) -> bool:
        return sum(self.blocks_needed(s, n) for s, n in zip(seq_ids, n_new)) <= self.num_free_blocks

    # ------------------------------------------------------------------------------------------- sequences
    def add_sequence(self, seq_id: Hashable, prompt_ids: Sequence[int] | torch.Tensor = ()) -> int:
        """Register a sequence; returns how many leading prompt tokens are already cached (whole shared blocks,
        never the last prompt token, whose logits the caller needs). Feed ``prompt_ids[n:]`` to ``paged_forward``."""
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id!r} already exists")
        s = self.seqs[seq_id] = _Seq()
        prompt = [int(t) for t in (prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else prompt_ids)]
        if not self.prefix_caching:
            return 0
        bs = self.block_size
        for i in range((len(prompt) - 1) // bs):  # full blocks strictly before the last prompt token
            b = self.prefix_table.get(tuple(prompt[: (i + 1) * bs]))
            if b is None:
                break
            self.refcount[b] += 1
            s.blocks.append(b)
            s.tokens.extend(prompt[i * bs : (i + 1) * bs])
        return len(s.tokens)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """The child shares every block of the parent; the first write into a shared block copies it."""
        if child_id in self.seqs:
            raise ValueError(f"sequence {child_id!r} already exists")
        p = self._seq(parent_id)
        for b in p.blocks:
            self.refcount[b] += 1
        self.seqs[child_id] = _Seq(list(p.blocks), list(p.tokens))

    def free(self, seq_id: Hashable) -> None:
        for b in self._seq(seq_id).blocks:
            self._decref(b)
        del self.seqs[seq_id]

    def _reserve(self, seq_id: Hashable, n_new: int) -> None:
        """Make room for n_new tokens: copy a shared partial last block (copy-on-write), allocate new blocks."""
        s = self.seqs[seq_id]
        L, bs = len(s.tokens), self.block_size
        if n_new > 0 and L % bs != 0 and self.refcount[s.blocks[-1]] > 1:
            old, new = s.blocks[-1], self._alloc()
            for pool in self.k + self.v:
                pool[new * bs : (new + 1) * bs] = pool[old * bs : (old + 1) * bs]
            self._decref(old)
            s.blocks[-1] = new
        while len(s.blocks) * bs < L + n_new:
            s.blocks.append(self._alloc())

    def _register_full_blocks(self, seq_id: Hashable, old_len: int) -> None:
        s, bs = self.seqs[seq_id], self.block_size
        for i in range(old_len // bs, len(s.tokens) // bs):  # blocks that just became full
            prefix = tuple(s.tokens[: (i + 1) * bs])
            if prefix not in self.prefix_table and s.blocks[i] not in self.block_prefix:
                self.prefix_table[prefix] = s.blocks[i]
                self.block_prefix[s.blocks[i]] = prefix

    def slots(self, seq_id: Hashable, positions: torch.Tensor) -> torch.Tensor:
        """Flat pool row of each position of a sequence."""
        table = torch.tensor(self._seq(seq_id).blocks, dtype=torch.long)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def gather(self, seq_id: Hashable, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A sequence's keys and values as contiguous (1, n_kv_heads, length, head_dim) tensors (for tests/debugging)."""
        idx = self.slots(seq_id, torch.arange(self.length(seq_id))).to(self.k[layer].device)
        return self.k[layer][idx].transpose(0, 1)[None], self.v[layer][idx].transpose(0, 1)[None]


@torch.no_grad()
def paged_forward(
    model: GPT, cache: PagedKVCache, batch: Mapping[Hashable, Sequence[int] | torch.Tensor], all_logits: bool = False
) -> torch.Tensor:
    """Append ``batch[seq_id]`` (n_i >= 1 tokens each) to every listed sequence in ONE forward.

    Returns the logits of each sequence's last new token (B, V) in the mapping's order, or (B, T_max, V) for all
    new tokens (right-padded) with ``all_logits=True``."""
    cfg = model.config
    if not batch:
        raise ValueError("empty batch")
    seq_ids = list(batch)
    new = [[int(t) for t in (batch[s].tolist() if isinstance(batch[s], torch.Tensor) else batch[s])] for s in seq_ids]
    if any(len(n) == 0 for n in new):
        raise ValueError("every sequence in the batch needs at least one new token")
    starts = [cache.length(s) for s in seq_ids]
    if max(st + len(n) for st, n in zip(starts, new)) > cfg.block_size:
        raise ValueError(f"a sequence would exceed block_size={cfg.block_size}")
    if not cache.can_append(seq_ids, [len(n) for n in new]):
        raise OutOfBlocks(f"batch needs more KV blocks than the {cache.num_free_blocks} free")
    for s, n in zip(seq_ids, new):
        cache._reserve(s, len(n))
    device = model.tok_emb.weight.device
    B, T = len(seq_ids), max(len(n) for n in new)
    S = max(st + len(n) for st, n in zip(starts, new))  # longest key range in the batch
    tokens = torch.zeros(B, T, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    write_rows, write_slots = [], []  # which (row, t) go to which pool slot
    key_slots = torch.zeros(B, S, dtype=torch.long)  # pool slot of every key position (0 for padding)
    key_valid = torch.zeros(B, S, dtype=torch.bool)
    for b, (s, st, n) in enumerate(zip(seq_ids, starts, new)):
        tokens[b, : len(n)] = torch.tensor(n)
        positions[b] = st + torch.arange(T)  # padded rows get positions past the end; their keys are never written
        slots = cache.slots(s, torch.arange(st + len(n)))
        key_slots[b, : st + len(n)] = slots
        key_valid[b, : st + len(n)] = True
        write_rows += [b * T + t for t in range(len(n))]
        write_slots.append(slots[st:])
    write_rows_t = torch.tensor(write_rows, device=device)
    write_slots_t = torch.cat(write_slots).to(device)
    key_slots, positions = key_slots.to(device), positions.to(device)
    # (B, 1, T, S): key s is visible to query t if it exists and is not in the future; padded queries see all keys
    mask = (key_valid.to(device)[:, None, :] & (torch.arange(S, device=device) <= positions[:, :, None]))[:, None]
    mask = mask | (key_valid.to(device)[:, None, None, :] & ~mask.any(-1, keepdim=True))
    x = model.tok_emb(tokens.to(device))  # (B, T, C)
    rope_cs = None
    if cfg.pos_emb == "learned":
        x = x + model.pos_emb(positions)
    else:
        cos, sin = rope_cache(cfg.head_dim, positions.flatten(), cfg.rope_theta)  # (B·T, D)
        rope_cs = (cos.view(B, 1, T, -1), sin.view(B, 1, T, -1))  # broadcast over heads
    attend = get_attention(cfg.attn_impl)
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    for layer, block in enumerate(model.blocks):
        a = block.attn
        h = block.attn_norm(x)
        q = a.wq(h).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = a.wk(h).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = a.wv(h).view(B, T, Hkv, D)  # (B, T, Hkv, D)
        if rope_cs is not None:
            q, k = apply_rope(q, *rope_cs), apply_rope(k, *rope_cs)
        kp, vp = cache.k[layer], cache.v[layer]  # (slots, Hkv, D)
        kp[write_slots_t] = k.transpose(1, 2).reshape(B * T, Hkv, D)[write_rows_t].to(kp.dtype)
        vp[write_slots_t] = v.reshape(B * T, Hkv, D)[write_rows_t].to(vp.dtype)
        keys = kp[key_slots].transpose(1, 2).to(q.dtype)  # (B, Hkv, S, D)
        values = vp[key_slots].transpose(1, 2).to(q.dtype)
        if Hkv != H:
            keys, values = keys.repeat_interleave(H // Hkv, 1), values.repeat_interleave(H // Hkv, 1)  # (B, H, S, D)
        y = attend(q, keys, values, causal=False, attn_mask=mask)  # (B, H, T, D)
        x = x + a.wo(y.transpose(1, 2).reshape(B, T, H * D))
        x = x + block.mlp(block.mlp_norm(x))
    for s, st, n in zip(seq_ids, starts, new):
        cache.seqs[s].tokens.extend(n)
        if cache.prefix_caching:
            cache._register_full_blocks(s, st)
    if all_logits:
        return model.lm_head(model.norm(x))  # (B, T, V)
    last = torch.tensor([len(n) - 1 for n in new], device=device)
    return model.lm_head(model.norm(x[torch.arange(B, device=device), last]))  # (B, V)


def main(argv=None):
    """Simulated serving run: requests of random lengths join and leave a running batch (continuous batching)."""
    import time

    from ch07.kv_cache import generate
    from common.bench import markdown_table
    from common.cli import base_parser
    from common.seed import seed_everything

    p = base_parser("paged KV cache: continuous batching of random requests on a tiny model")
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--max-batch", type=int, default=6)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=48)
    args = p.parse_args(argv)
    seed_everything(args.seed)
    model = GPT(GPTConfig.preset("tiny", block_size=256, init_std=0.2)).eval()
    g = torch.Generator().manual_seed(args.seed)
    reqs = [
        (
            torch.randint(0, 65, (int(torch.randint(4, 64, (1,), generator=g)),), generator=g).tolist(),
            int(torch.randint(8, 120, (1,), generator=g)),
        )
        for _ in range(args.requests)
    ]
    cache = PagedKVCache(model.config, args.num_blocks, args.block_size)
    waiting, running, outputs, peak_blocks, steps = list(range(len(reqs))), {}, {}, 0, 0
    t0 = time.perf_counter()
    while waiting or running:
        while (
            waiting
            and len(running) < args.max_batch
            and cache.blocks_needed_new(len(reqs[waiting[0]][0])) <= cache.num_free_blocks - len(running)
        ):  # keep one spare block per running sequence for its next token
            r = waiting.pop(0)
            cache.add_sequence(r)
            running[r], outputs[r] = list(reqs[r][0]), []
        feed = {r: (toks if not outputs[r] else toks[-1:]) for r, toks in running.items()}
        logits = paged_forward(model, cache, feed)
        steps += 1
        peak_blocks = max(peak_blocks, args.num_blocks - cache.num_free_blocks)
        for r, nxt in zip(feed, logits.argmax(-1).tolist()):
            outputs[r].append(nxt)
            running[r].append(nxt)
            if len(outputs[r]) == reqs[r][1]:
                cache.free(r)
                del running[r]
    dt = time.perf_counter() - t0
    n_tokens = sum(len(o) for o in outputs.values())
    same = all(generate(model, reqs[r][0], reqs[r][1])[0].tolist() == outputs[r] for r in range(len(reqs)))
    kv_per_token = 2 * model.config.n_layer * model.config.n_kv_head * model.config.head_dim * 4
    longest = max(len(pr) + n for pr, n in reqs)
    rows = [
        {
            "requests": len(reqs),
            "forward steps": steps,
            "tokens": n_tokens,
            "tokens/s": n_tokens / dt,
            "peak KV MiB (paged)": peak_blocks * args.block_size * kv_per_token / 2**20,
            "KV MiB (static, max_batch x longest)": args.max_batch * longest * kv_per_token / 2**20,
            "== solo greedy": same,
        }
    ]
    print(markdown_table(rows))
    return rows[0]


if __name__ == "__main__":
    main()
