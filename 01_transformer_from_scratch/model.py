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
from ch01.functional import apply_rope, rmsnorm, rope_cache, scaled_dot_product_attention

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
    # Attention variants (taught in chapter 04; the defaults are plain multi-head attention with RoPE):
    qk_norm: bool = False  # RMSNorm on q and k per head before RoPE (OLMo 2, Qwen3, Gemma 3)
    sliding_window: int | None = None  # a query sees the last N positions (Mistral); decoding uses a rolling cache
    attn_sinks: int = 0  # with sliding_window: the first N positions stay visible forever (StreamingLLM)
    mla_kv_rank: int | None = None  # multi-head latent attention (DeepSeek-V2): the cache holds a latent of this size
    mla_rope_dim: int = 16  # MLA's decoupled RoPE query/key size per head
    rope_scaling: str = "none"  # "none" | "linear" | "ntk" | "yarn": stretch RoPE past the trained context
    rope_factor: float = 1.0  # the context-extension factor s of rope_scaling
    rope_original_block: int | None = None  # the context trained at (None: block_size / rope_factor)
    # Token mixer per layer, tiled over n_layer: "A" attention, "D" Gated DeltaNet (chapter 05), e.g. "DDDA" = 3:1 hybrid
    layer_pattern: str | None = None

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
        self._check_attention_variants()
        if self.layer_pattern is not None:
            known = {"A"} | set(LAZY_MIXERS) | set(MIXERS)
            bad = set(self.layer_pattern) - known
            if not self.layer_pattern or bad or self.n_layer % len(self.layer_pattern):
                raise ValueError(
                    f"layer_pattern={self.layer_pattern!r} must use letters {sorted(known)} and its "
                    f"length must divide n_layer={self.n_layer}"
                )

    def _check_attention_variants(self) -> None:
        """Incompatible attention switches fail here, when the config is made, not deep inside a forward."""
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 (or None for full attention), got {self.sliding_window}")
        if self.attn_sinks < 0 or (self.attn_sinks and self.sliding_window is None):
            raise ValueError(f"attn_sinks={self.attn_sinks} needs a sliding_window and must be >= 0")
        if self.sliding_window is not None and self.attn_impl.startswith("window"):
            raise ValueError(f"sliding_window and attn_impl={self.attn_impl!r} are both windows: choose one")
        if self.sliding_window is not None and set(self.layer_pattern or "A") != {"A"}:
            raise ValueError(
                "sliding_window with layer_pattern mixers is not supported: the mixers take no window mask"
            )
        if self.rope_scaling not in ("none", "linear", "ntk", "yarn"):
            raise ValueError(f"rope_scaling={self.rope_scaling!r}; choose one of none, linear, ntk, yarn")
        if self.rope_factor < 1.0:
            raise ValueError(f"rope_factor must be >= 1 (the context-extension factor), got {self.rope_factor}")
        needs_rope = [n for n, on in (("rope_scaling", self.rope_scaling != "none"), ("MLA", self.mla_kv_rank)) if on]
        if needs_rope and self.pos_emb != "rope":
            raise ValueError(f"{', '.join(needs_rope)} need pos_emb='rope', got pos_emb={self.pos_emb!r}")
        if self.mla_kv_rank is None:
            return
        if self.mla_kv_rank < 1 or self.mla_rope_dim < 2 or self.mla_rope_dim % 2:
            raise ValueError(
                f"MLA needs mla_kv_rank >= 1 and an even mla_rope_dim >= 2, got {self.mla_kv_rank}, {self.mla_rope_dim}"
            )
        if self.n_kv_head != self.n_head:
            raise ValueError("MLA replaces grouped-query attention: leave n_kv_head unset (= n_head)")
        if self.qk_norm:
            raise ValueError("qk_norm applies to MHA/GQA; MLA normalises its latent instead (kv_norm)")
        if self.attn_impl not in ("sdpa", "naive"):
            raise ValueError(
                f"MLA's query/key heads ({self.head_dim + self.mla_rope_dim}) and value heads "
                f"({self.head_dim}) differ in size: attn_impl={self.attn_impl!r} cannot take them, "
                "use 'sdpa' or 'naive'"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def attention_variants(self) -> list[str]:
        """The non-default attention switches in use: engines that re-implement attention (ch06 GGUF, ch07 fused
        decoder, MLX) refuse them by name instead of computing something else."""
        on = {
            "qk_norm": self.qk_norm,
            "sliding_window": self.sliding_window is not None,
            "mla_kv_rank": self.mla_kv_rank is not None,
            "rope_scaling": self.rope_scaling != "none",
            "layer_pattern": self.layer_pattern is not None and set(self.layer_pattern) != {"A"},  # ch05 mixers
        }
        return [name for name, used in on.items() if used]

    def layer_kind(self, layer_idx: int) -> str:
        """The mixer letter of layer ``layer_idx`` ("A" = attention): ``layer_pattern`` tiled over the layers."""
        return "A" if self.layer_pattern is None else self.layer_pattern[layer_idx % len(self.layer_pattern)]

    @property
    def original_block(self) -> int:
        """The context length RoPE was trained at (what rope_scaling stretches from)."""
        return self.rope_original_block or max(1, round(self.block_size / self.rope_factor))

    @property
    def rope_dim(self) -> int:
        """Size of the rotated part of each query/key head: MLA rotates only its decoupled part."""
        return self.mla_rope_dim if self.mla_kv_rank else self.head_dim

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


# Token mixers that replace attention in a layer (``GPTConfig.layer_pattern`` letters): classes with Attention's
# ``forward(x, rope_cs, cache, positions, mask)``, keeping any recurrent state in the cache (``get_state/set_state``).
MIXERS: dict[str, type] = {}
LAZY_MIXERS: dict[str, str] = {"D": "ch05.gated_deltanet"}  # owned by later chapters, imported on first use


def register_mixer(letter: str):
    """Decorator: make a token-mixer class selectable as the letter ``letter`` of ``GPTConfig.layer_pattern``."""

    def deco(cls: type) -> type:
        MIXERS[letter] = cls
        return cls

    return deco


def get_mixer(letter: str) -> type:
    if letter not in MIXERS and letter in LAZY_MIXERS:
        importlib.import_module(LAZY_MIXERS[letter])  # registers it
    if letter not in MIXERS:
        raise ValueError(
            f"unknown layer_pattern letter {letter!r}; known: {sorted({'A'} | set(MIXERS) | set(LAZY_MIXERS))}"
        )
    return MIXERS[letter]


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


def window_mask(pos, T: int, cache, end: int, extra, window: int, sinks: int = 0) -> AttentionMask:
    """Sliding-window attention (``GPTConfig.sliding_window``); ``pos``: (B, T) with a cache, else (T,) or (B, T).
    Key position k is visible to a query at position p iff
    p - window < k <= p, or k < sinks (StreamingLLM's attention sinks). Without a cache positions are token order (as
    for causal attention); with one, a cache that keeps only some keys (ch04's rolling cache) says which positions it
    returns via ``key_positions(positions)`` (-1 = empty slot); any other cache returns index j = position j."""
    if cache is None:
        if extra is None and T <= window:  # the band is the whole causal triangle: kernels take the flag
            return AttentionMask(causal=T > 1, mask=None)
        q_pos = k_pos = torch.arange(T, device=pos.device)  # (T,)
    else:
        q_pos = pos  # (B, T)
        k_pos = cache.key_positions(pos) if hasattr(cache, "key_positions") else torch.arange(end, device=pos.device)
    qp, kp = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)  # (B|, T, 1), (B|, 1, S)
    band = (kp <= qp) & (kp >= 0) & ((qp - kp < window) | (kp < sinks))  # (T, S) or (B, T, S)
    band = band[None, None] if band.dim() == 2 else band[:, None]  # (B|1, 1, T, S)
    if extra is not None:
        band = band & (extra if extra.dim() == 4 else extra[:, None])
    return AttentionMask(False, band)


