"""The mini-GPT every chapter uses: a Llama-style decoder (pre-norm RMSNorm, RoPE, SwiGLU, no biases, optional GQA
and weight tying), plus a GPT-2-style variant (learned positions, LayerNorm, GELU) behind config switches for ablations.

    from ch01.model import GPT, GPTConfig
    model = GPT(GPTConfig.preset("tiny", vocab_size=65))
    logits = model(idx)                                   # (B, T, vocab)

Attention is pluggable: ``register_attention(name)`` adds an implementation with the signature
``fn(q, k, v, *, causal, attn_mask, dropout_p) -> out`` (q, k, v: (B, H, T, D); ``attn_mask`` boolean, True = attend);
``GPTConfig.attn_impl`` picks one. ``forward(idx, kv_cache=..., start_pos=...)`` lets chapter 07 decode with a cache.
Module names map one-to-one onto Hugging Face ``LlamaForCausalLM`` (see hf_interop.py).
References: Vaswani 2017; Radford 2019 (GPT-2); Touvron 2023 (Llama); Su 2021 (RoPE); Shazeer 2020; Ainslie 2023 (GQA).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ch01.functional import apply_rope, rmsnorm, rope_cache, scaled_dot_product_attention, silu

PRESETS: dict[str, dict] = {
    "tiny": dict(block_size=64, n_layer=2, n_head=4, n_embd=64),  # tests: well under 1 s a step on CPU
    "small": dict(block_size=64, n_layer=4, n_head=4, n_embd=128),  # nanoGPT's CPU "baby GPT" budget
    "medium": dict(block_size=256, n_layer=6, n_head=6, n_embd=384),  # nanoGPT shakespeare-char (GPU minutes)
    "gpt2-small": dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),  # GPU
}


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 64  # maximum context length
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # < n_head: grouped-query attention; None: = n_head
    n_embd: int = 128
    ffn_hidden: int | None = None  # None: 8/3·C rounded up to multiple_of (SwiGLU) or 4·C (GELU)
    multiple_of: int = 32
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_weights: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    attn_impl: str = "sdpa"
    pos_emb: str = "rope"  # "rope" | "learned"
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    mlp: str = "swiglu"  # "swiglu" | "gelu"

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        for name, allowed in (("pos_emb", ("rope", "learned")), ("norm", ("rmsnorm", "layernorm")),
                              ("mlp", ("swiglu", "gelu"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {allowed}")
        if self.ffn_hidden is None:
            if self.mlp == "swiglu":  # 2/3 of 4C keeps the parameter count of a 4C GELU MLP
                hidden = int(8 * self.n_embd / 3)
                self.ffn_hidden = self.multiple_of * math.ceil(hidden / self.multiple_of)
            else:
                self.ffn_hidden = 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig fields: {sorted(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------- attention plug point
AttentionFn = Callable[..., torch.Tensor]
ATTENTION_IMPLS: dict[str, AttentionFn] = {}


def register_attention(name: str):
    """Decorator: make ``fn(q, k, v, *, causal, attn_mask, dropout_p)`` selectable as ``GPTConfig.attn_impl=name``."""

    def deco(fn: AttentionFn) -> AttentionFn:
        ATTENTION_IMPLS[name] = fn
        return fn

    return deco


def get_attention(name: str) -> AttentionFn:
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {name!r}; registered: {', '.join(ATTENTION_IMPLS)} "
                         "(chapter 04 registers flash_triton / flash_pytorch when imported)")
    return ATTENTION_IMPLS[name]


@register_attention("naive")
def naive_attention(q, k, v, *, causal: bool, attn_mask=None, dropout_p: float = 0.0):
    """Written out: materialises the (T, T) score matrix — the memory cost chapter 04 removes."""
    if causal:
        Tq, Tk = q.shape[-2], k.shape[-2]
        attn_mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    out = scaled_dot_product_attention(q, k, v, attn_mask)  # (B, H, Tq, D)
    return F.dropout(out, dropout_p) if dropout_p else out


@register_attention("sdpa")
def sdpa_attention(q, k, v, *, causal: bool, attn_mask=None, dropout_p: float = 0.0):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, dropout_p=dropout_p)


# ----------------------------------------------------------------------------------------------------------- KV cache
class DynamicKVCache:
    """The simplest KV cache: per layer, keys/values concatenated as they come. Chapter 07 adds a preallocated one.

    Any cache works with the model if it has ``update(layer, k, v, start_pos) -> (k_all, v_all)`` returning the keys and
    values for positions ``[0, start_pos + T)``.
    """

    def __init__(self, n_layer: int):
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start_pos: int):
        if self.k[layer] is None:
            if start_pos != 0:
                raise ValueError(f"empty cache but start_pos={start_pos}")
            self.k[layer], self.v[layer] = k, v
        else:
            if start_pos != self.k[layer].shape[-2]:  # drop rolled-back positions
                self.k[layer] = self.k[layer][..., :start_pos, :]
                self.v[layer] = self.v[layer][..., :start_pos, :]
            self.k[layer] = torch.cat([self.k[layer], k], dim=-2)  # (B, Hkv, S, D)
            self.v[layer] = torch.cat([self.v[layer], v], dim=-2)
        return self.k[layer], self.v[layer]

    @property
    def seq_len(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[-2]


# ------------------------------------------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rmsnorm(x, self.weight, self.eps)


def make_norm(cfg: GPTConfig) -> nn.Module:
    return RMSNorm(cfg.n_embd, cfg.norm_eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.n_embd, cfg.norm_eps,
                                                                                          bias=False)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * hd, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=False)
        self.wo = nn.Linear(cfg.n_head * hd, cfg.n_embd, bias=False)

    def forward(self, x, rope_cs, kv_cache, start_pos, attn_mask):
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.wq(x).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if rope_cs is not None:
            q, k = apply_rope(q, *rope_cs), apply_rope(k, *rope_cs)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v, start_pos)  # (B, Hkv, S, D), S = start_pos + T
        if cfg.n_kv_head != cfg.n_head:  # GQA: each kv head serves n_head / n_kv_head query heads
            rep = cfg.n_head // cfg.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, D)
        causal = attn_mask is None and k.shape[-2] == T
        dropout_p = cfg.dropout if self.training else 0.0
        y = get_attention(cfg.attn_impl)(q, k, v, causal=causal, attn_mask=attn_mask, dropout_p=dropout_p)
        return self.wo(y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.w1 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)  # gate (HF gate_proj) / GELU up
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)  # down (HF down_proj)
        if cfg.mlp == "swiglu":
            self.w3 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)  # up (HF up_proj)

    def forward(self, x):
        if self.kind == "swiglu":
            return self.w2(silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope_cs=None, kv_cache=None, start_pos=0, attn_mask=None):
        x = x + self.drop(self.attn(self.attn_norm(x), rope_cs, kv_cache, start_pos, attn_mask))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


# -------------------------------------------------------------------------------------------------------------- model
class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos_emb == "learned":
            self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2·n_layer)
            if name.endswith(("attn.wo.weight", "mlp.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def forward(self, idx: torch.Tensor, kv_cache=None, start_pos: int = 0,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) int -> logits (B, T, vocab).

        kv_cache/start_pos: positions of ``idx`` are start_pos … start_pos+T-1 and earlier keys come from the cache.
        key_padding_mask: (B, S) bool over all S = start_pos+T key positions, False = padding (never attended).
        """
        B, T = idx.shape
        cfg = self.config
        if start_pos + T > cfg.block_size:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds block_size={cfg.block_size}")
        positions = torch.arange(start_pos, start_pos + T, device=idx.device)  # (T,)
        x = self.tok_emb(idx)  # (B, T, C)
        rope_cs = None
        if cfg.pos_emb == "learned":
            x = x + self.pos_emb(positions)
        else:
            rope_cs = rope_cache(cfg.head_dim, positions, cfg.rope_theta)  # 2 × (T, D)
        x = self.drop(x)
        attn_mask = self._attention_mask(T, start_pos, key_padding_mask, idx.device)
        for block in self.blocks:
            x = block(x, rope_cs, kv_cache, start_pos, attn_mask)
        return self.lm_head(self.norm(x))  # (B, T, vocab)

    @staticmethod
    def _attention_mask(T, start_pos, key_padding_mask, device):
        """None when plain causal attention suffices; else a boolean (B|1, 1, T, S) mask, True = attend."""
        S = start_pos + T
        if key_padding_mask is None and (start_pos == 0 or T == 1):
            return None
        q_pos = torch.arange(start_pos, S, device=device)[:, None]  # (T, 1)
        mask = (torch.arange(S, device=device)[None, :] <= q_pos)[None, None]  # (1, 1, T, S)
        if key_padding_mask is not None:
            if key_padding_mask.shape[-1] != S:
                raise ValueError(f"key_padding_mask covers {key_padding_mask.shape[-1]} positions, expected {S}")
            mask = mask & key_padding_mask[:, None, None, :].bool()  # (B, 1, T, S)
            # a padded query row with no visible key would give NaN; let it see itself (its output is ignored)
            mask = mask | torch.eye(S, device=device, dtype=torch.bool)[start_pos:][None, None]
        return mask

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        logits = self(idx)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() already counts tied weights once
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.config.pos_emb == "learned":
                n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6·N (forward + backward matmuls) + 12·L·C·T attention (Kaplan 2020, PaLM)."""
        cfg, T = self.config, seq_len or self.config.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * T

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Plain sampling without a cache (chapter 07 makes this fast); temperature 0 = greedy."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:])[:, -1, :].float()  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(filter_logits(logits / temperature, top_k, top_p).softmax(-1), 1,
                                        generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx

    # --------------------------------------------------------------------------------------------- save / load
    def save(self, directory: str | Path) -> Path:
        """``model.safetensors`` + ``config.json`` (atomic writes; loading never unpickles)."""
        from safetensors.torch import save_model

        from common.checkpoint import atomic_write

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / "model.safetensors", lambda tmp: save_model(self, tmp))
        text = json.dumps(self.config.to_dict(), indent=2)
        atomic_write(directory / "config.json", lambda tmp: Path(tmp).write_text(text))
        return directory

    @classmethod
    def load(cls, directory: str | Path, map_location: str = "cpu") -> GPT:
        from safetensors.torch import load_model

        directory = Path(directory)
        if not (directory / "config.json").exists():
            raise FileNotFoundError(f"{directory} has no config.json (expected a directory written by GPT.save)")
        model = cls(GPTConfig.from_dict(json.loads((directory / "config.json").read_text())))
        load_model(model, str(directory / "model.safetensors"), device=map_location)
        return model


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Keep the top-k logits and/or the smallest set whose probability mass reaches top_p; the rest -> -inf."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # drop tokens once the mass before them reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits
