"""Sliding-window attention with a rolling KV cache (Mistral) and attention sinks (StreamingLLM): generate far past
the window — and past the trained context — with a cache whose memory never grows.

What it shows: with ``GPTConfig.sliding_window = W`` a query at position p sees keys p-W+1 … p only, so a decoder needs
just the last W keys and values per layer. ``RollingKVCache`` keeps them in a ring of W slots (position p lives in slot
p mod W), so memory is constant however long the generation runs. StreamingLLM (Xiao et al. 2023) found that models
dump attention on the first few tokens; evicting them wrecks the output, so ``attn_sinks = n`` keeps positions 0 … n-1
visible forever in n extra slots. The ch01 model builds the band mask from the positions the cache says it returns
(``key_positions``), so the same forward serves full attention, a growing cache and this ring (a test checks the ring
gives the logits of full attention with a band mask on the same tokens, far past the window).

``python 04_efficient_attention/sliding_window.py`` generates with a growing ``KVCache`` and with the rolling cache
and plots cache memory against generated length (``assets/sliding_window_cache_memory.png``).
References: Beltagy et al. 2020 (Longformer); Jiang et al. 2023 (Mistral 7B, rolling buffer cache); Xiao et al. 2023
(StreamingLLM, attention sinks).
"""

from __future__ import annotations

import torch

from ch01.cache import KVCache
from ch01.generate import stream
from ch01.model import GPT, GPTConfig
from common.bench import hardware_info, markdown_table
from common.cli import base_parser
from common.plot import assets_dir, line_plot
from common.seed import seed_everything


class RollingKVCache:
    """Per layer a ring of ``sinks + window`` slots for keys and values; ch01's cache protocol plus ``key_positions``.

    ``update`` returns the stored slots followed by the new tokens' keys (attention needs both: a prefill longer than
    the window reads keys that will not stay), then stores only the sinks and the last ``window`` positions. Every row
    of a batch must sit at the same positions (a uniform batch); ragged batches need a ``KVCache``.
    """

    def __init__(self, n_layer: int, window: int, sinks: int = 0):
        if window < 1 or sinks < 0:
            raise ValueError(f"window must be >= 1 and sinks >= 0, got window={window}, sinks={sinks}")
        self.n_layer, self.window, self.sinks = n_layer, window, sinks
        self.capacity = sinks + window
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.slot_pos: torch.Tensor | None = None  # (B, capacity) position held by each slot, -1 = empty
        self.length = 0
        self._positions: torch.Tensor | None = None
        self._plan: tuple[torch.Tensor, torch.Tensor] | None = None

    def key_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, capacity + T): the positions of the keys ``update`` will return for new tokens at ``positions`` (B, T)."""
        B = positions.shape[0]
        stored = self.slot_pos if self.slot_pos is not None else positions.new_full((B, self.capacity), -1)
        return torch.cat([stored, positions], dim=1)

    def _plan_for(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(which new tokens stay, their slots), computed once per forward (all layers get the same positions)."""
        if positions is not self._positions:
            if bool((positions != positions[:1]).any()):
                raise ValueError(
                    "RollingKVCache needs every row at the same positions (a uniform batch); "
                    "ragged batches: use ch01's KVCache"
                )
            pos = positions[0]  # (T,)
            stays = (pos < self.sinks) | (pos > pos.max() - self.window)  # sinks and the last `window` positions
            keep = stays.nonzero().flatten()  # (n,)
            slot = torch.where(pos < self.sinks, pos, self.sinks + (pos - self.sinks) % self.window)[keep]  # (n,)
            self._positions, self._plan = positions, (keep, slot)
            # the model built this forward's mask from the old slot positions already: record the new ones now
            if self.slot_pos is None:
                self.slot_pos = positions.new_full((positions.shape[0], self.capacity), -1)
            self.slot_pos[:, slot] = positions[:, keep]
            self.length = int(pos.max()) + 1
        return self._plan

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        keep, slot = self._plan_for(positions)
        B = k.shape[0]
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(B, k.shape[1], self.capacity, k.shape[3])
            self.v[layer] = v.new_zeros(B, v.shape[1], self.capacity, v.shape[3])
        if self.k[layer].shape[0] != B:
            raise ValueError(f"cache holds batch {self.k[layer].shape[0]}, got batch {B}")
        k_all = torch.cat([self.k[layer], k], dim=2)  # (B, Hkv, capacity + T, D): a copy, the ring is then free
        v_all = torch.cat([self.v[layer], v], dim=2)
        self.k[layer][:, :, slot] = k[:, :, keep]
        self.v[layer][:, :, slot] = v[:, :, keep]
        return k_all, v_all

    def crop(self, length: int) -> None:
        if length != self.length:  # the ring has already overwritten what rolling back would need
            raise ValueError(
                "RollingKVCache cannot roll back (evicted keys are gone); speculative decoding needs a KVCache"
            )

    def reset(self) -> None:
        self.slot_pos, self.length, self._positions = None, 0, None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


def decode_memory(model: GPT, cache, prompt_len: int, new_tokens: int, every: int) -> list[tuple[int, int]]:
    """(tokens so far, cache bytes) every ``every`` generated tokens of a greedy generation."""
    prompt = torch.zeros(1, prompt_len, dtype=torch.long)
    points = []
    for step, _ in enumerate(stream(model, prompt, new_tokens, temperature=0.0, cache=cache), start=1):
        if step % every == 0:
            points.append((prompt_len + step, cache.nbytes))
    return points


def main(argv=None) -> dict:
    p = base_parser(__doc__, seed=True)
    p.add_argument("--preset", default="tiny", help="ch01 GPTConfig preset (random weights: memory does not care)")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--no-plot", action="store_true", help="skip writing the PNG")
    args = p.parse_args(argv)
    seed_everything(args.seed)
    cfg = GPTConfig.preset(args.preset, sliding_window=args.window, attn_sinks=args.sinks)
    model = GPT(cfg).eval()
    every = max(1, args.new_tokens // 32)
    caches = {
        "KVCache (grows by doubling)": KVCache(cfg.n_layer),
        f"RollingKVCache (window {args.window} + {args.sinks} sinks)": RollingKVCache(
            cfg.n_layer, args.window, args.sinks
        ),
    }
    curves = {name: decode_memory(model, c, 8, args.new_tokens, every) for name, c in caches.items()}
    rows = [
        {"cache": name, **{f"KiB @ {n} tokens": b / 1024 for n, b in pts if n in (pts[0][0], pts[-1][0])}}
        for name, pts in curves.items()
    ]
    print(
        f"{hardware_info('cpu')}\n{args.preset} model, block_size {cfg.block_size}, greedy decode to "
        f"{8 + args.new_tokens} tokens"
    )
    print(markdown_table(rows, floatfmt=".1f"))
    if args.no_plot:
        return {"curves": curves, "rows": rows}
    line_plot(
        {name: ([n for n, _ in pts], [b / 1024 for _, b in pts]) for name, pts in curves.items()},
        assets_dir(__file__) / "sliding_window_cache_memory.png",
        title="KV cache memory while generating (fp32, tiny model)",
        xlabel="tokens (prompt + generated)",
        ylabel="KiB",
    )
    return {"curves": curves, "rows": rows}


if __name__ == "__main__":
    main()
