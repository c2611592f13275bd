"""Model execution for the server: a slot-based KV store and the two forward calls the scheduler needs.

    engine = Engine(model, TorchBackend(model), max_slots=16, max_context=64)
    slot = engine.alloc(); logits = engine.prefill(slot, prompt_ids)         # (V,)
    logits = engine.decode([slot_a, slot_b], [tok_a, tok_b])                  # (2, V): one step for all of them

Each running sequence owns a slot: keys/values for its positions 0..len-1, stored in one preallocated tensor
(max_slots, n_layer, kv_heads, max_context, head_dim). A decode step batches sequences of *different* lengths with
left padding + ``key_padding_mask``. The model's forward takes one scalar ``start_pos``, so in a padded batch every new
token sits at position P = max length, while sequence i is really at position len_i. RoPE makes that fixable exactly:
rotations compose (R(p + d) = R(d)·R(p)), so the engine rotates sequence i's stored keys forward by d_i = P - len_i
before the step (relative distances are then the true ones) and rotates its new key back by -d_i before storing it.
A sequence alone in a batch has d = 0 (identity), so batching changes results only by float rounding.

``PagedEngine`` (the default for the torch backend) is the same interface over chapter 07's vLLM-style paged KV cache
(``ch07.paged_kv_cache``: block tables, per-row positions, prefix caching), which needs no re-rotation because its forward
takes a position per row. ``Engine`` stays for the onnxruntime backend, whose exported graph takes explicit past tensors.
The scheduler only sees slots. Backends share one signature, ``(input_ids, attention_mask, past) -> (logits, present)``: ``TorchBackend`` runs
``export_onnx.DecodeGraph`` eagerly, ``OrtBackend`` runs the exported decode graph in onnxruntime.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ch01.functional import apply_rope, rope_cache
from ch01.model import GPT
from ch07.paged_kv_cache import PagedKVCache, paged_forward
from ch08.export_onnx import DecodeGraph, export_decode, ort_session
from common.data import cache_dir


class TorchBackend:
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
            h = hashlib.sha256(repr(model.config.to_dict()).encode())
            for p in model.state_dict().values():
                h.update(p.detach().float().cpu().numpy().tobytes())
            onnx_path = cache_dir("onnx", f"server-{h.hexdigest()[:12]}") / "decode.onnx"
            if not Path(onnx_path).exists():
                export_decode(model.float().cpu().eval(), onnx_path)
        self.session = ort_session(onnx_path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, input_ids, attention_mask, past):
        feeds = [input_ids.cpu().numpy().astype(np.int64), attention_mask.cpu().numpy().astype(np.int64)]
        feeds += [t.cpu().float().numpy() for t in past]
        out = [torch.from_numpy(o) for o in self.session.run(None, dict(zip(self.input_names, feeds)))]
        return out[0], out[1:]


class Engine:
    def __init__(self, model: GPT, backend, max_slots: int, max_context: int | None = None):
        cfg = model.config
        if cfg.pos_emb != "rope":
            raise ValueError(
                "the batching engine needs RoPE (pos_emb='rope'); left padding would shift learned positions"
            )
        self.cfg, self.backend = cfg, backend
        self.max_context = min(max_context or cfg.block_size, cfg.block_size)
        self.device = next(model.parameters()).device if backend.name == "torch" else torch.device("cpu")
        shape = (max_slots, cfg.n_layer, cfg.n_kv_head, self.max_context, cfg.head_dim)
        self.k = torch.zeros(shape, device=self.device)  # (S, L, Hkv, ctx, D)
        self.v = torch.zeros(shape, device=self.device)
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

    def _rotate(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Rotate RoPE'd keys x (B, ..., D) of row b by ``shift[b]`` positions."""
        cos, sin = rope_cache(self.cfg.head_dim, shift.to(x.device), self.cfg.rope_theta)  # 2 × (B, D)
        view = (-1,) + (1,) * (x.dim() - 2) + (self.cfg.head_dim,)
        return apply_rope(x, cos.view(view), sin.view(view))

    def prefill(self, slot: int, prompt_ids: list[int]) -> torch.Tensor:
        """Run the prompt for one fresh slot; returns the next-token logits (V,)."""
        T = len(prompt_ids)
        if not 0 < T <= self.max_context:
            raise ValueError(f"prompt of {T} tokens; must be 1..{self.max_context}")
        ids = torch.tensor([prompt_ids], device=self.device)  # (1, T)
        mask = torch.ones(1, T, dtype=torch.long, device=self.device)
        past = [torch.zeros(1, self.cfg.n_kv_head, 0, self.cfg.head_dim, device=self.device)] * (2 * self.cfg.n_layer)
        logits, present = self.backend(ids, mask, past)
        self.k[slot, :, :, :T] = torch.stack(present[0::2], 1)[0].to(self.device)  # (L, Hkv, T, D)
        self.v[slot, :, :, :T] = torch.stack(present[1::2], 1)[0].to(self.device)
        self.lengths[slot] = T
        return logits[0, -1].float()

    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """Feed one token per slot (all in one forward); returns next-token logits (B, V)."""
        lens = torch.tensor([self.lengths[s] for s in slots], device=self.device)  # (B,)
        if int(lens.max()) >= self.max_context:
            raise ValueError("a sequence reached max_context; the scheduler must finish it first")
        B, P = len(slots), int(lens.max())
        shift = P - lens  # (B,) left-padding of each row
        rows = torch.tensor(slots, device=self.device)
        # gather row b's positions j - shift[b] (clamped; the padded ones are masked out below)
        src = (torch.arange(P, device=self.device)[None, :] - shift[:, None]).clamp(min=0)  # (B, P)
        index = src[:, None, None, :, None].expand(B, self.cfg.n_layer, self.cfg.n_kv_head, P, self.cfg.head_dim)
        past_k = self._rotate(self.k[rows].gather(3, index), shift)  # (B, L, Hkv, P, D), at positions shifted by d
        past_v = self.v[rows].gather(3, index)  # (B, L, Hkv, P, D)
        past = [t for i in range(self.cfg.n_layer) for t in (past_k[:, i], past_v[:, i])]
        mask = torch.arange(P + 1, device=self.device)[None, :] >= shift[:, None]  # (B, P+1), False = padding
        ids = torch.tensor(tokens, device=self.device)[:, None]  # (B, 1)
        logits, present = self.backend(ids, mask.long(), past)
        new_k = torch.stack([t[:, :, -1] for t in present[0::2]], 1).to(self.device)  # (B, L, Hkv, D)
        new_v = torch.stack([t[:, :, -1] for t in present[1::2]], 1).to(self.device)
        self.k[rows, :, :, lens] = self._rotate(new_k, -shift)  # back to the sequence's true position
        self.v[rows, :, :, lens] = new_v
        for s in slots:
            self.lengths[s] += 1
        return logits[:, -1].float()  # (B, V)