def rope_frequencies(cfg: GPTConfig, device=None) -> tuple[torch.Tensor | None, float]:
    """(inv_freq (rope_dim/2,), attention factor) of ``cfg.rope_scaling`` (chapter 04); (None, 1.0) = plain RoPE."""
    if cfg.rope_scaling == "none":
        return None, 1.0
    scaling = importlib.import_module("ch04.rope_scaling")
    return scaling.scaled_inv_freq(
        cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor, cfg.original_block, device=device
    )


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
        if cfg.qk_norm:  # bounds every q·k logit by the norms' gains, whatever the weights grow to (Qwen3's names)
            self.q_norm, self.k_norm = RMSNorm(hd, cfg.norm_eps), RMSNorm(hd, cfg.norm_eps)

    def forward(self, x, rope_cs, cache, positions, mask):
        """mask: an ``AttentionMask`` built once per forward by ``GPT.forward`` (causal flag or boolean mask)."""
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.wq(x).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)  # per head, over D
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
            return self.w2(F.silu(self.w1(x)) * self.w3(x))  # torch's fused SiLU: 1 kernel, not functional.silu's 2
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


def make_attention(cfg: GPTConfig, layer_idx: int) -> nn.Module:
    """MHA/GQA, or chapter 04's multi-head latent attention (``mla_kv_rank``), imported on first use; a layer whose
    ``layer_pattern`` letter is not "A" gets that registered token mixer instead (it keeps the ``attn`` slot)."""
    if cfg.layer_kind(layer_idx) != "A":
        return get_mixer(cfg.layer_kind(layer_idx))(cfg, layer_idx)
    if cfg.mla_kv_rank:
        return importlib.import_module("ch04.mla").MLAttention(cfg, layer_idx)
    return Attention(cfg, layer_idx)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = make_attention(cfg, layer_idx)
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
        unbounded = cfg.sliding_window is not None and cfg.pos_emb == "rope"  # keys never lie > window back
        if end > cfg.block_size and not unbounded:
            raise ValueError(f"position {end - 1} is beyond block_size={cfg.block_size} (sequence of {end} tokens)")
        x = self.tok_emb(idx)  # (B, T, C)
        rope_cs = None
        if cfg.pos_emb == "learned":
            x = x + self.pos_emb(pos)
        else:
            inv_freq, factor = rope_frequencies(cfg, idx.device)
            cos, sin = rope_cache(cfg.rope_dim, pos.reshape(-1), cfg.rope_theta, inv_freq, factor)  # 2 × (T | B·T, D)
            rope_cs = (cos, sin) if pos.dim() == 1 else (cos.view(B, 1, T, -1), sin.view(B, 1, T, -1))
        x = self.drop(x)
        cache_pos = pos.expand(B, T) if cache is not None else None  # the protocol always sees (B, T)
        if cfg.sliding_window is None:
            mask = attention_mask(pos, T, end if cache is not None else None, attn_mask)
        else:
            q_pos = cache_pos if cache is not None else pos
            mask = window_mask(q_pos, T, cache, end, attn_mask, cfg.sliding_window, cfg.attn_sinks)
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
