"""One ablation of the 2024–2026 pieces at nanoGPT's "baby" budget, several seeds, mean ± std.

Every piece is one switch of the same ch01 model or loop: QK-norm (OLMo 2, Qwen3), multi-head latent attention
(DeepSeek-V2; the cache holds a latent), sliding-window attention (Mistral; decoding keeps a rolling cache), Muon for the
hidden matrices (Keller Jordan et al. 2024), a 3 : 1 Gated DeltaNet / attention hybrid (Yang et al. 2024; Qwen3-Next).
Each runs alone on top of the Llama-style baseline, then **the combination of every piece whose mean val loss beat the
baseline's** — chosen by the numbers, not in advance. Columns: final val loss, ms per training step (wall, eager),
parameters, and decode-cache KiB after 1,024 generated tokens (each variant's own cache: ``KVCache``, or chapter 04's
``RollingKVCache`` for the sliding window; DeltaNet layers keep a fixed state).
``--equal-time`` adds a second table: every variant gets the baseline's training seconds (its step count set from its
own measured ms/step, the LR schedule fitted to that count), one seed.

    python 01_transformer_from_scratch/bench_ablation.py                                   # 200 steps, 1 seed (smoke)
    python 01_transformer_from_scratch/bench_ablation.py --max-iters 2000 --seeds 0 1 2 --equal-time   # the README

References: Karpathy, nanoGPT (the baby budget); the papers above; Melis et al. 2018 (report seeds, not one run).
"""

from __future__ import annotations

import statistics

import torch

from ch01.model import GPT, GPTConfig
from ch01.train import TrainConfig, prepare_data, train
from common.bench import hardware_info, markdown_table
from common.cli import base_parser

BASELINE = "baseline (Llama block, AdamW)"
PIECES: dict[str, tuple[dict, dict]] = {  # name -> (GPTConfig overrides, TrainConfig overrides)
    BASELINE: ({}, {}),
    "+ QK-norm": ({"qk_norm": True}, {}),
    "+ MLA (latent 32, rope 16)": ({"mla_kv_rank": 32, "mla_rope_dim": 16}, {}),
    "+ sliding window 32": ({"sliding_window": 32}, {}),
    "+ Muon": ({}, {"optimizer": "muon"}),
    "+ Gated DeltaNet 3:1 (DDDA)": ({"layer_pattern": "DDDA"}, {}),
}


def model_config(overrides: dict, vocab_size: int) -> GPTConfig:
    return GPTConfig.preset("small", vocab_size=vocab_size, **overrides)  # 4 layers, 4 heads, 128 wide, block 64


@torch.no_grad()
def cache_kib(cfg: GPTConfig, n_tokens: int = 1024) -> float:
    """The decode cache's bytes after ``n_tokens`` one-token steps (batch 1), with the cache the variant decodes with."""
    from ch01.cache import KVCache
    from ch04.sliding_window import RollingKVCache

    model = GPT(GPTConfig.from_dict({**cfg.to_dict(), "block_size": n_tokens + 1})).eval()
    if cfg.sliding_window:
        cache = RollingKVCache(cfg.n_layer, cfg.sliding_window, cfg.attn_sinks)
    else:
        cache = KVCache(cfg.n_layer)
    tok = torch.zeros(1, 1, dtype=torch.long)
    for _ in range(n_tokens):
        model(tok, cache=cache)
    return cache.nbytes / 1024