class PagedEngine:
    """The Engine interface over ch07's PagedKVCache: one ``paged_forward`` per step for all running sequences."""

    def __init__(self, model: GPT, max_slots: int, max_context: int | None = None, block_size: int = 16):
        self.model, self.cfg = model, model.config
        self.max_context = min(max_context or self.cfg.block_size, self.cfg.block_size)
        blocks_per_seq = -(-self.max_context // block_size) + 1  # + 1: a copy-on-write copy of a shared block
        device = next(model.parameters()).device
        self.cache = PagedKVCache(
            self.cfg,
            num_blocks=max_slots * blocks_per_seq,
            block_size=block_size,
            device=device,
            dtype=next(model.parameters()).dtype,
        )
        self.lengths = [0] * max_slots
        self.free = list(range(max_slots))[::-1]
        self.prefix_hit_tokens = 0  # prompt tokens served from the prefix cache

    @property
    def max_slots(self) -> int:
        return len(self.lengths)

    def alloc(self) -> int:
        if not self.free:
            raise RuntimeError("no free KV slot")
        return self.free.pop()

    def release(self, slot: int) -> None:
        if slot in self.cache.seqs:
            self.cache.free(slot)
        self.lengths[slot] = 0
        self.free.append(slot)

    def prefill(self, slot: int, prompt_ids: list[int]) -> torch.Tensor:
        if not 0 < len(prompt_ids) <= self.max_context:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens; must be 1..{self.max_context}")
        cached = self.cache.add_sequence(slot, prompt_ids)  # whole blocks shared with an earlier identical prefix
        self.prefix_hit_tokens += cached
        logits = paged_forward(self.model, self.cache, {slot: prompt_ids[cached:]})  # (1, V)
        self.lengths[slot] = len(prompt_ids)
        return logits[0].float()

    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        if max(self.lengths[s] for s in slots) >= self.max_context:
            raise ValueError("a sequence reached max_context; the scheduler must finish it first")
        logits = paged_forward(self.model, self.cache, {s: [t] for s, t in zip(slots, tokens)})  # (B, V)
        for s in slots:
            self.lengths[s] += 1
        return logits.float()
