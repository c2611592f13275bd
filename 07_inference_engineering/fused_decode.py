"""What an inference engine does to a training model: the same weights, repacked for decoding with fewer, bigger ops.

    from ch07.fused_decode import FusedDecoder
    fast = FusedDecoder(model)                               # model: a ch01 GPT (RoPE / RMSNorm / SwiGLU)
    logits = fast(idx, kv_cache=cache, start_pos=pos)        # same call and same logits as model(...)
    new_ids = generate(model, prompt, 200, fused=True)       # ch07.kv_cache.generate uses it

Why: on a CPU a decode step of a small model is not limited by FLOPs or by reading the weights but by the NUMBER of
operator calls — each one costs microseconds of Python, autograd-free dispatch and memory allocation, whatever its size.
ch01's readable forward spends ~50 calls per layer (separate q/k/v projections, RoPE as chunk/neg/cat/mul/add, RMSNorm as
six elementwise ops, float casts, GQA repeats). gpt-fast and every serving engine fuse them away:

- one QKV projection (``cat([wq, wk, wv])``) and one gate+up projection (``cat([w1, w3])``) instead of 3 + 2 matmuls;
- RoPE precomputed once as a rotation MATRIX per position (rotating pairs (i, i+D/2) is linear), so q and k of all
  heads are rotated by one batched matmul instead of ~12 elementwise ops;
- RMSNorm's gain folded into the next weight matrix ((x̂ ⊙ g) @ W == x̂ @ (diag(g) W)); activations kept 2-D
  (B·T, C) so each projection is one ``mm`` and each residual add rides along in ``torch.addmm``;
- ``F.silu``, SDPA with ``enable_gqa`` (no repeated K/V), the KV cache written in place with no reallocation
  (``StaticKVCache``), and an additive causal mask for the multi-token verify forward of speculative decoding;
- weights stored transposed, (in, out) contiguous, and applied as ``x @ W``: for one-token decoding (a matrix-VECTOR
  product) that layout streams each weight row once in order, and on this project's CPU it measured 1.5–6× faster per
  projection than ``F.linear``'s (out, in) layout once the weights no longer fit in L2 — see the chapter README;
- no ``nn.Module.__call__`` per layer (plain tensors in a list), and only the last position's logits when asked.
- for ONE sequence and up to 16 new tokens with a cache — every decode step, every speculative verify forward — a
  lean path whose matmuls, RoPE + cache write + attention and SwiGLU run in ``ch07.decode_kernels`` (C, compiled on
  first use; the same path in torch without a compiler): MKL's GEMM spends 2-3x the time of one row on 5 rows, and a
  tiny op costs microseconds of dispatch whatever its size.

The result is numerically the ch01 model (float32 logits equal within ~1e-5; tests compare them and greedy tokens).
``bench_decode.py`` measures the difference. References: gpt-fast (PyTorch team, 2023); Pope et al. 2022.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ch01.functional import rope_cache
from ch01.model import GPT
from ch07 import decode_kernels
from ch07.decode_kernels import PackedWeight


def _in_out(weight: torch.Tensor) -> torch.Tensor:
    """nn.Linear's (out, in) weight as a contiguous (in, out) matrix, so ``x @ W`` equals ``F.linear(x, weight)``."""
    return weight.detach().t().contiguous()


def rope_matrices(head_dim: int, n_pos: int, theta: float) -> torch.Tensor:
    """(n_pos, D, D) matrices R_p with x @ R_p == ch01's apply_rope(x) at position p (rotate-half layout)."""
    cos, sin = rope_cache(head_dim, torch.arange(n_pos), theta)  # 2 × (P, D)
    h = head_dim // 2
    i = torch.arange(h)
    R = torch.zeros(n_pos, head_dim, head_dim)
    R[:, i, i] = cos[:, :h]  # out[i]   = x[i]·cos_i − x[i+h]·sin_i
    R[:, i + h, i] = -sin[:, :h]
    R[:, i + h, i + h] = cos[:, h:]  # out[i+h] = x[i+h]·cos_i + x[i]·sin_i
    R[:, i, i + h] = sin[:, h:]
    return R