def run(name: str, pieces: dict, seed: int, iters: int, data, args) -> dict:
    (model_over, train_over), (tok, train_ids, val_ids) = pieces[name], data
    tc = TrainConfig(max_iters=iters, eval_interval=iters, eval_iters=args.eval_iters, seed=seed, device=args.device,
                     progress=False, warmup_iters=min(100, iters // 10), out_dir=None, **train_over)  # fmt: skip
    res = train(model_config(model_over, tok.vocab_size), tc, train_ids, val_ids)
    return {"val": res["val"][-1][2], "ms": 1e3 * res["train_time_s"] / iters, "params": res["model"].num_params()}


def combination(pieces: dict, means: dict[str, float]) -> tuple[dict, dict] | None:
    """Every piece whose mean val loss beat the baseline's, merged into one variant (None if no piece did)."""
    winners = [n for n in pieces if n != BASELINE and means[n] < means[BASELINE]]
    if not winners:
        return None
    model_over = {k: v for n in winners for k, v in pieces[n][0].items()}
    train_over = {k: v for n in winners for k, v in pieces[n][1].items()}
    if model_over.get("sliding_window") and model_over.get("layer_pattern"):
        model_over.pop("sliding_window")  # the DeltaNet mixers take no window mask (a config-time error otherwise)
    return model_over, train_over


def mean_std(xs: list[float], fmt: str) -> str:
    return f"{statistics.mean(xs):{fmt}} ± {statistics.stdev(xs):{fmt}}" if len(xs) > 1 else f"{xs[0]:{fmt}}"


def main(argv=None) -> dict:
    p = base_parser(__doc__, device=True)
    p.add_argument("--max-iters", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="*", default=list(PIECES), choices=list(PIECES), help="pieces to run alone")
    p.add_argument("--no-combination", action="store_true", help="skip the combination of the winning pieces")
    p.add_argument("--equal-time", action="store_true", help="also: every variant at the baseline's training seconds")
    p.add_argument("--eval-iters", type=int, default=50, help="val batches of the final val loss (fixed, as nanoGPT)")
    p.add_argument("--cache-tokens", type=int, default=1024, help="generated tokens of the cache measurement")
    args = p.parse_args(argv)
    data = prepare_data("char")
    pieces = {n: PIECES[n] for n in dict.fromkeys([BASELINE, *args.variants])}
    results = {n: [run(n, pieces, s, args.max_iters, data, args) for s in args.seeds] for n in pieces}
    means = {n: statistics.mean(r["val"] for r in rs) for n, rs in results.items()}
    combo = None if args.no_combination else combination(pieces, means)
    if combo:
        name = "combination: " + " ".join(n.split(" ", 1)[1].split(" (")[0] for n in pieces if n != BASELINE
                                          and means[n] < means[BASELINE])  # fmt: skip
        pieces[name] = combo
        results[name] = [run(name, pieces, s, args.max_iters, data, args) for s in args.seeds]
    vocab = data[0].vocab_size
    rows = [{"variant": n, "params": f"{rs[0]['params']:,}", "val loss": mean_std([r["val"] for r in rs], ".4f"),
             "ms/step": mean_std([r["ms"] for r in rs], ".1f"),
             f"cache KiB @ {args.cache_tokens} tokens": f"{cache_kib(model_config(pieces[n][0], vocab), args.cache_tokens):.1f}"}
            for n, rs in results.items()]  # fmt: skip
    print(f"\n{hardware_info()}\nchar tiny-shakespeare, small preset (4 layers, 128 wide, block 64), batch 12, "
          f"{args.max_iters} steps, seeds {args.seeds}; mean ± std over seeds\n")  # fmt: skip
    print(markdown_table(rows))
    out = {"rows": rows, "results": results}
    if args.equal_time:
        budget_s = statistics.mean(r["ms"] for r in results[BASELINE]) * args.max_iters / 1e3
        timed = []
        for n, rs in results.items():
            iters = max(10, round(budget_s * 1e3 / statistics.mean(r["ms"] for r in rs)))
            r = run(n, pieces, args.seeds[0], iters, data, args)
            timed.append({"variant": n, "steps": iters, "val loss": r["val"], "seconds": r["ms"] * iters / 1e3})
        print(f"\nequal wall-clock: {budget_s:.0f} s each (the baseline's), seed {args.seeds[0]}\n")
        print(markdown_table(timed, floatfmt=".4f"))
        out["equal_time"] = timed
    return out


if __name__ == "__main__":
    main()
