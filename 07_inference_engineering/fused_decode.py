"""What an inference engine does to a training model: the same weights, repacked for decoding with fewer, bigger ops.

    from ch07.fused_decode import FusedDecoder
    fast = FusedDecoder(model)                               # model: a ch01 GPT (RoPE / RMSNorm / SwiGLU)
    logits = fast(idx, positions=pos, cache=cache)           # GPT.forward's contract and logits: a drop-in model
    new_ids = ch01.generate.generate(fast, prompts, 200)     # so ch01's decoding loop (and ch07's wrappers) run it

Why: on a CPU a decode step of a small model is not limited by FLOPs or by reading the weights but by the NUMBER of
operator calls — each one costs microseconds of Python, autograd-free dispatch and memory allocation, whatever its size.
ch01's readable forward spends ~50 calls per layer (separate q/k/v projections, RoPE as chunk/neg/cat/mul/add, RMSNorm as
six elementwise ops, float casts, GQA repeats). gpt-fast and every serving engine fuse them away:

- one QKV projection (``cat([wq, wk, wv])``) and one gate+up projection (``cat([w1, w3])``) instead of 3 + 2 matmuls;
- RoPE precomputed once as a rotation MATRIX per position (rotating pairs (i, i+D/2) is linear), so q and k of all
  heads are rotated by one batched matmul instead of ~12 elementwise ops;
- RMSNorm's gain folded into the next weight matrix ((x̂ ⊙ g) @ W == x̂ @ (diag(g) W)); activations kept 2-D
  (B·T, C) so each projection is one ``mm`` and each residual add rides along in ``torch.addmm``;
- ``F.silu``, SDPA with ``enable_gqa`` (no repeated K/V), and any cache of ch01's protocol (``update``; ch01's
  ``KVCache`` writes in place, ch07's paged cache into its block pool) with ch01's own attention mask;
- weights stored transposed, (in, out) contiguous, and applied as ``x @ W``: for one-token decoding (a matrix-VECTOR
  product) that layout streams each weight row once in order, and on this project's CPU it measured 1.5–6× faster per
  projection than ``F.linear``'s (out, in) layout once the weights no longer fit in L2 — see the chapter README;
- no ``nn.Module.__call__`` per layer (plain tensors in a list), and only the last position's logits when asked.
- for ONE sequence and up to 16 new tokens with a ch01 ``KVCache`` — every decode step, every speculative verify
  forward — a lean path writing straight into the cache's buffers, whose matmuls, RoPE + cache write + attention and
  SwiGLU run in ``ch07.decode_kernels`` (C, compiled on first use; the same path in torch without a compiler): MKL's
  GEMM spends 2-3x the time of one row on 5 rows, and a tiny op costs microseconds of dispatch whatever its size.

- ``FusedDecoder(model, quant="q8_0" | "q4_0" | "q4_1")`` or ``FusedDecoder.from_gguf(path)`` keeps the matrices in
  llama.cpp's block formats instead (``ch07.quantized``): 3.8-7x fewer bytes per token, same call contract.

Positions work as in ``GPT.forward`` (per row, continuing ``cache.length`` by default), so ragged batches and the paged
cache need nothing special. The result is numerically the ch01 model (float32 logits equal within ~1e-5; tests compare
them and greedy tokens).
``bench_decode.py`` measures the difference; this script's ``main`` compares ch01, the torch path and the C kernels on
one model (``--model smollm2-135m-instruct``: a real LLM, with llama.cpp on its GGUF file as a reference row).
References: gpt-fast (PyTorch team, 2023); Pope et al. 2022.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ch01.cache import KVCache
from ch01.functional import rope_cache
from ch01.model import GPT, GPTConfig, attention_mask
from ch07 import decode_kernels
from ch07.decode_kernels import PackedWeight
from common.bench import hardware_info, markdown_table


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

    def __init__(self, model: GPT, kernels: bool = True, quant: str | None = None, q8_input: bool = True):
        """``quant``: None keeps float32 weights (norm gains folded in); "q8_0", "q4_0" or "q4_1" quantizes every
        matrix whose input size is a multiple of 32 into llama.cpp's blocks (``ch07.quantized``; chapter 06's
        quantizers), run by the quantized kernels, which round their inputs to Q8_0 like llama.cpp unless
        ``q8_input=False``. ``FusedDecoder.from_gguf`` takes a GGUF file's blocks as stored."""
        cfg = model.config
        if (cfg.pos_emb, cfg.norm, cfg.mlp) != ("rope", "rmsnorm", "swiglu"):
            raise ValueError(
                "FusedDecoder supports the Llama-style ch01 model (pos_emb='rope', norm='rmsnorm', "
                f"mlp='swiglu'); got {cfg.pos_emb}/{cfg.norm}/{cfg.mlp}: use the model itself"
            )
        if cfg.attention_variants():
            raise ValueError(
                f"FusedDecoder implements plain multi-head attention; this model sets "
                f"{', '.join(cfg.attention_variants())}: use the model itself"
            )
        self.config = cfg
        p = next(model.parameters())
        if quant is not None:  # the gains cannot be folded into quantized weights: they scale the kernels' inputs
            from ch07.quantized import QUANTIZERS, decoder_weights

            if quant not in QUANTIZERS:
                raise ValueError(f"quant={quant!r}; choose None or one of {', '.join(QUANTIZERS)}")
            sd = model.state_dict()  # tied weights appear under both names
            with torch.no_grad():
                layers, lm_head = decoder_weights(cfg, sd.__getitem__, sd.__getitem__, quant, kernels, q8_input)
            self._setup(cfg, layers, lm_head, model.tok_emb.weight.detach(), p.device, p.dtype, kernels)
            return

        def folded(norm_weight, *linears):  # (x̂ ⊙ g) @ W == x̂ @ (diag(g) W): the norm's gain scales W's rows
            return packed(_in_out(torch.cat([lin.weight for lin in linears])) * norm_weight.detach()[:, None])

        def folded_qkv(b):  # also fold attention's 1/sqrt(D) into q's columns (RoPE is linear, so it commutes)
            w = _in_out(torch.cat([b.attn.wq.weight, b.attn.wk.weight, b.attn.wv.weight]))
            w[:, : cfg.n_head * cfg.head_dim] *= cfg.head_dim**-0.5
            return packed(w * b.attn_norm.weight.detach()[:, None])

        def packed(w):  # few-row products (decode steps, verify forwards) go to ch07.decode_kernels' matmul
            return PackedWeight(w, use_kernel=kernels)

        with torch.no_grad():
            layers = [
                dict(
                    wqkv=folded_qkv(b),  # C × (Hq+2Hkv)D, q pre-scaled by 1/sqrt(D)
                    wo=packed(_in_out(b.attn.wo.weight)),  # HD × C
                    w13=folded(b.mlp_norm.weight, b.mlp.w1, b.mlp.w3),  # C × 2F
                    w2=packed(_in_out(b.mlp.w2.weight)),  # F × C
                )
                for b in model.blocks
            ]
            lm_head = folded(model.norm.weight, model.lm_head)  # C × V
        self._setup(cfg, layers, lm_head, model.tok_emb.weight.detach(), p.device, p.dtype, kernels)

    def _setup(self, cfg, layers, lm_head, tok_emb, device, dtype, kernels: bool) -> None:
        """The state every constructor ends with: weights (``PackedWeight`` / ``QuantWeight``), the embedding table
        (a tensor, or a ``QuantWeight`` whose rows are dequantized on lookup) and the RoPE tables."""
        self.config, self.layers, self.lm_head, self.tok_emb = cfg, layers, lm_head, tok_emb
        rope_tables = rope_cache(cfg.head_dim, torch.arange(cfg.block_size), cfg.rope_theta)  # for the C kernel
        self.rope = rope_matrices(cfg.head_dim, cfg.block_size, cfg.rope_theta).to(device, dtype)
        self.rope_cos, self.rope_sin = (t.to(device, dtype).contiguous() for t in rope_tables)
        self._kv_like = self.rope_cos.new_empty(1, cfg.n_kv_head, 0, cfg.head_dim)  # how fast-path caches are made
        self.kernels = kernels and decode_kernels.load_library() is not None

    @classmethod
    def from_gguf(cls, path, kernels: bool = True, q8_input: bool = True) -> FusedDecoder:
        """A decoder straight from a ``llama`` GGUF file: Q8_0 / Q4_0 / Q4_1 tensors go into the quantized kernels as
        stored (never dequantized to float32), F32 / F16 ones become float matrices. Its tokenizer is ``.tokenizer``
        (None for a vocabulary ch01 does not read)."""
        from ch07.quantized import gguf_weights

        cfg, layers, lm_head, emb, tok = gguf_weights(path, kernels, q8_input)
        self = cls.__new__(cls)
        self._setup(cfg, layers, lm_head, emb, torch.device("cpu"), torch.float32, kernels)
        self.tokenizer = tok
        return self

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads (each matrix once, as stored: blocks or float32)."""
        from ch07.quantized import weight_bytes

        return weight_bytes(self.layers, self.lm_head)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, C)
        return self.tok_emb.rows(ids) if hasattr(self.tok_emb, "rows") else self.tok_emb.index_select(0, ids)

    def parameters(self):  # so ``next(decoder.parameters())`` finds device/dtype like for a model
        yield self.rope_cos

    @torch.no_grad()
    def __call__(
        self,
        idx: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache=None,
        attn_mask: torch.Tensor | None = None,
        last: int | None = None,
    ) -> torch.Tensor:
        """``GPT.forward``'s contract (logits (B, T, V); ``positions`` default to continuing ``cache.length``; any cache
        of ch01's protocol); ``last=n`` computes logits for the last n positions only."""
        cfg = self.config
        B, T = idx.shape
        if self.kernels:
            decode_kernels.set_threads()  # the C kernels follow torch.set_num_threads
        start = getattr(cache, "length", 0) if cache is not None else 0
        if positions is None and B == 1 and T <= 16 and isinstance(cache, KVCache) and attn_mask is None:
            return self._few_tokens(idx, cache, start, last)
        if positions is None:
            pos, end = torch.arange(start, start + T, device=idx.device), start + T  # (T,)
        else:
            pos = positions.to(idx.device)  # (B, T)
            end = int(pos.max()) + 1
        if end > cfg.block_size:
            raise ValueError(f"position {end - 1} is beyond block_size={cfg.block_size}")
        H, Hkv, D, eps = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.norm_eps
        mask = attention_mask(pos, T, end if cache is not None else None, attn_mask)  # ch01's visibility rule
        cache_pos = pos.expand(B, T) if cache is not None else None
        rot = self.rope[start:end] if positions is None else self.rope[pos]  # (T, D, D) or (B, T, D, D)
        x = self._embed(idx.reshape(-1))  # (B·T, C): 2-D all the way, so every matmul is one mm
        for i, w in enumerate(self.layers):
            qkv = w["wqkv"](x, rms_eps=eps).view(B, T, H + 2 * Hkv, D)  # norm (gain folded in) + QKV
            qk = qkv[:, :, : H + Hkv] @ rot  # RoPE on q and k of all heads: (B, T, Hq+Hkv, D) @ ([B,] T, D, D)
            q, k, v = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), qkv[:, :, H + Hkv :].transpose(1, 2)
            if cache is not None:
                k, v = cache.update(i, k, v, cache_pos)  # (B, Hkv, S, D): index j = position j
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask.mask, is_causal=mask.causal, scale=1.0, enable_gqa=Hkv != H
            )  # (B, H, T, D)
            x = w["wo"](y.transpose(1, 2).reshape(B * T, H * D), residual=x)  # x + attn: (B·T, C)
            gate, up = w["w13"](x, rms_eps=eps).chunk(2, -1)  # (B·T, F) each
            x = w["w2"](F.silu(gate).mul_(up), residual=x)  # x + mlp
        if last is not None:
            x, T = x.view(B, T, -1)[:, -last:].reshape(-1, x.shape[-1]), min(last, T)
        return self.lm_head(x, rms_eps=eps).view(B, T, -1)  # (B, T|last, V)

    def _few_tokens(self, idx: torch.Tensor, cache: KVCache, pos: int, last: int | None) -> torch.Tensor:
        """A few new tokens of ONE sequence at positions pos … pos+T-1 of a ch01 ``KVCache``: the decode step (T = 1)
        and the verify forward of speculative decoding (T = k+1), the hot loops of decoding. Same math as
        ``__call__`` in fewer calls: the projections, attention (RoPE + cache write + causal GQA attention in one call)
        and SwiGLU run in ``ch07.decode_kernels``' C code, or in ``_attend_torch`` and torch where the kernels are
        unavailable. The keys/values go straight into the cache's buffers, so it sets ``cache.length`` itself."""
        cfg = self.config
        H, Hkv, eps = cfg.n_head, cfg.n_kv_head, cfg.norm_eps
        T = idx.shape[1]
        if pos + T > cfg.block_size:
            raise ValueError(f"position {pos + T - 1} is beyond block_size={cfg.block_size}")
        x = self._embed(idx.view(T))  # (T, C)
        for i, w in enumerate(self.layers):
            ck, cv = cache.buffers(i, self._kv_like, pos + T)  # (1, Hkv, capacity, D)
            qkv = w["wqkv"](x, rms_eps=eps)  # (T, (H+2Hkv)·D), q pre-scaled by 1/sqrt(D)
            y = None
            if self.kernels:  # None where the cache is not float32 on the CPU
                y = decode_kernels.attend(qkv, ck, cv, self.rope_cos, self.rope_sin, pos, H, Hkv)
            if y is None:
                y = self._attend_torch(qkv, ck[0], cv[0], pos)
            x = w["wo"](y, residual=x)  # (T, C)
            x = w["w2"](decode_kernels.swiglu(w["w13"](x, rms_eps=eps)), residual=x)
        cache.length = pos + T
        if last is not None and last < T:
            x, T = x[-last:], last
        return self.lm_head(x, rms_eps=eps).view(1, T, -1)

    def _attend_torch(self, qkv: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, pos: int) -> torch.Tensor:
        """``decode_kernels.attend`` in torch: two small batched matmuls instead of SDPA's general kernel (which cost
        ~260 us per call at T = 5 here); the G query heads sharing a KV head are the rows of its matmul (no repeat).
        ck / cv: one sequence's cache buffers (Hkv, capacity, D)."""
        cfg = self.config
        H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        T, G = qkv.shape[0], H // Hkv
        S = pos + T
        qkv = qkv.view(T, H + 2 * Hkv, D)
        qk = torch.bmm(qkv[:, : H + Hkv], self.rope[pos:S])  # RoPE: (T, H+Hkv, D) @ (T, D, D)
        ck.narrow(1, pos, T).copy_(qk.narrow(1, H, Hkv).transpose(0, 1))
        cv.narrow(1, pos, T).copy_(qkv.narrow(1, H + Hkv, Hkv).transpose(0, 1))
        q = qk[:, :H].reshape(T, Hkv, G, D).permute(1, 2, 0, 3).reshape(Hkv, G * T, D)  # rows: (head in group, t)
        scores = torch.bmm(q, ck.narrow(1, 0, S).transpose(1, 2))  # (Hkv, G·T, S)
        if T > 1:  # causal among the new tokens
            mask = torch.full((T, S), float("-inf")).triu_(pos + 1)
            scores = scores.view(Hkv, G, T, S).add_(mask).view(Hkv, G * T, S)
        y = torch.bmm(torch.softmax(scores, -1), cv.narrow(1, 0, S))  # (Hkv, G·T, D)
        return y.view(Hkv, G, T, D).permute(2, 0, 1, 3).reshape(T, H * D)  # heads back in order


