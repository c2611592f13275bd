"""The mini-GPT every chapter uses: a Llama-style decoder (pre-norm RMSNorm, RoPE, SwiGLU, no biases, optional GQA
and weight tying), plus a GPT-2-style variant (learned positions, LayerNorm, GELU) behind config switches for ablations.

    from ch01.model import GPT, GPTConfig
    model = GPT(GPTConfig.preset("tiny", vocab_size=65))
    logits = model(idx)                                   # (B, T, vocab)

Attention is pluggable: ``register_attention(name)`` adds an implementation with the signature
``fn(q, k, v, *, causal, attn_mask, dropout_p) -> out`` (q, k, v: (B, H, T, D); ``attn_mask`` boolean, True = attend);
``GPTConfig.attn_impl`` picks one; names owned by later chapters (``flash_triton``, ``window256``, ...) are imported on
first use. ``forward(idx, positions=..., cache=..., attn_mask=...)`` is the seam every later chapter extends: per-row
positions (ragged batches, servers), any cache with ``update(layer, k, v, positions)`` (cache.py), extra masks.
``generate.py`` holds the one decoding loop; ``train.py`` the one training loop.
Module names map one-to-one onto Hugging Face ``LlamaForCausalLM`` (see hf_interop.py).
References: Vaswani 2017; Radford 2019 (GPT-2); Touvron 2023 (Llama); Su 2021 (RoPE); Shazeer 2020; Ainslie 2023 (GQA).
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ch01.cache import Cache
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
        for name, allowed in (
            ("pos_emb", ("rope", "learned")),
            ("norm", ("rmsnorm", "layernorm")),
            ("mlp", ("swiglu", "gelu")),
        ):
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


# Implementations owned by later chapters, imported on first use so that a config naming one loads in any process
# (ch01 imports nothing later at import time). "window<N>" is ch04's sliding window of N tokens.
LAZY_ATTENTION: dict[str, str] = {
    "flash_triton": "ch04.flash_triton",
    "flash_pytorch": "ch04.flash_pytorch",
    "window": "ch04.sparse_attention",
    "sdpa_export": "ch08.export_onnx",
}


def get_attention(name: str) -> AttentionFn:
    if name not in ATTENTION_IMPLS:
        module = LAZY_ATTENTION.get(name.rstrip("0123456789"))
        if module is not None:
            mod = importlib.import_module(module)  # registering is a side effect of importing it
            if name not in ATTENTION_IMPLS and hasattr(mod, "register_lazy"):
                mod.register_lazy(name)
    if name not in ATTENTION_IMPLS:
        known = sorted(set(ATTENTION_IMPLS) | {k for k in LAZY_ATTENTION if k != "window"} | {"window<N>"})
        raise ValueError(f"unknown attention implementation {name!r}; known: {', '.join(known)}")
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


# ------------------------------------------------------------------------------------------------- attention masks
@dataclass
class AttentionMask:
    causal: bool  # plain causal attention over T == S keys: kernels take a flag, no mask tensor
    mask: torch.Tensor | None  # boolean (B|1, 1, T, S), True = attend


def attention_mask(pos: torch.Tensor, T: int, cache_end: int | None, extra: torch.Tensor | None) -> AttentionMask:
    """What each query may see. Without a cache: causal over the T tokens of ``idx`` (positions only feed RoPE, so
    packed documents whose positions restart still attend causally by order; separate them with ``extra``).
    With a cache (keys 0 … cache_end-1, index = position): key j is visible to a query at position p iff j <= p."""
    device = pos.device
    if cache_end is None:
        if extra is None:
            return AttentionMask(causal=T > 1, mask=None)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        return AttentionMask(False, causal & (extra if extra.dim() == 4 else extra[:, None]))
    if extra is None and pos.dim() == 1 and (T == 1 or cache_end == T):  # one new token, or a prefill from 0
        return AttentionMask(causal=T > 1, mask=None)
    visible = torch.arange(cache_end, device=device) <= pos[..., None]  # (T, S) or (B, T, S)
    visible = visible[None, None] if visible.dim() == 2 else visible[:, None]  # (B|1, 1, T, S)
    if extra is not None:
        visible = visible & (extra if extra.dim() == 4 else extra[:, None])
    return AttentionMask(False, visible)


# ------------------------------------------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rmsnorm(x, self.weight, self.eps)


def make_norm(cfg: GPTConfig) -> nn.Module:
    return (
        RMSNorm(cfg.n_embd, cfg.norm_eps)
        if cfg.norm == "rmsnorm"
        else nn.LayerNorm(cfg.n_embd, cfg.norm_eps, bias=False)
    )


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * hd, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=False)
        self.wo = nn.Linear(cfg.n_head * hd, cfg.n_embd, bias=False)

    def forward(self, x, rope_cs, cache, positions, mask):
        """mask: an ``AttentionMask`` built once per forward by ``GPT.forward`` (causal flag or boolean mask)."""
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.wq(x).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if rope_cs is not None:
            q, k = apply_rope(q, *rope_cs), apply_rope(k, *rope_cs)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, positions)  # (B, Hkv, S, D): index j = position j
        if cfg.n_kv_head != cfg.n_head:  # GQA: each kv head serves n_head / n_kv_head query heads
            rep = cfg.n_head // cfg.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, D)
        dropout_p = cfg.dropout if self.training else 0.0
        attend = get_attention(cfg.attn_impl)
        y = attend(q, k, v, causal=mask.causal, attn_mask=mask.mask, dropout_p=dropout_p)  # (B, H, T, D)
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

    def forward(self, x, rope_cs, cache, positions, mask):
        x = x + self.drop(self.attn(self.attn_norm(x), rope_cs, cache, positions, mask))
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

    def forward(
        self,
        idx: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: Cache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """idx (B, T) int -> logits (B, T, vocab).

        positions: (B, T) position of every token (default: 0 … T-1, or continuing a cache from ``cache.length``).
            Rows may differ — a ragged batch where each row sits at its own position needs no padding tricks.
        cache: anything with ``update(layer, k, v, positions)`` (see ch01/cache.py). With a cache, key index j is
            position j, so a query at position p attends to keys 0 … p of its own row.
        attn_mask: optional boolean (B, T, S) or (B, 1, T, S), True = may attend, ANDed with causality (S = T without
            a cache). Every query must keep at least one visible key (e.g. itself).
        """
        B, T = idx.shape
        cfg = self.config
        start = getattr(cache, "length", 0) if cache is not None else 0
        if positions is None:
            pos = torch.arange(start, start + T, device=idx.device)  # (T,): the same for every row
            end = start + T
        else:
            if positions.shape != idx.shape:
                raise ValueError(
                    f"positions must have the shape of idx {tuple(idx.shape)}, got {tuple(positions.shape)}"
                )
            pos = positions.to(idx.device)  # (B, T)
            end = int(pos.max()) + 1
        if end > cfg.block_size:
            raise ValueError(f"position {end - 1} is beyond block_size={cfg.block_size} (sequence of {end} tokens)")
        x = self.tok_emb(idx)  # (B, T, C)
        rope_cs = None
        if cfg.pos_emb == "learned":
            x = x + self.pos_emb(pos)
        else:
            cos, sin = rope_cache(cfg.head_dim, pos.reshape(-1), cfg.rope_theta)  # 2 × (T | B·T, D)
            rope_cs = (cos, sin) if pos.dim() == 1 else (cos.view(B, 1, T, -1), sin.view(B, 1, T, -1))
        x = self.drop(x)
        mask = attention_mask(pos, T, end if cache is not None else None, attn_mask)
        cache_pos = pos.expand(B, T) if cache is not None else None  # the protocol always sees (B, T)
        for block in self.blocks:
            x = block(x, rope_cs, cache, cache_pos, mask)
        return self.lm_head(self.norm(x))  # (B, T, vocab)

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

    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(B, T0) prompt -> (B, T0 + max_new_tokens) ids; temperature 0 = greedy. ``ch01.generate`` is the full API
        (ragged batches, stop ids, streaming, custom samplers)."""
        from ch01.generate import generate

        new = generate(
            self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        return torch.cat([idx, torch.tensor(new, dtype=torch.long, device=idx.device).view(len(new), -1)], dim=1)

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
