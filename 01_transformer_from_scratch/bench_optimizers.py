"""AdamW vs Muon (muon.py) on the mini-GPT: val loss at equal steps, and at equal wall-clock (Muon's steps cost more:
the Newton–Schulz matmuls), same batches, same schedule shape.

    python 01_transformer_from_scratch/bench_optimizers.py                              # tiny preset, 300 steps (~1 min)
    python 01_transformer_from_scratch/bench_optimizers.py --preset small --iters 2000 --seeds 1337 1338 1339

Equal wall-clock: Muon is re-run with max_iters = iters · (AdamW CPU s/step / Muon CPU s/step), so its cosine schedule
ends when AdamW's budget is spent (CPU time per step, measured in the equal-step runs, is less disturbed by a shared
machine than wall time). Muon uses AdamW's learning rate: its update is scaled to AdamW's RMS (Moonlight's
0.2·sqrt(max(A, B))), times ``--muon-lr-scale``.
References: Jordan et al. 2024 (Muon); Liu et al. 2025 (Moonlight); Loshchilov & Hutter 2019 (AdamW).
"""

from __future__ import annotations

import statistics

from ch01.model import GPTConfig
from ch01.train import TrainConfig, prepare_data, train
from common.bench import hardware_info, markdown_table
from common.cli import base_parser
from common.device import pick_device


def run(cfg: GPTConfig, args, optimizer: str, iters: int, seed: int, train_ids, val_ids) -> dict:
    tc = TrainConfig(max_iters=iters, batch_size=args.batch_size, lr=args.lr, min_lr=args.lr / 10,
                     warmup_iters=max(1, iters // 20), eval_interval=iters, eval_iters=20, seed=seed,
                     batch_seed=seed, optimizer=optimizer, muon_lr_scale=args.muon_lr_scale, device=args.device,
                     out_dir=None, progress=False)  # fmt: skip
    res = train(cfg, tc, train_ids, val_ids)
    tokens = iters * args.batch_size * cfg.block_size
    return {"val": res["val"][-1][2], "cpu_ms_step": 1e3 * tokens / res["tokens_per_cpu_s"] / iters,
            "ms_step": 1e3 * res["train_time_s"] / iters, "iters": iters}  # fmt: skip


def _summary(label: str, runs: list[dict]) -> dict:
    vals = [r["val"] for r in runs]
    spread = f" ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else ""
    return {"run": label, "steps": runs[0]["iters"], "val loss": f"{statistics.mean(vals):.4f}{spread}",
            "CPU ms/step": statistics.median(r["cpu_ms_step"] for r in runs),
            "wall ms/step": statistics.median(r["ms_step"] for r in runs)}  # fmt: skip


def main(argv=None) -> dict:
    p = base_parser(__doc__, device=True)
    p.add_argument("--preset", default="tiny", help="ch01 preset (tiny, small, ...)")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of both optimizers")
    p.add_argument("--muon-lr-scale", type=float, default=1.0, help="Muon's lr = lr · this")
    p.add_argument("--seeds", type=int, nargs="+", default=[1337])
    args = p.parse_args(argv)
    tok, train_ids, val_ids = prepare_data("char")
    cfg = GPTConfig.preset(args.preset, vocab_size=tok.vocab_size)
    runs: dict[str, list[dict]] = {"adamw": [], "muon": [], "muon_wall": []}
    for seed in args.seeds:
        runs["adamw"].append(run(cfg, args, "adamw", args.iters, seed, train_ids, val_ids))
        runs["muon"].append(run(cfg, args, "muon", args.iters, seed, train_ids, val_ids))
        ratio = runs["adamw"][-1]["cpu_ms_step"] / runs["muon"][-1]["cpu_ms_step"]
        runs["muon_wall"].append(run(cfg, args, "muon", max(1, round(args.iters * ratio)), seed, train_ids, val_ids))
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]['val']:.4f}" for k, v in runs.items()), flush=True)
    rows = [_summary("AdamW", runs["adamw"]), _summary("Muon, equal steps", runs["muon"]),
            _summary("Muon, equal CPU time", runs["muon_wall"])]  # fmt: skip
    table = markdown_table(rows, floatfmt=".1f")
    print(f"\n{hardware_info(pick_device(args.device))}\n{args.preset} preset, lr {args.lr}, batch {args.batch_size}, "
          f"seeds {args.seeds} (shared machine: times are medians and noisy):\n{table}")  # fmt: skip
    return {"rows": rows, "runs": runs}


if __name__ == "__main__":
    main()