CHAT_QUESTION = "Explain in a few sentences why generating text with a language model is slow on a CPU."


def _model_and_prompt(args, loaded=None):
    """(model, tokenizer or None, prompt ids, GGUF file for a llama.cpp row or None): the random ``--preset`` model with a random prompt,
    or ``--model`` (anything ``ch01.pretrained.load_pretrained`` takes; ``loaded``: its (model, tokenizer), already
    loaded) with a chat prompt through the model's own template."""
    if args.model is None:
        model = GPT(GPTConfig.preset(args.preset, vocab_size=65, block_size=16 + args.new_tokens)).eval()
        return model, None, torch.randint(0, 65, (16,)).tolist(), None
    from ch01.chat_template import apply_chat_template
    from ch01.pretrained import MODEL_NAMES, load_pretrained

    model, tok = loaded or load_pretrained(args.model)
    prompt = apply_chat_template(tok, [{"role": "user", "content": CHAT_QUESTION}])
    gguf = MODEL_NAMES[args.model]() if args.model in MODEL_NAMES else Path(args.model)
    return model.eval(), tok, prompt, gguf if gguf is not None and gguf.suffix == ".gguf" else None


def weight_bytes_per_token(model: GPT) -> int:
    """Bytes of weights one decode step reads: every parameter except the embedding table (one row is looked up),
    which a tied model reads whole as its output layer."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied table counts once
    emb = model.tok_emb.weight
    return total if model.config.tie_weights else total - emb.numel() * emb.element_size()


def _decoders(model, prompt, max_new, gguf, threads, quants=()):
    """name -> (n -> n greedy new token ids, weight bytes read per token); ``max_new``: the most n asked for;
    ``quants``: extra rows quantized to those block formats (``FusedDecoder(model, quant=q)``)."""
    from ch01.generate import generate

    per_token = weight_bytes_per_token(model)
    engines = {"ch01 GPT": model, "FusedDecoder, torch": FusedDecoder(model, kernels=False)}
    engines["FusedDecoder, C kernels"] = FusedDecoder(model)
    sizes = dict.fromkeys(engines, per_token)
    for q in quants:
        engines[f"FusedDecoder, {q.upper()}"] = fast = FusedDecoder(model, quant=q)
        sizes[f"FusedDecoder, {q.upper()}"] = fast.weight_bytes_per_token()
    runs = {
        name: ((lambda n, e=e: generate(e, prompt, n, temperature=0)[0]), sizes[name]) for name, e in engines.items()
    }
    from ch06.gguf_export import llama_cpp_greedy, load_llama_cpp  # load: None without llama-cpp-python

    n_ctx = len(prompt) + max_new + 16
    llm = load_llama_cpp(gguf, n_ctx, n_threads=threads, f32_kv_cache=False) if gguf is not None else None
    if llm is not None:  # the reference engine on the GGUF file itself (SmolLM2: its Q4_1 blocks, as shipped)
        runs[f"llama.cpp, {gguf.name}"] = (lambda n: llama_cpp_greedy(llm, prompt, n)), gguf.stat().st_size
    return runs


def _timed(runs: dict, n: int, repeats: int) -> tuple[dict, dict, dict]:
    """Median seconds to the first new token (the prompt's prefill + one step) and to all ``n``, per engine, and its
    ``n`` tokens. Round-robin over the engines, so a slow minute of a shared machine hits every engine alike."""
    first, total, outs = {name: [] for name in runs}, {name: [] for name in runs}, {}
    for run, _ in runs.values():
        run(min(8, n))  # warm-up (and the kernels' first build)
    for _ in range(repeats):
        for name, (run, _) in runs.items():
            for n_new, times in ((1, first), (n, total)):
                t0 = time.perf_counter()
                outs[name] = run(n_new)
                times[name].append(time.perf_counter() - t0)
    return (
        {k: statistics.median(v) for k, v in first.items()},
        {k: statistics.median(v) for k, v in total.items()},
        outs,
    )


def main(argv=None, loaded=None):
    """Greedy tokens/s of one model three ways — ch01's forward, FusedDecoder in torch, FusedDecoder with the C
    decode kernels — (+ llama.cpp on a GGUF model's own file) and whether they give ch01's tokens. ``loaded``: the
    ``--model``'s (model, tokenizer), already loaded (tests)."""
    from common.cli import base_parser

    p = base_parser(
        "ch01's model vs FusedDecoder (torch path, C decode kernels): greedy tokens/s, same tokens", seed=True
    )
    p.add_argument("--preset", default="small", help="ch01 GPTConfig preset (random weights)")
    p.add_argument("--model", default=None, help="a pretrained model instead: smollm2-135m-instruct, a GGUF, a HF dir")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine (round-robin); medians reported")
    p.add_argument("--quant", nargs="*", default=[], choices=["q8_0", "q4_0", "q4_1"], help="also quantized rows")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok, prompt, gguf = _model_and_prompt(args, loaded)
    runs = _decoders(model, prompt, args.new_tokens, gguf, args.threads, args.quant)
    first, total, outs = _timed(runs, args.new_tokens, args.repeats)
    base, rows = outs["ch01 GPT"], []
    for name, (_, per_token) in runs.items():
        decode_tps = (args.new_tokens - 1) / max(total[name] - first[name], 1e-9)  # tokens 2..n: the decode steps
        agree = next((i for i, (a, b) in enumerate(zip(outs[name], base)) if a != b), len(base))
        rows.append(
            {
                "engine": name,
                "tokens/s": args.new_tokens / total[name],
                "x ch01": total["ch01 GPT"] / total[name],
                "first token ms": first[name] * 1e3,
                "decode tokens/s": decode_tps,
                "weights GB/s": per_token * decode_tps / 1e9,
                "same tokens as ch01": outs[name] == base,
                "agreeing prefix": f"{agree}/{len(base)}",
            }
        )
    print(hardware_info())  # ends with the calibration: sgemm GFLOP/s and memory read GB/s
    print(
        f"model {args.model or args.preset}: {weight_bytes_per_token(model) / 1e6:.1f} MB of weights read per token; "
        f"prompt {len(prompt)} tokens, {args.new_tokens} new, greedy, medians of {args.repeats}\n"
    )
    print(markdown_table(rows, floatfmt=".2f"))
    if tok is not None:
        print(f"\nch01's greedy reply: {tok.decode(base)!r}")
    return {r["engine"]: (r["tokens/s"], r["same tokens as ch01"]) for r in rows}


if __name__ == "__main__":
    main()
