"""Model execution for the server: where each running sequence's keys/values live, and the forward the scheduler calls.

    engine = PagedEngine(model, max_slots=16)                                # torch backend (the default)
    slot = engine.alloc(); logits = engine.prefill(slot, prompt_ids)         # (V,)
    logits = engine.decode([slot_a, slot_b], [tok_a, tok_b])                  # (2, V): one step for all of them

``PagedEngine`` keeps keys/values in chapter 07's paged KV cache and runs a step for all running sequences as ONE
forward through ``PagedKVCache.run``: every row at its own position (ch01's ``positions`` seam), the block pool behind
ch01's cache protocol, so nothing is padded, shifted or re-rotated. The forward is chapter 07's ``FusedDecoder`` (the
same model with fused weights) built once from the model. When exactly one sequence is running, its keys/values are
copied once into a contiguous ch01 ``KVCache`` and it decodes on ``FusedDecoder``'s single-sequence fast path (C kernels
for the matmuls and for RoPE + cache write + attention): the common case of a lightly loaded server. When another
sequence joins, the tokens decoded alone ride along in the next batched step (that row is a chunk of several tokens),
which writes them into the pool.

``Engine`` drives the exported ONNX decode graph (``export_onnx.DecodeGraph``: ``(input_ids, attention_mask, past) ->
(logits, present)``, the onnxruntime backend, or the same graph eagerly in torch) over contiguous per-sequence slots.
The graph continues every row of a call from the same past length, so a step runs one call per distinct sequence length
(rows that joined together stay in step); see the README for why the graph does not take per-row positions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ch01.cache import KVCache
from ch01.model import GPT
from ch07.fused_decode import FusedDecoder
from ch07.paged_kv_cache import PagedKVCache
from ch08.export_onnx import DecodeGraph, export_decode, graphs_dir, ort_session


class _Slots:
    """Slot bookkeeping shared by both engines: a free list and each slot's length (tokens with cached keys)."""

    def __init__(self, max_slots: int):
        self.lengths = [0] * max_slots
        self.free = list(range(max_slots))[::-1]

    @property
    def max_slots(self) -> int:
        return len(self.lengths)

    def alloc(self) -> int:
        if not self.free:
            raise RuntimeError("no free KV slot")
        slot = self.free.pop()
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        self.free.append(slot)

    def _check_prompt(self, prompt_ids: list[int]) -> None:
        if not 0 < len(prompt_ids) <= self.max_context:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens; must be 1..{self.max_context}")

    def _check_room(self, slots: list[int]) -> None:
        if max(self.lengths[s] for s in slots) >= self.max_context:
            raise ValueError("a sequence reached max_context; the scheduler must finish it first")


def fast_decoder(model: GPT):
    """ch07's ``FusedDecoder`` of ``model`` (same logits, fused weights, C kernels where they compile), or the model
    itself for configurations it does not cover (learned positions, LayerNorm, GELU)."""
    try:
        return FusedDecoder(model)
    except ValueError:
        return model