class FusedDecoder:
    """A read-only, inference-only view of a ch01 ``GPT`` with fused weights. Weights are copied at construction:
    build it again after changing the model's parameters."""

    def __init__(self, model: GPT, kernels: bool = True):
        cfg = model.config
        if (cfg.pos_emb, cfg.norm, cfg.mlp) != ("rope", "rmsnorm", "swiglu"):
            raise ValueError(
                "FusedDecoder supports the Llama-style ch01 model (pos_emb='rope', norm='rmsnorm', "
                f"mlp='swiglu'); got {cfg.pos_emb}/{cfg.norm}/{cfg.mlp}: use the model itself"
            )
        self.config = cfg
        p = next(model.parameters())

        def folded(norm_weight, *linears):  # (x̂ ⊙ g) @ W == x̂ @ (diag(g) W): the norm's gain scales W's rows
            return packed(_in_out(torch.cat([lin.weight for lin in linears])) * norm_weight.detach()[:, None])

        def folded_qkv(b):  # also fold attention's 1/sqrt(D) into q's columns (RoPE is linear, so it commutes)
            w = _in_out(torch.cat([b.attn.wq.weight, b.attn.wk.weight, b.attn.wv.weight]))
            w[:, : cfg.n_head * cfg.head_dim] *= cfg.head_dim**-0.5
            return packed(w * b.attn_norm.weight.detach()[:, None])

        def packed(w):  # few-row products (decode steps, verify forwards) go to ch07.decode_kernels' matmul
            return PackedWeight(w, use_kernel=kernels)

        rope_tables = rope_cache(cfg.head_dim, torch.arange(cfg.block_size), cfg.rope_theta)  # for the C kernel
        with torch.no_grad():
            self.layers = [
                dict(
                    wqkv=folded_qkv(b),  # C × (Hq+2Hkv)D, q pre-scaled by 1/sqrt(D)
                    wo=packed(_in_out(b.attn.wo.weight)),  # HD × C
                    w13=folded(b.mlp_norm.weight, b.mlp.w1, b.mlp.w3),  # C × 2F
                    w2=packed(_in_out(b.mlp.w2.weight)),  # F × C
                )
                for b in model.blocks
            ]
            self.tok_emb = model.tok_emb.weight.detach()
            self.lm_head = folded(model.norm.weight, model.lm_head)  # C × V
            self.rope = rope_matrices(cfg.head_dim, cfg.block_size, cfg.rope_theta).to(p.device, p.dtype)
            self.rope_cos, self.rope_sin = (t.to(p.device, p.dtype).contiguous() for t in rope_tables)
        self.kernels = kernels and decode_kernels.load_library() is not None

    def parameters(self):  # so ``next(decoder.parameters())`` finds device/dtype like for a model
        yield self.tok_emb

    @torch.no_grad()
    def __call__(
        self,
        idx: torch.Tensor,
        kv_cache=None,
        start_pos: int = 0,
        key_padding_mask: torch.Tensor | None = None,
        last: int | None = None,
    ) -> torch.Tensor:
        """Same contract as ``GPT.forward`` (logits (B, T, V)); ``last=n`` computes logits for the last n positions only.

        ``kv_cache`` must be a ``ch07.kv_cache.StaticKVCache`` (or None: attention over ``idx`` alone)."""
        cfg = self.config
        B, T = idx.shape
        S = start_pos + T
        if S > cfg.block_size:
            raise ValueError(f"sequence of {S} tokens exceeds block_size={cfg.block_size}")
        if B == 1 and T <= 16 and kv_cache is not None and key_padding_mask is None:
            return self._few_tokens(idx, kv_cache, start_pos, last)
        H, Hkv, D, eps = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.norm_eps
        if key_padding_mask is None and start_pos > 0 and T > 1:  # verifying drafts: causal, offset by start_pos
            mask = torch.full((T, S), float("-inf"), device=idx.device).triu_(start_pos + 1)  # additive (T, S)
        else:
            mask = GPT._attention_mask(T, start_pos, key_padding_mask, idx.device)  # None | (B|1, 1, T, S) bool
        causal = mask is None and T > 1
        rot = self.rope[start_pos:S]  # (T, D, D)
        gqa = Hkv != H
        x = self.tok_emb.index_select(0, idx.reshape(-1))  # (B·T, C): 2-D all the way, so every matmul is one mm
        for i, w in enumerate(self.layers):
            qkv = w["wqkv"](x, rms_eps=eps).view(B, T, H + 2 * Hkv, D)  # norm (gain folded in) + QKV
            qk = qkv[:, :, : H + Hkv] @ rot  # RoPE on q and k of all heads: (B, T, Hq+Hkv, D) @ (T, D, D)
            q, k, v = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), qkv[:, :, H + Hkv :].transpose(1, 2)
            if kv_cache is not None:  # written in place, as StaticKVCache.update does
                ck, cv = kv_cache.k[i], kv_cache.v[i]  # (Bmax, Hkv, L, D)
                if ck.shape[0] != B:
                    ck, cv = ck[:B], cv[:B]
                ck.narrow(2, start_pos, T).copy_(k)
                cv.narrow(2, start_pos, T).copy_(v)
                k, v = ck.narrow(2, 0, S), cv.narrow(2, 0, S)  # (B, Hkv, S, D)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=1.0, enable_gqa=gqa)
            x = w["wo"](y.transpose(1, 2).reshape(B * T, H * D), residual=x)  # x + attn: (B·T, C)
            gate, up = w["w13"](x, rms_eps=eps).chunk(2, -1)  # (B·T, F) each
            x = w["w2"](F.silu(gate).mul_(up), residual=x)  # x + mlp
        if kv_cache is not None:
            kv_cache.length = S
        if last is not None:
            x, T = x.view(B, T, -1)[:, -last:].reshape(-1, x.shape[-1]), min(last, T)
        return self.lm_head(x, rms_eps=eps).view(B, T, -1)  # (B, T|last, V)

    def _few_tokens(self, idx: torch.Tensor, cache, pos: int, last: int | None) -> torch.Tensor:
        """A few new tokens of ONE sequence: the decode step (T = 1) and the verify forward of speculative decoding
        (T = k+1), the hot loops of decoding. Same math as ``__call__`` in fewer calls: the projections, attention
        (RoPE + cache write + causal GQA attention in one call) and SwiGLU run in ``ch07.decode_kernels``' C code, or
        in ``_attend_torch`` and torch where the kernels are unavailable."""
        cfg = self.config
        H, Hkv, eps = cfg.n_head, cfg.n_kv_head, cfg.norm_eps
        T = idx.shape[1]
        x = self.tok_emb.index_select(0, idx.view(T))  # (T, C)
        for i, w in enumerate(self.layers):
            qkv = w["wqkv"](x, rms_eps=eps)  # (T, (H+2Hkv)·D), q pre-scaled by 1/sqrt(D)
            y = None
            if self.kernels:  # None where the cache is not float32 on the CPU
                y = decode_kernels.attend(qkv, cache.k[i], cache.v[i], self.rope_cos, self.rope_sin, pos, H, Hkv)
            if y is None:
                y = self._attend_torch(qkv, cache, i, pos)
            x = w["wo"](y, residual=x)  # (T, C)
            x = w["w2"](decode_kernels.swiglu(w["w13"](x, rms_eps=eps)), residual=x)
        cache.length = pos + T
        if last is not None and last < T:
            x, T = x[-last:], last
        return self.lm_head(x, rms_eps=eps).view(1, T, -1)

    def _attend_torch(self, qkv: torch.Tensor, cache, i: int, pos: int) -> torch.Tensor:
        """``decode_kernels.attend`` in torch: two small batched matmuls instead of SDPA's general kernel (which cost
        ~260 us per call at T = 5 here); the G query heads sharing a KV head are the rows of its matmul (no repeat)."""
        cfg = self.config
        H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        T, G = qkv.shape[0], H // Hkv
        S = pos + T
        qkv = qkv.view(T, H + 2 * Hkv, D)
        qk = torch.bmm(qkv[:, : H + Hkv], self.rope[pos:S])  # RoPE: (T, H+Hkv, D) @ (T, D, D)
        ck, cv = cache.k[i][0], cache.v[i][0]  # (Hkv, L, D)
        ck.narrow(1, pos, T).copy_(qk.narrow(1, H, Hkv).transpose(0, 1))
        cv.narrow(1, pos, T).copy_(qkv.narrow(1, H + Hkv, Hkv).transpose(0, 1))
        q = qk[:, :H].reshape(T, Hkv, G, D).permute(1, 2, 0, 3).reshape(Hkv, G * T, D)  # rows: (head in group, t)
        scores = torch.bmm(q, ck.narrow(1, 0, S).transpose(1, 2))  # (Hkv, G·T, S)
        if T > 1:  # causal among the new tokens
            mask = torch.full((T, S), float("-inf")).triu_(pos + 1)
            scores = scores.view(Hkv, G, T, S).add_(mask).view(Hkv, G * T, S)
        y = torch.bmm(torch.softmax(scores, -1), cv.narrow(1, 0, S))  # (Hkv, G·T, D)
        return y.view(Hkv, G, T, D).permute(2, 0, 1, 3).reshape(T, H * D)  # heads back in order


