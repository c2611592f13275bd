"""vLLM-style paged KV cache: keys/values live in a pool of fixed-size blocks; each sequence owns a block table.

API (what a continuous-batching server uses — chapter 08 builds on exactly this):

    from ch07.paged_kv_cache import PagedKVCache
    cache = PagedKVCache(model.config, num_blocks=256, block_size=16)    # the whole KV memory, allocated once

    n_cached = cache.add_sequence("req-1", prompt_ids)   # register a request; returns how many prompt tokens are
                                                         # already cached (shared full blocks of an identical prefix)
    logits = cache.run(model, {"req-1": prompt_ids[n_cached:]})          # prefill -> (1, V) last-token logits
    ...
    # every server step: ONE batched forward over all running sequences, one new token each (or a prompt chunk each);
    # every sequence has its own length and its own position
    logits = cache.run(model, {"req-1": [tok1], "req-7": [tok7], "req-9": prompt9})  # (3, V), in dict order
    cache.fork("req-1", "req-1b")   # parallel sampling / beams: share all blocks, copy-on-write on the next append
    cache.free("req-7")             # finished: its blocks go back to the pool (shared ones when their last user leaves)
    # for the scheduler: admission and preemption decisions before a step (run raises OutOfBlocks otherwise,
    # leaving every sequence unchanged)
    cache.can_append(["req-1", ...], [1, ...])  cache.blocks_needed_new(len(prompt))  cache.num_free_blocks
    cache.length("req-1")  cache.block_table("req-1")
    # sampling per request: ch07.sampling.sample_rows(logits, [Sampler(...) per row], generated_ids, generators)

``run(..., all_logits=True)`` returns (B, T, V) logits for every fed token (right-padded per row) instead.
Prefix caching (vLLM's automatic prefix caching): every FULL block is registered under a hash of (its parent block's
hash, its own tokens), so a block's key names its whole prefix; a new sequence whose prompt starts with the same blocks
shares them (reference counts) and prefills only the rest. A block whose last user is freed stays in the table as an
unreferenced, evictable cached block (an LRU list, tail blocks of a sequence first); ``_alloc`` takes a never-used block
first, then evicts the least recently used cached one. ``num_free_blocks`` counts both (an evictable block is free
memory); ``stats()`` tells them apart: blocks used / cached / free, prefix-cache hit tokens. Sequences are capped at
the model's block_size positions.

How it works: the pool is one tensor per layer of shape (num_blocks · block_size, n_kv_heads, head_dim) — one row per
token "slot". Sequence s's token at position p lives in slot ``table[s][p // block_size] · block_size + p % block_size``.
There is no second forward: ``run`` builds right-padded tokens (B, T) and per-row positions (B, T) and calls the model's
own ``forward(tokens, positions=..., cache=view)``. The view implements ch01's cache protocol
(``update(layer, k, v, positions)``, ch01/cache.py): it writes the real new tokens' keys/values into their slots and
returns each row's slots gathered into (B, n_kv_heads, S, head_dim), index j = position j, so ch01's mask ("key j is
visible to a query at position p iff j <= p") is all the attention needs. vLLM's CUDA kernel reads the blocks in place
instead of gathering; the arithmetic is the same, and the tests check the logits and tokens equal the model's own.
Memory: a sequence holds ceil(len / block_size) blocks, so waste is < one block per sequence instead of the
(max_seq_len − len) a contiguous preallocation reserves — the point of Kwon et al. 2023.

Run ``python 07_inference_engineering/paged_kv_cache.py`` for a simulated serving run (memory vs a static cache).
Reference: Kwon et al. 2023, "Efficient Memory Management for LLM Serving with PagedAttention" (vLLM).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ch01.model import GPT, GPTConfig


@dataclass
class _Seq:
    blocks: list[int] = field(default_factory=list)  # block table: logical block i -> physical block id
    tokens: list[int] = field(default_factory=list)  # tokens whose keys/values are stored (for prefix hashing)
    hashes: list[int] = field(default_factory=list)  # prefix hash of each full block (chained: parent hash, tokens)


def block_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """The key of a full block: its tokens AND, through the parent's hash, every token before it."""
    return hash((parent, tuple(tokens)))


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
        self.free_blocks = list(range(num_blocks - 1, -1, -1))  # never-used blocks, a stack: low ids first
        self.seqs: dict[Hashable, _Seq] = {}
        self.prefix_table: dict[int, int] = {}  # block hash -> physical block holding it
        self.block_key: dict[int, tuple[int | None, tuple[int, ...], int]] = {}  # block -> (parent hash, tokens, hash)
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody uses, least recently used first
        self.hit_tokens = self.query_tokens = 0  # prompt tokens found in / looked up in the prefix cache

    # ------------------------------------------------------------------------------------------- bookkeeping
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: never used + cached but unreferenced (evicted on demand)."""
        return len(self.free_blocks) + len(self.evictable)

    def stats(self) -> dict[str, int]:
        """Block counts (used = referenced by a live sequence; cached = evictable, holding a known prefix; free =
        never used or evicted) and prefix-cache token counters."""
        used = self.num_blocks - self.num_free_blocks
        return dict(
            blocks_used=used,
            blocks_cached=len(self.evictable),
            blocks_free=self.num_free_blocks,
            prefix_hit_tokens=self.hit_tokens,
            prefix_query_tokens=self.query_tokens,
        )

    def length(self, seq_id: Hashable) -> int:
        return len(self._seq(seq_id).tokens)

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._seq(seq_id).blocks)

    def _seq(self, seq_id: Hashable) -> _Seq:
        if seq_id not in self.seqs:
            raise KeyError(f"unknown sequence {seq_id!r}")
        return self.seqs[seq_id]

    def _alloc(self) -> int:
        if self.free_blocks:
            b = self.free_blocks.pop()
        elif self.evictable:
            b, _ = self.evictable.popitem(last=False)  # least recently used cached block
            del self.prefix_table[self.block_key.pop(b)[2]]
        else:
            raise OutOfBlocks(f"all {self.num_blocks} KV blocks are in use")
        self.refcount[b] = 1
        return b

    def _decref(self, b: int) -> None:
        self.refcount[b] -= 1
        if self.refcount[b] == 0:
            if b in self.block_key:  # holds a known prefix: keep it for a later request, evict when memory is needed
                self.evictable[b] = None
            else:
                self.free_blocks.append(b)

    def _lookup(self, parent: int | None, tokens: Sequence[int]) -> tuple[int, int | None]:
        """(hash, cached block or None) of a full block of ``tokens`` after the prefix whose hash is ``parent``."""
        h = block_hash(parent, tokens)
        b = self.prefix_table.get(h)
        if b is not None and self.block_key[b][:2] != (parent, tuple(tokens)):  # a hash collision: not this prefix
            b = None
        return h, b

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
        never the last prompt token, whose logits the caller needs). Feed ``prompt_ids[n:]`` to ``run``."""
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id!r} already exists")
        s = self.seqs[seq_id] = _Seq()
        prompt = [int(t) for t in (prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else prompt_ids)]
        if not self.prefix_caching:
            return 0
        bs, parent = self.block_size, None
        self.query_tokens += len(prompt)
        for i in range((len(prompt) - 1) // bs):  # full blocks strictly before the last prompt token
            h, b = self._lookup(parent, prompt[i * bs : (i + 1) * bs])
            if b is None:
                break
            if self.refcount[b] == 0:  # a cached block nobody used: take it off the eviction list
                del self.evictable[b]
            self.refcount[b] += 1
            s.blocks.append(b)
            s.tokens.extend(prompt[i * bs : (i + 1) * bs])
            s.hashes.append(h)
            parent = h
        self.hit_tokens += len(s.tokens)
        return len(s.tokens)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """The child shares every block of the parent; the first write into a shared block copies it."""
        if child_id in self.seqs:
            raise ValueError(f"sequence {child_id!r} already exists")
        p = self._seq(parent_id)
        for b in p.blocks:
            self.refcount[b] += 1
        self.seqs[child_id] = _Seq(list(p.blocks), list(p.tokens), list(p.hashes))

    def free(self, seq_id: Hashable) -> None:
        for b in reversed(self._seq(seq_id).blocks):  # tail first: a prefix's later blocks are evicted before its head
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
            parent, tokens = (s.hashes[i - 1] if i else None), s.tokens[i * bs : (i + 1) * bs]
            h, cached = self._lookup(parent, tokens)
            s.hashes.append(h)
            if cached is None and h not in self.prefix_table and s.blocks[i] not in self.block_key:
                self.prefix_table[h] = s.blocks[i]
                self.block_key[s.blocks[i]] = (parent, tuple(tokens), h)

    def slots(self, seq_id: Hashable, positions: torch.Tensor) -> torch.Tensor:
        """Flat pool row of each position of a sequence."""
        table = torch.tensor(self._seq(seq_id).blocks, dtype=torch.long)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def gather(self, seq_id: Hashable, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A sequence's keys and values as contiguous (1, n_kv_heads, length, head_dim) tensors (for tests/debugging)."""
        idx = self.slots(seq_id, torch.arange(self.length(seq_id))).to(self.k[layer].device)
        return self.k[layer][idx].transpose(0, 1)[None], self.v[layer][idx].transpose(0, 1)[None]

    # ------------------------------------------------------------------------------------------- one forward
    def _plan(self, seq_ids: list, new: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, _PagedView]:
        """Right-padded tokens (B, T), their positions (B, T) (a pad repeats its row's last real position) and the
        view that writes the real ones into their (already reserved) slots."""
        B, T = len(seq_ids), max(len(n) for n in new)
        ends = [self.length(s) + len(n) for s, n in zip(seq_ids, new)]
        tokens = torch.zeros(B, T, dtype=torch.long)
        positions = torch.zeros(B, T, dtype=torch.long)
        key_slots = torch.zeros(B, max(ends), dtype=torch.long)  # slot 0 past a row's end: hidden by the mask
        write_rows, write_slots = [], []
        for b, (s, n, end) in enumerate(zip(seq_ids, new, ends)):
            start = end - len(n)
            tokens[b, : len(n)] = torch.tensor(n)
            positions[b] = (start + torch.arange(T)).clamp(max=end - 1)
            slots = self.slots(s, torch.arange(end))
            key_slots[b, :end] = slots
            write_rows += range(b * T, b * T + len(n))
            write_slots.append(slots[start:])
        view = _PagedView(
            self, torch.tensor(write_rows, device=device), torch.cat(write_slots).to(device), key_slots.to(device)
        )
        return tokens.to(device), positions.to(device), view

    @torch.no_grad()
    def run(
        self, model, batch: Mapping[Hashable, Sequence[int] | torch.Tensor], all_logits: bool = False
    ) -> torch.Tensor:
        """Append ``batch[seq_id]`` (n_i >= 1 tokens each) to every listed sequence in ONE forward of ``model`` (a ch01
        ``GPT`` or anything with its contract, e.g. a ``FusedDecoder``): ``model(tokens, positions=, cache=view)``.

        Returns the logits of each sequence's last new token (B, V) in the mapping's order, or (B, T_max, V) for all
        new tokens (right-padded) with ``all_logits=True``. Raises ``OutOfBlocks`` (every sequence unchanged) when the
        pool cannot hold the new tokens."""
        if not batch:
            raise ValueError("empty batch")
        seq_ids = list(batch)
        new = [
            [int(t) for t in (batch[s].tolist() if isinstance(batch[s], torch.Tensor) else batch[s])] for s in seq_ids
        ]
        if any(len(n) == 0 for n in new):
            raise ValueError("every sequence in the batch needs at least one new token")
        starts = [self.length(s) for s in seq_ids]
        if max(st + len(n) for st, n in zip(starts, new)) > model.config.block_size:
            raise ValueError(f"a sequence would exceed block_size={model.config.block_size}")
        if not self.can_append(seq_ids, [len(n) for n in new]):
            raise OutOfBlocks(f"batch needs more KV blocks than the {self.num_free_blocks} free")
        for s, n in zip(seq_ids, new):
            self._reserve(s, len(n))
        device = next(model.parameters()).device
        tokens, positions, view = self._plan(seq_ids, new, device)
        logits = model(tokens, positions=positions, cache=view)  # (B, T, V)
        for s, st, n in zip(seq_ids, starts, new):
            self.seqs[s].tokens.extend(n)
            if self.prefix_caching:
                self._register_full_blocks(s, st)
        if all_logits:
            return logits
        last = torch.tensor([len(n) - 1 for n in new], device=device)
        return logits[torch.arange(len(new), device=device), last]  # (B, V)


class _PagedView:
    """One forward's window onto the pool: ch01's cache protocol for a batch of sequences (built by ``PagedKVCache.run``).

    write_rows / write_slots: which flattened (row · T + t) new tokens are real and the pool slot each goes to;
    key_slots (B, S): the pool slot of position j of row b (any slot past a row's length: the mask hides it)."""

    def __init__(
        self, cache: PagedKVCache, write_rows: torch.Tensor, write_slots: torch.Tensor, key_slots: torch.Tensor
    ):
        self.cache, self.write_rows, self.write_slots, self.key_slots = cache, write_rows, write_slots, key_slots

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        B, Hkv, T, D = k.shape
        kp, vp = self.cache.k[layer], self.cache.v[layer]  # (slots, Hkv, D)
        kp[self.write_slots] = k.transpose(1, 2).reshape(B * T, Hkv, D)[self.write_rows].to(kp.dtype)
        vp[self.write_slots] = v.transpose(1, 2).reshape(B * T, Hkv, D)[self.write_rows].to(vp.dtype)
        keys = kp[self.key_slots].transpose(1, 2).to(k.dtype)  # (B, Hkv, S, D): index j = position j
        return keys, vp[self.key_slots].transpose(1, 2).to(v.dtype)


def main(argv=None):
    """Simulated serving run: requests of random lengths join and leave a running batch (continuous batching)."""
    import time

    from ch01.generate import generate
    from common.bench import markdown_table
    from common.cli import base_parser
    from common.seed import seed_everything

    p = base_parser("paged KV cache: continuous batching of random requests on a tiny model", seed=True)
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
        logits = cache.run(model, feed)
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
    same = all(generate(model, [reqs[r][0]], reqs[r][1], temperature=0)[0] == outputs[r] for r in range(len(reqs)))
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
