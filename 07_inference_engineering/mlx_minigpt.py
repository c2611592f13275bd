"""The chapter-01 mini-GPT in Apple's MLX (``mlx.core`` + ``mlx.nn``): same weights file, same logits, a KV cache.

    from ch07.mlx_minigpt import MLXGPT
    model = MLXGPT.load("path/written/by/GPT.save")     # reads our model.safetensors + config.json directly
    logits = model(mx.array(ids))                       # (B, T, V), equal to torch within 1e-4 in float32
    new_ids = model.generate(ids, max_new_tokens=100)   # greedy/sampled decoding with a per-layer KV cache

MLX is array-framework-with-lazy-evaluation for Apple silicon (unified memory: CPU and GPU share the arrays); it also
ships a CPU build for Linux (``pip install mlx[cpu]``), which is what the tests here run on. Parameter names mirror
``ch01.model.GPT`` one to one (``blocks.0.attn.wq.weight`` ...), so ``load_weights`` takes our safetensors unchanged.
Supported: the Llama-style configuration (RoPE, RMSNorm, SwiGLU, optional GQA and tied weights).

Run ``python 07_inference_engineering/mlx_minigpt.py``: logits parity vs torch, a few AdamW steps, decode speed.
References: MLX (Hannun et al., Apple 2023, github.com/ml-explore/mlx); mlx-examples' llama.py.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ch01.model import GPTConfig


def rope_tables(head_dim: int, positions: mx.array, theta: float):
    """cos/sin (T, D) in the rotate-half layout (pairs i, i + D/2), as ch01.functional.rope_cache."""
    inv_freq = 1.0 / (theta ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim))  # (D/2,)
    freqs = positions.astype(mx.float32)[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = mx.concatenate([freqs, freqs], axis=-1)  # (T, D)
    return mx.cos(emb), mx.sin(emb)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def __call__(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        q = self.wq(x).reshape(B, T, self.n_head, self.head_dim).transpose(0, 2, 1, 3)  # (B, H, T, D)
        k = self.wk(x).reshape(B, T, self.n_kv_head, self.head_dim).transpose(0, 2, 1, 3)  # (B, Hkv, T, D)
        v = self.wv(x).reshape(B, T, self.n_kv_head, self.head_dim).transpose(0, 2, 1, 3)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # arrays are immutable in MLX: the cache is a [k, v] pair replaced by concatenation
            if cache[0] is not None:
                k, v = mx.concatenate([cache[0], k], axis=2), mx.concatenate([cache[1], v], axis=2)  # (B, Hkv, S, D)
            cache[0], cache[1] = k, v
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k, v = mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1)  # (B, H, S, D)
        scores = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(self.head_dim)  # (B, H, T, S)
        if mask is not None:
            scores = scores + mask
        y = mx.softmax(scores, axis=-1) @ v  # (B, H, T, D)
        return self.wo(y.transpose(0, 2, 1, 3).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)  # gate
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)  # down
        self.w3 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)  # up

    def __call__(self, x):
        return self.w2(nn.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def __call__(self, x, cos, sin, mask, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class MLXGPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if (cfg.pos_emb, cfg.norm, cfg.mlp) != ("rope", "rmsnorm", "swiglu"):
            raise ValueError("MLXGPT implements the Llama-style configuration only (rope, rmsnorm, swiglu)")
        if cfg.attention_variants():
            raise ValueError(
                f"MLXGPT implements plain attention; this model sets {', '.join(cfg.attention_variants())}"
            )
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = [Block(cfg) for _ in range(cfg.n_layer)]
        self.norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        if not cfg.tie_weights:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def __call__(self, idx: mx.array, cache: list | None = None, start_pos: int = 0) -> mx.array:
        """idx (B, T) int -> logits (B, T, V); ``cache`` from ``new_cache()`` holds earlier positions."""
        T = idx.shape[1]
        if start_pos + T > self.config.block_size:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds block_size={self.config.block_size}")
        cos, sin = rope_tables(self.config.head_dim, mx.arange(start_pos, start_pos + T), self.config.rope_theta)
        mask = None
        if T > 1:  # additive causal mask with an offset of start_pos cached keys
            allowed = mx.arange(start_pos + T)[None, :] <= mx.arange(start_pos, start_pos + T)[:, None]  # (T, S)
            mask = mx.where(allowed, 0.0, -mx.inf).astype(mx.float32)
        x = self.tok_emb(idx)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, None if cache is None else cache[i])
        x = self.norm(x)
        return self.tok_emb.as_linear(x) if self.config.tie_weights else self.lm_head(x)  # (B, T, V)

    def new_cache(self) -> list:
        return [[None, None] for _ in self.blocks]

    def loss(self, idx: mx.array, targets: mx.array) -> mx.array:
        return nn.losses.cross_entropy(self(idx), targets, reduction="mean")

    def generate(
        self, idx, max_new_tokens: int, temperature: float = 0.0, use_cache: bool = True, seed: int = 0
    ) -> mx.array:
        """Greedy (temperature 0) or sampled decoding; returns only the new tokens (B, n)."""
        idx = mx.array(idx).reshape(1, -1) if not isinstance(idx, mx.array) or idx.ndim == 1 else idx
        key = mx.random.key(seed)
        cache = self.new_cache() if use_cache else None
        seq, out = idx, []
        logits = self(idx, cache, 0)[:, -1, :]
        for i in range(max_new_tokens):
            if temperature == 0:
                nxt = mx.argmax(logits, axis=-1)
            else:
                key, sub = mx.random.split(key)
                nxt = mx.random.categorical(logits / temperature, key=sub)
            out.append(nxt)
            if i + 1 == max_new_tokens:
                break
            seq = mx.concatenate([seq, nxt[:, None]], axis=1)
            logits = (self(nxt[:, None], cache, seq.shape[1] - 1) if use_cache else self(seq))[:, -1, :]
            mx.eval(logits)  # keep the lazy graph one step deep
        return mx.stack(out, axis=1) if out else mx.zeros((idx.shape[0], 0), dtype=mx.int32)

    @classmethod
    def load(cls, directory: str | Path) -> MLXGPT:
        """From a directory written by ``ch01.model.GPT.save`` (model.safetensors + config.json)."""
        directory = Path(directory)
        if not (directory / "config.json").exists():
            raise FileNotFoundError(f"{directory} has no config.json (expected a directory written by GPT.save)")
        model = cls(GPTConfig.from_dict(json.loads((directory / "config.json").read_text())))
        weights = mx.load(str(directory / "model.safetensors"))
        if model.config.tie_weights:  # safetensors stores a shared tensor once, under either name
            head = weights.pop("lm_head.weight", None)
            weights.setdefault("tok_emb.weight", head)
        model.load_weights(list(weights.items()), strict=True)
        mx.eval(model.parameters())
        return model


def main(argv=None):
    import tempfile

    import mlx.optimizers as optim
    import numpy as np
    import torch

    from ch01.model import GPT
    from ch01.pretrained import pretrained_char_model
    from common.bench import markdown_table
    from common.cli import base_parser
    from common.data import get_batch

    p = base_parser("the ch01 mini-GPT in MLX: parity with torch, training steps, cached decoding", seed=True)
    p.add_argument("--new-tokens", type=int, default=48, help="prompt 16 + this must fit block_size 64")
    p.add_argument("--train-steps", type=int, default=20)
    args = p.parse_args(argv)
    torch_model, tok, (train_ids, _) = pretrained_char_model("tiny", max_iters=200)
    with tempfile.TemporaryDirectory() as d:
        model = MLXGPT.load(torch_model.save(d))
    ids = train_ids[:48].view(1, -1)
    with torch.no_grad():
        ref = torch_model(ids).numpy()
    diff = float(np.abs(np.array(model(mx.array(ids.numpy()))) - ref).max())
    prompt = train_ids[:16].view(1, -1)
    t0 = time.perf_counter()
    mlx_ids = np.array(model.generate(mx.array(prompt.numpy()), args.new_tokens))
    mlx_s = time.perf_counter() - t0
    torch_ids = GPT.generate(torch_model, prompt, args.new_tokens, temperature=0)[:, 16:].numpy()
    # training: a fresh copy, AdamW, a few steps on real batches
    cfg = GPTConfig.from_dict(torch_model.config.to_dict())
    fresh = MLXGPT(cfg)
    opt = optim.AdamW(learning_rate=3e-3)
    step = nn.value_and_grad(fresh, lambda m, x, y: m.loss(x, y))
    g = torch.Generator().manual_seed(args.seed)
    losses = []
    for _ in range(args.train_steps):
        x, y = get_batch(train_ids, 8, 32, "cpu", g)
        loss, grads = step(fresh, mx.array(x.numpy()), mx.array(y.numpy()))
        opt.update(fresh, grads)
        mx.eval(fresh.parameters(), opt.state)
        losses.append(loss.item())
    rows = [
        {
            "max |logits diff| vs torch": diff,
            "greedy == torch (tokens)": bool((mlx_ids == torch_ids).all()),
            "MLX cached tokens/s": args.new_tokens / mlx_s,
            "loss first step": losses[0],
            "loss last step": losses[-1],
        }
    ]
    print(markdown_table(rows, floatfmt=".3g"))
    print("sample:", repr(tok.decode(mlx_ids[0].tolist())[:100]))
    return rows[0]


if __name__ == "__main__":
    main()