def main(argv=None):
    """Greedy tokens/s of one model three ways — ch01's forward, FusedDecoder in torch, FusedDecoder with the C
    decode kernels — and whether all three give the same tokens."""
    import time

    from ch01.model import GPTConfig
    from ch07.kv_cache import generate
    from common.cli import base_parser

    p = base_parser("ch01's model vs FusedDecoder (torch path, C decode kernels): greedy tokens/s, same tokens")
    p.add_argument("--preset", default="small", help="ch01 GPTConfig preset (random weights)")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig.preset(args.preset, vocab_size=65, block_size=16 + args.new_tokens)).eval()
    prompt = torch.randint(0, 65, (16,))
    engines = {"ch01 GPT": model, "FusedDecoder, torch": FusedDecoder(model, kernels=False)}
    engines["FusedDecoder, C kernels"] = FusedDecoder(model)
    results = {}
    for name, engine in engines.items():
        generate(engine, prompt, 8)  # warm-up (and the kernels' first build)
        t0 = time.perf_counter()
        out = generate(engine, prompt, args.new_tokens)
        results[name] = (args.new_tokens / (time.perf_counter() - t0), out)
    base = results["ch01 GPT"][1]
    for name, (tps, out) in results.items():
        print(f"{name:24s} {tps:7.0f} tokens/s  same tokens as ch01: {torch.equal(out, base)}")
    return {name: (tps, torch.equal(out, base)) for name, (tps, out) in results.items()}


if __name__ == "__main__":
    main()
