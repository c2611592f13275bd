"""Multi-head latent attention (MLA, DeepSeek-V2): cache one small latent per token instead of every head's keys and
values, and fold the up-projections into the query and output at decode time.

What it shows: MHA caches 2·H·D numbers per token per layer, GQA 2·H_kv·D. MLA compresses each token's input to a latent
c = RMSNorm(x W_dkv) of size r (``mla_kv_rank``) and rebuilds every head's keys and values from it (k_h = c W_uk_h,
v_h = c W_uv_h). RoPE would break that (a rotation between q and W_uk cannot be folded away), so position goes through a
small *decoupled* part: each query head gets ``mla_rope_dim`` extra rotated dims, and one shared rotated key of that size
is cached beside the latent. The cache holds r + d_rope numbers per token per layer.

Two forms of the same function (a test checks they agree, and that cached decoding equals the full forward):
- naive (training, prefill without a cache): up-project the latent to per-head k, v and run ordinary attention;
- absorbed (decoding from the cache): q_h·k_h = (q_h W_uk_hᵀ)·c, so queries move into latent space, attention runs
  over the cached latents directly (one shared "key/value head" like MQA), and W_uv_h is applied after attention.

The ch01 model uses this module when ``GPTConfig.mla_kv_rank`` is set (ch01 imports it on first use). The KV cache
protocol stays ``update(layer, k, v, positions)``: MLA passes its latent as "k" and its rotated shared key as "v".

Run:  python 04_efficient_attention/mla.py              (KV bytes/token table + a short training run, about a minute)
      python 04_efficient_attention/mla.py --train-iters 0
Reference: DeepSeek-AI 2024, "DeepSeek-V2" §2.1 (multi-head latent attention); Shazeer 2019 (MQA); Ainslie 2023 (GQA).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ch01.functional import apply_rope
from ch01.model import GPT, GPTConfig, RMSNorm, get_attention
from common.bench import hardware_info, markdown_table
from common.cli import base_parser
from common.device import pick_device
from common.seed import seed_everything


class MLAttention(nn.Module):
    """DeepSeek-V2's attention without query compression (as V2-Lite). Names follow DeepSeek's: wq = q_proj,
    wkv_a = kv_a_proj_with_mqa, kv_norm = kv_a_layernorm, wkv_b = kv_b_proj, wo = o_proj."""

    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        H, dn, dr, r = cfg.n_head, cfg.head_dim, cfg.mla_rope_dim, cfg.mla_kv_rank
        self.wq = nn.Linear(cfg.n_embd, H * (dn + dr), bias=False)  # per head: content part + rotated part
        self.wkv_a = nn.Linear(cfg.n_embd, r + dr, bias=False)  # the latent c and the one shared rotated key
        self.kv_norm = RMSNorm(r, cfg.norm_eps)
        self.wkv_b = nn.Linear(r, H * (dn + dn), bias=False)  # latent -> every head's content key and value
        self.wo = nn.Linear(H * dn, cfg.n_embd, bias=False)
        self.form = "auto"  # "auto": absorbed with a cache, naive without; "naive" / "absorbed" force one (tests)

    def forward(self, x, rope_cs, cache, positions, mask):
        B, T, _ = x.shape
        cfg = self.cfg
        H, dn, dr, r = cfg.n_head, cfg.head_dim, cfg.mla_rope_dim, cfg.mla_kv_rank
        q = self.wq(x).view(B, T, H, dn + dr).transpose(1, 2)  # (B, H, T, dn + dr)
        q_nope, q_rope = q.split([dn, dr], dim=-1)  # (B, H, T, dn), (B, H, T, dr)
        c, k_rope = self.wkv_a(x).split([r, dr], dim=-1)  # (B, T, r), (B, T, dr)
        c, k_rope = self.kv_norm(c)[:, None], k_rope[:, None]  # (B, 1, T, r), (B, 1, T, dr)
        q_rope, k_rope = apply_rope(q_rope, *rope_cs), apply_rope(k_rope, *rope_cs)
        if cache is not None:
            c, k_rope = cache.update(self.layer_idx, c, k_rope, positions)  # (B, 1, S, r), (B, 1, S, dr)
        absorbed = self.form == "absorbed" or (self.form == "auto" and cache is not None)
        attend = self._absorbed if absorbed else self._naive
        y = attend(q_nope, q_rope, c, k_rope, mask)  # (B, H, T, dn)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * dn))  # (B, T, C)

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_uk, W_uv: (H, dn, r) each — wkv_b's rows, head by head."""
        H, dn = self.cfg.n_head, self.cfg.head_dim
        w = self.wkv_b.weight.view(H, 2 * dn, -1)  # (H, 2·dn, r)
        return w[:, :dn], w[:, dn:]

    def _attend(self, q, k, v, mask):
        dropout_p = self.cfg.dropout if self.training else 0.0
        return get_attention(self.cfg.attn_impl)(q, k, v, causal=mask.causal, attn_mask=mask.mask, dropout_p=dropout_p)

    def _naive(self, q_nope, q_rope, c, k_rope, mask):
        """Rebuild every head's keys and values from the latents, then ordinary attention over dn + dr dims."""
        B, H, _, dn = q_nope.shape
        S = c.shape[2]
        kv = self.wkv_b(c[:, 0]).view(B, S, H, 2 * dn).transpose(1, 2)  # (B, H, S, 2·dn)
        k_nope, v = kv.split([dn, dn], dim=-1)  # (B, H, S, dn) each
        k = torch.cat([k_nope, k_rope.expand(-1, H, -1, -1)], dim=-1)  # (B, H, S, dn + dr)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, dn + dr)
        return self._attend(q, k, v, mask)  # (B, H, T, dn)

    def _absorbed(self, q_nope, q_rope, c, k_rope, mask):
        """Attention in latent space: q_nope·(c W_ukᵀ) = (q_nope W_uk)·c, and W_uv after the weighted sum of c."""
        B, H, _, dn = q_nope.shape
        dr, r = q_rope.shape[-1], c.shape[-1]
        w_uk, w_uv = self._up_weights()  # (H, dn, r) each
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # (B, H, T, r)
        # the kernel scales by 1/sqrt(r + dr); the model's logits are scaled by 1/sqrt(dn + dr)
        q = torch.cat([q_lat, q_rope], dim=-1) * math.sqrt((r + dr) / (dn + dr))  # (B, H, T, r + dr)
        k = torch.cat([c, k_rope], dim=-1).expand(-1, H, -1, -1)  # (B, H, S, r + dr): one shared head, no copy
        y_lat = self._attend(q, k, c.expand(-1, H, -1, -1), mask)  # (B, H, T, r)
        return torch.einsum("bhtr,hdr->bhtd", y_lat, w_uv)  # (B, H, T, dn)