class PagedEngine(_Slots):
    """The scheduler's engine over ch07's PagedKVCache: one ``run`` per step for all running sequences, or the
    contiguous fast path when one sequence runs alone. ``fused=False`` runs ch01's model itself (for comparison)."""

    def __init__(
        self,
        model: GPT,
        max_slots: int,
        max_context: int | None = None,
        block_size: int = 16,
        fused: bool = True,
        prefix_caching: bool = True,
    ):
        super().__init__(max_slots)
        self.cfg = model.config
        self.decoder = fast_decoder(model) if fused else model
        self.max_context = min(max_context or self.cfg.block_size, self.cfg.block_size)
        blocks_per_seq = -(-self.max_context // block_size) + 1  # + 1: a copy-on-write copy of a shared block
        p = next(model.parameters())
        self.cache = PagedKVCache(
            self.cfg,
            num_blocks=max_slots * blocks_per_seq,
            block_size=block_size,
            device=p.device,
            dtype=p.dtype,
            prefix_caching=prefix_caching,
        )
        self.prefix_hit_tokens = 0  # prompt tokens served from the prefix cache
        self.solo: tuple[int, KVCache, list[int]] | None = None  # (slot, its contiguous cache, tokens not in the pool)
        self.solo_steps = 0  # decode steps taken on the single-sequence fast path

    def release(self, slot: int) -> None:
        if self.solo is not None and self.solo[0] == slot:
            self.solo = None
        if slot in self.cache.seqs:
            self.cache.free(slot)
        super().release(slot)

    def fork(self, parent: int) -> int:
        """A new slot sharing every KV block of ``parent`` (``n > 1`` choices of one prompt): no second prefill; the
        partial last block is copied on the first write (copy-on-write in ch07's cache)."""
        if self.solo is not None and self.solo[0] == parent:
            self._fold_solo({})  # its fast-path tokens must be in the pool before the blocks are shared
        child = self.alloc()
        self.cache.fork(parent, child)
        self.lengths[child] = self.lengths[parent]
        return child

    def stats(self) -> dict[str, int]:
        """KV blocks used / cached (evictable) / free and prefix-cache token counters (for /metrics)."""
        return self.cache.stats()

    def prefill(self, slot: int, prompt_ids: list[int]) -> torch.Tensor:
        self._check_prompt(prompt_ids)
        cached = self.cache.add_sequence(slot, prompt_ids)  # whole blocks shared with an earlier identical prefix
        self.prefix_hit_tokens += cached
        logits = self.cache.run(self.decoder, {slot: prompt_ids[cached:]})  # (1, V)
        self.lengths[slot] = len(prompt_ids)
        return logits[0].float()

    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        self._check_room(slots)
        if len(slots) == 1:
            logits = self._decode_solo(slots[0], tokens[0])
        else:
            batch = {s: [t] for s, t in zip(slots, tokens)}
            self._fold_solo(batch)
            logits = self.cache.run(self.decoder, batch)  # (B, V), one forward, each row at its own positions
        for s in slots:
            self.lengths[s] += 1
        return logits.float()

    def _decode_solo(self, slot: int, token: int) -> torch.Tensor:
        """One step of the only running sequence on the contiguous fast path: (1, V)."""
        if self.solo is None or self.solo[0] != slot:
            self._fold_solo({})
            self.solo = (slot, self._contiguous_copy(slot), [])
        _, kv, pending = self.solo
        pending.append(token)
        idx = torch.tensor([[token]], device=self.cache.k[0].device)  # (1, 1)
        self.solo_steps += 1
        return self.decoder(idx, cache=kv)[:, -1]  # positions continue kv.length

    def _fold_solo(self, batch: dict[int, list[int]]) -> None:
        """Hand the tokens decoded on the fast path back to the pool: they ride along in ``batch`` (the sequence's row
        becomes a chunk of several tokens) or, when its row is not in the batch, go in by a forward of their own."""
        if self.solo is None:
            return
        slot, _, pending = self.solo
        self.solo = None
        if slot in batch:
            batch[slot] = pending + batch[slot]
        elif pending:
            self.cache.run(self.decoder, {slot: pending})

    def _contiguous_copy(self, slot: int) -> KVCache:
        """The sequence's keys/values from the pool into a ch01 KVCache sized for the whole context."""
        n = self.cache.length(slot)
        kv = KVCache(self.cfg.n_layer, max_len=self.max_context)
        for layer in range(self.cfg.n_layer):
            k, v = self.cache.gather(slot, layer)  # (1, Hkv, n, D)
            ck, cv = kv.buffers(layer, k, n)  # (1, Hkv, max_context, D)
            ck[:, :, :n], cv[:, :, :n] = k, v
        kv.length = n
        return kv


# ------------------------------------------------------------------------------------------- exported decode graph
class TorchBackend:
    """``export_onnx.DecodeGraph`` run eagerly: the onnxruntime backend's signature and semantics in torch."""

    name = "torch"

    def __init__(self, model: GPT):
        self.graph = DecodeGraph(model).eval()

    @torch.inference_mode()
    def __call__(self, input_ids, attention_mask, past):
        out = self.graph(input_ids, attention_mask, *past)
        return out[0], list(out[1:])


class OrtBackend:
    """The exported decode graph in onnxruntime (CPU); exported once per weights and cached under .cache/onnx/."""

    name = "onnxruntime"

    def __init__(self, model: GPT, onnx_path: str | Path | None = None, threads: int | None = None):
        if onnx_path is None:
            onnx_path = graphs_dir(model, "server") / "decode.onnx"
            if not Path(onnx_path).exists():
                export_decode(model.float().cpu().eval(), onnx_path)
        self.session = ort_session(onnx_path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, input_ids, attention_mask, past):
        feeds = [input_ids.cpu().numpy().astype(np.int64), attention_mask.cpu().numpy().astype(np.int64)]
        feeds += [t.cpu().float().numpy() for t in past]
        out = [torch.from_numpy(o) for o in self.session.run(None, dict(zip(self.input_names, feeds)))]
        return out[0], out[1:]


class Engine(_Slots):
    """Contiguous KV slots (max_slots, n_layer, kv_heads, max_context, head_dim) + a decode-graph backend."""

    def __init__(self, model: GPT, backend, max_slots: int, max_context: int | None = None):
        super().__init__(max_slots)
        cfg = model.config
        self.cfg, self.backend = cfg, backend
        self.max_context = min(max_context or cfg.block_size, cfg.block_size)
        self.device = next(model.parameters()).device if backend.name == "torch" else torch.device("cpu")
        shape = (max_slots, cfg.n_layer, cfg.n_kv_head, self.max_context, cfg.head_dim)
        self.k = torch.zeros(shape, device=self.device)  # (S, L, Hkv, ctx, D)
        self.v = torch.zeros(shape, device=self.device)

    def _run(self, slots: list[int], ids: list[list[int]], past_len: int) -> torch.Tensor:
        """One graph call: rows ``slots`` (all holding ``past_len`` positions) continue with ``ids`` (G, T) at
        positions past_len … past_len+T-1; stores the new keys/values and returns the last logits (G, V)."""
        rows = torch.tensor(slots, device=self.device)
        G, T = len(ids), len(ids[0])
        past = [t[rows, layer, :, :past_len] for layer in range(self.cfg.n_layer) for t in (self.k, self.v)]
        mask = torch.ones(G, past_len + T, dtype=torch.long, device=self.device)  # no padding: rows are in step
        logits, present = self.backend(torch.tensor(ids, device=self.device), mask, past)
        new = slice(past_len, past_len + T)
        self.k[rows, :, :, new] = torch.stack([t[:, :, new] for t in present[0::2]], 1).to(self.device)
        self.v[rows, :, :, new] = torch.stack([t[:, :, new] for t in present[1::2]], 1).to(self.device)
        for s in slots:
            self.lengths[s] = past_len + T
        return logits[:, -1].float()  # (G, V)

    def fork(self, parent: int) -> int:
        """A new slot holding a copy of ``parent``'s keys/values (``n > 1`` choices of one prompt, no second prefill)."""
        child = self.alloc()
        self.k[child], self.v[child] = self.k[parent], self.v[parent]
        self.lengths[child] = self.lengths[parent]
        return child

    def prefill(self, slot: int, prompt_ids: list[int]) -> torch.Tensor:
        """Run the prompt for one fresh slot; returns the next-token logits (V,)."""
        self._check_prompt(prompt_ids)
        return self._run([slot], [list(prompt_ids)], 0)[0]

    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """Feed one token per slot: one graph call per group of equal lengths; next-token logits (B, V)."""
        self._check_room(slots)
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(slots):
            groups.setdefault(self.lengths[s], []).append(i)
        logits = torch.empty(len(slots), self.cfg.vocab_size)
        for past_len, idx in groups.items():
            logits[idx] = self._run([slots[i] for i in idx], [[tokens[i]] for i in idx], past_len).cpu()
        return logits
