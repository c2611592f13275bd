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

import json
import statistics

import torch

from ch01.model import GPTConfig
from ch01.train import TrainConfig, prepare_data, train
from common.bench import hardware_info, markdown_table
from common.cli import base_parser
from common.data import keyed_cache_dir

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


def cache_kib(cfg: GPTConfig, n_tokens: int = 1024) -> float:
    """The decode cache's KiB after ``n_tokens`` one-token steps (batch 1), in the cache the variant decodes with."""
    from ch04.sliding_window import RollingKVCache
    from ch05.hybrid import cache_bytes_by_length

    rolling = RollingKVCache(cfg.n_layer, cfg.sliding_window, cfg.attn_sinks) if cfg.sliding_window else None
    return cache_bytes_by_length(cfg, [n_tokens], cache=rolling)[0] / 1024


def run(name: str, pieces: dict, seed: int, iters: int, data, args) -> dict:
    """One training run; its result is cached on disk by what determines it (a long ablation resumes where it
    stopped, and runs split over several processes share their results)."""
    (model_over, train_over), (tok, train_ids, val_ids) = pieces[name], data
    key = [model_over, train_over, seed, iters, args.eval_iters, torch.get_num_threads(), args.device]
    path = keyed_cache_dir("ablation", "run", key=key) / "result.json"
    if path.exists():
        return json.loads(path.read_text())
    tc = TrainConfig(max_iters=iters, eval_interval=iters, eval_iters=args.eval_iters, seed=seed, device=args.device,
                     progress=False, warmup_iters=min(100, iters // 10), out_dir=None, **train_over)  # fmt: skip
    res = train(model_config(model_over, tok.vocab_size), tc, train_ids, val_ids)
    out = {"val": res["val"][-1][2], "ms": 1e3 * res["train_time_s"] / iters, "params": res["model"].num_params()}
    print(f"  {name}, seed {seed}, {iters} steps: val {out['val']:.4f}, {out['ms']:.1f} ms/step", flush=True)
    path.write_text(json.dumps(out))
    return out


def combination(pieces: dict, means: dict[str, float]) -> tuple[str, dict, dict] | None:
    """The pieces whose mean val loss beat the baseline's, best first, each added only if the model accepts it with
    the ones before (e.g. QK-norm and MLA exclude each other: GPTConfig says so). (name, model and train overrides),
    or None if no piece won."""
    winners = sorted((n for n in pieces if n != BASELINE and means[n] < means[BASELINE]), key=means.get)
    taken, model_over, train_over = [], {}, {}
    for n in winners:
        try:
            model_config({**model_over, **pieces[n][0]}, 65)
        except ValueError:
            continue  # incompatible with a better piece already taken
        taken.append(n)
        model_over, train_over = {**model_over, **pieces[n][0]}, {**train_over, **pieces[n][1]}
    if not taken:
        return None
    return "combination: " + ", ".join(n.removeprefix("+ ").split(" (")[0] for n in taken), model_over, train_over


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
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--equal-time-variants",
        nargs="*",
        default=None,
        help="variants of the equal-time table (default: all; the baseline and the combination always)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = prepare_data("char")
    pieces = {n: PIECES[n] for n in PIECES if n in args.variants or n == BASELINE}  # table order: the baseline first
    order = [*dict.fromkeys([*args.variants, BASELINE])]  # run order: the baseline last (split runs share it)
    done = {n: [run(n, pieces, s, args.max_iters, data, args) for s in args.seeds] for n in order}
    results = {n: done[n] for n in pieces}
    means = {n: statistics.mean(r["val"] for r in rs) for n, rs in results.items()}
    combo = None if args.no_combination else combination(pieces, means)
    if combo:
        name, *overrides = combo
        pieces[name] = tuple(overrides)
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
            chosen = args.equal_time_variants is None or n in args.equal_time_variants
            if not (chosen or n == BASELINE or n.startswith("combination")):
                continue
            iters = max(10, round(budget_s * 1e3 / statistics.mean(r["ms"] for r in rs)))
            r = run(n, pieces, args.seeds[0], iters, data, args)
            timed.append({"variant": n, "steps": iters, "val loss": r["val"], "seconds": r["ms"] * iters / 1e3})
        print(f"\nequal wall-clock: {budget_s:.0f} s each (the baseline's), seed {args.seeds[0]}\n")
        print(markdown_table(timed, floatfmt=".4f"))
        out["equal_time"] = timed
    return out


if __name__ == "__main__":
    main()