def kv_numbers_per_token(cfg: GPTConfig) -> int:
    """Numbers one token adds to the KV cache of one layer."""
    if cfg.mla_kv_rank:
        return cfg.mla_kv_rank + cfg.mla_rope_dim
    return 2 * cfg.n_kv_head * cfg.head_dim


def variants(preset: str, vocab_size: int) -> dict[str, GPTConfig]:
    base = GPTConfig.preset(preset, vocab_size=vocab_size)
    H, D = base.n_head, base.head_dim
    return {
        f"MHA ({H} kv heads)": base,
        f"GQA ({H // 2} kv heads)": GPTConfig.preset(preset, vocab_size=vocab_size, n_kv_head=H // 2),
        "MQA (1 kv head)": GPTConfig.preset(preset, vocab_size=vocab_size, n_kv_head=1),
        f"MLA r={2 * D}, rope {D // 2}": GPTConfig.preset(
            preset, vocab_size=vocab_size, mla_kv_rank=2 * D, mla_rope_dim=D // 2
        ),
        f"MLA r={D}, rope {D // 2}": GPTConfig.preset(
            preset, vocab_size=vocab_size, mla_kv_rank=D, mla_rope_dim=D // 2
        ),
    }


def measured_cache_bytes(model: GPT, n_tokens: int) -> float:
    """Bytes per token per layer of a ch01 KVCache after a prefill of ``n_tokens`` (what decoding really holds)."""
    from ch01.cache import KVCache

    cache = KVCache(model.config.n_layer, max_len=n_tokens)
    with torch.no_grad():
        model(torch.zeros(1, n_tokens, dtype=torch.long), cache=cache)
    return cache.nbytes / n_tokens / model.config.n_layer


def _train_val_loss(cfg: GPTConfig, iters: int, seed: int, data, device: str) -> float:
    from ch01.evaluate import evaluate_loss
    from ch01.train import TrainConfig, train

    tc = TrainConfig(
        max_iters=iters,
        batch_size=12,
        warmup_iters=max(1, iters // 10),
        eval_iters=0,
        seed=seed,
        device=device,
        progress=False,
        out_dir=None,
    )
    res = train(cfg, tc, *data)
    return evaluate_loss(res["model"], data[1], max_batches=10)


def main(argv=None) -> dict:
    p = base_parser(__doc__, device=True, seed=True)
    p.add_argument("--preset", default="small", help="ch01 GPTConfig preset")
    p.add_argument("--train-iters", type=int, default=100, help="training iterations per variant (0 = skip)")
    args = p.parse_args(argv)
    seed_everything(args.seed)
    device = str(pick_device(args.device))
    data = None
    if args.train_iters > 0:
        from ch01.train import prepare_data

        tok, train_ids, val_ids = prepare_data("char")
        data, vocab = (train_ids, val_ids), tok.vocab_size
    else:
        vocab = 65
    rows = []
    for name, cfg in variants(args.preset, vocab).items():
        model = GPT(cfg).eval()
        n = kv_numbers_per_token(cfg)
        row = {
            "attention": name,
            "params": model.num_params(),
            "KV numbers/token/layer": n,
            "KV bytes/token (fp16, all layers)": 2 * n * cfg.n_layer,
            "vs MHA": 2 * cfg.n_head * cfg.head_dim / n,
            "measured fp32 bytes/token/layer": measured_cache_bytes(model, 32),
        }
        if data is not None:
            row["val loss"] = _train_val_loss(cfg, args.train_iters, args.seed, data, device)
        rows.append(row)
        print(f"{name}: {n} numbers/token/layer", flush=True)
    print(f"\n{hardware_info(device)}\npreset {args.preset!r}, train iters {args.train_iters} (char tiny-shakespeare)")
    print(markdown_table(rows, floatfmt=".4g", formats={"val loss": ".3f", "vs MHA": ".2f"}))
    return {"rows": rows}


if __name__ == "__main__":
    main()
