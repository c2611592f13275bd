"""The KV cache protocol every decoder in the course plugs into, and ch01's own cache.

    cache = KVCache(model.config.n_layer)                       # grows as needed; KVCache(n, max_len=...) preallocates
    logits = model(prompt, cache=cache)                         # prefill: positions 0 … T-1
    logits = model(next_tok, cache=cache)                       # one step: position T (the cache knows its length)
    logits = model(toks, positions=pos, cache=cache)            # ragged batch: row b's tokens at positions pos[b]

Why a cache: step t of decoding would otherwise re-run the whole prefix; with one, it runs the model on the new token
only and reads earlier keys/values from memory (Pope et al. 2022).

The protocol is one method, called by every attention layer of ``GPT.forward``:

    update(layer, k, v, positions) -> (k_all, v_all)
        k, v: (B, n_kv_head, T, D) for the new tokens, at ``positions`` (B, T);
        returns (B, n_kv_head, S, D) with S = positions.max() + 1, where index j holds the key/value at POSITION j.

Because index j is position j in every row, the model's attention mask is simply "key j is visible to a query at
position p iff j <= p": rows of a batch may sit at different positions (ragged prompts, a server's running requests),
rolling back is writing at an earlier position again, and nothing is ever shifted or re-rotated. Positions a row has not
written yet hold stale values, and the mask never shows them. ch07's paged cache implements the same protocol over a
pool of blocks; ch08's server and the ONNX export use it too.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Cache(Protocol):
    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class KVCache:
    """Per layer, one (B, n_kv_head, capacity, D) buffer for keys and one for values, written by position in place.

    ``max_len`` preallocates that many positions (a static cache, as gpt-fast uses); without it the buffers start at
    the first write's size and double when a position beyond them arrives (no ``torch.cat`` per step).
    ``length`` is one past the highest position written: the default start of the next forward's positions.
    """

    def __init__(self, n_layer: int, max_len: int | None = None):
        self.n_layer, self.max_len = n_layer, max_len
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.length = 0
        self.states: dict[int, dict] = {}  # recurrent layers' state (chapter 05's Gated DeltaNet): constant size
        self._positions: torch.Tensor | None = None  # the positions tensor of the current forward (same for all layers)
        self._plan: tuple[int | None, int] = (None, 0)  # (start if rows are one contiguous range else None, end)

    def _plan_for(self, positions: torch.Tensor) -> tuple[int | None, int]:
        """(contiguous start or None, end) of a forward's positions, computed once per forward (host syncs)."""
        if positions is not self._positions:
            T = positions.shape[1]
            start = positions[:1, :1]  # (1, 1)
            contiguous = bool((positions == start + torch.arange(T, device=positions.device)).all())
            end = int(positions.max()) + 1
            self._positions, self._plan = positions, ((int(start) if contiguous else None), end)
        return self._plan

    def _ensure(self, layer: int, like: torch.Tensor, end: int, like_v: torch.Tensor | None = None) -> None:
        """Grow layer's buffers to hold positions < end; values take ``like_v``'s heads and size when given (MLA
        stores its latent as "keys" and its shared RoPE key as "values": see chapter 04's mla.py)."""
        buf = self.k[layer]
        if buf is not None and buf.shape[2] >= end:
            if buf.shape[0] != like.shape[0]:
                raise ValueError(f"cache holds batch {buf.shape[0]}, got batch {like.shape[0]}")
            return
        if self.max_len is not None and end > self.max_len:
            raise ValueError(f"cache holds {self.max_len} positions, asked to write position {end - 1}")
        B, H, _, D = like.shape
        Hv, Dv = (H, D) if like_v is None else (like_v.shape[1], like_v.shape[3])
        cap = self.max_len or max(end, 2 * (0 if buf is None else buf.shape[2]))
        new_k, new_v = like.new_zeros(B, H, cap, D), like.new_zeros(B, Hv, cap, Dv)
        if buf is not None:
            n = buf.shape[2]
            new_k[:, :, :n], new_v[:, :, :n] = buf, self.v[layer]
        self.k[layer], self.v[layer] = new_k, new_v

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        start, end = self._plan_for(positions)
        self._ensure(layer, k, end, v)
        ck, cv = self.k[layer], self.v[layer]
        if start is not None:  # the common case: every row writes the same range (a slice copy)
            ck[:, :, start:end] = k
            cv[:, :, start:end] = v
        else:  # ragged rows: scatter each row's tokens to its own positions
            idx = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # (B, Hkv, T, D)
            ck.scatter_(2, idx, k)
            cv.scatter_(2, positions[:, None, :, None].expand(-1, v.shape[1], -1, v.shape[3]), v)
        if layer == self.n_layer - 1:
            self.length = end
        return ck[:, :, :end], cv[:, :, :end]  # (B, Hkv, S, D) views

    def buffers(self, layer: int, like: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer's (B, Hkv, capacity, D) buffers, allocated (batch, heads, dtype of ``like``) to hold positions < end:
        for engines that write them directly (ch07's fused decoder), which then set ``length`` themselves."""
        self._ensure(layer, like, end)
        return self.k[layer], self.v[layer]

    def get_state(self, layer: int) -> dict | None:
        """A recurrent layer's state (None before its first write). Such layers keep no keys: their memory is fixed."""
        return self.states.get(layer)

    def set_state(self, layer: int, state: dict, end: int) -> None:
        """Store a recurrent layer's state after positions < end (the last layer also advances ``length``)."""
        self.states[layer] = state
        if layer == self.n_layer - 1:
            self.length = end

    def crop(self, length: int) -> None:
        """Forget positions >= length (speculative decoding's rejected drafts); the next forward starts there."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop to {length}: the cache holds {self.length} positions")
        if self.states and length != self.length:
            raise ValueError("cannot crop a cache holding recurrent states: they cannot forget tokens")
        self.length = length

    def reset(self) -> None:
        self.length = 0
        self.states.clear()

    @property
    def nbytes(self) -> int:
        tensors = self.k + self.v + [t for s in self.states.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)
