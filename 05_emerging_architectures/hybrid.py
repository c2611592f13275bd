"""A hybrid of Gated DeltaNet and attention layers in ch01's one GPT (``layer_pattern``), against the plain GPT:
val loss at the same steps and batches (seeds: mean ± std), and decode memory as the generated length grows.

    python 05_emerging_architectures/hybrid.py                   # tiny preset (2 layers), A / DA / D, 200 steps (~1 min)
    python 05_emerging_architectures/hybrid.py --preset small --patterns A DDDA D --iters 2000 --seeds 1337 1338 1339

Patterns (tiled over the layers): "A" = attention only (the plain GPT), "DDDA" = 3 Gated DeltaNet : 1 attention
(Qwen3-Next's ratio; "DA" on the 2-layer tiny preset), "D" = Gated DeltaNet only. The memory part decodes one sequence with ch01's cache and records
``cache.nbytes``: attention layers' keys/values grow with the length, Gated DeltaNet's (Dk, Dv) state per head does not.
References: Yang, Kautz & Hatamizadeh 2024 (Gated DeltaNet); Qwen3-Next (2025); see gated_deltanet.py.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from ch01.cache import KVCache
from ch01.model import GPT, GPTConfig
from ch01.train import prepare_data, train
from ch05.lm_train import arch_config
from common.bench import hardware_info, markdown_table
from common.cli import base_parser
from common.device import pick_device
from common.plot import assets_dir, line_plot
from common.seed import seed_everything


@torch.no_grad()
def cache_bytes_by_length(cfg: GPTConfig, lengths: list[int], device="cpu", cache=None) -> list[int]:
    """cache.nbytes after decoding each of ``lengths`` tokens (1-token steps from a 1-token prompt, batch 1), in
    ``cache`` (default: a new ``KVCache``; e.g. chapter 04's ``RollingKVCache`` for a sliding window)."""
    model = GPT(GPTConfig.from_dict({**cfg.to_dict(), "block_size": max(lengths) + 1})).to(device).eval()
    cache = KVCache(cfg.n_layer) if cache is None else cache
    out, tok = [], torch.zeros(1, 1, dtype=torch.long, device=device)
    for n in range(1, max(lengths) + 1):
        model(tok, cache=cache)
        if n in lengths:
            out.append(cache.nbytes)
    return out


def train_pattern(cfg: GPTConfig, tc, train_ids, val_ids) -> dict:
    seed_everything(tc.seed)
    model = GPT(cfg)
    res = train(model, tc, train_ids, val_ids)
    return {"val": res["val"][-1][2], "ms_step": 1e3 * res["train_time_s"] / tc.max_iters, "params": model.num_params()}


def main(argv=None) -> dict:
    p = base_parser(__doc__, device=True, out=True)
    p.add_argument("--preset", default="tiny", help="ch01 preset (tiny, small, ...)")
    p.add_argument("--patterns", nargs="+", default=["A", "DA", "D"], help="layer patterns to compare")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[1337], help="one run per seed (same batches per seed)")
    p.add_argument("--max-len", type=int, default=1024, help="longest generation of the memory measurement")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    tok, train_ids, val_ids = prepare_data("char")
    rows, memory = [], {}
    lengths = sorted({max(1, args.max_len * i // 8) for i in range(1, 9)})
    for pattern in args.patterns:
        cfg = GPTConfig.preset(args.preset, vocab_size=tok.vocab_size, layer_pattern=pattern)
        runs = []
        for seed in args.seeds:
            tc = arch_config(
                max_iters=args.iters,
                batch_size=args.batch_size,
                lr=args.lr,
                min_lr=args.lr / 10,
                warmup_iters=max(1, args.iters // 10),
                eval_interval=args.iters,
                eval_iters=20,
                seed=seed,
                device=args.device,
                progress=False,
                eval_at_start=False,
            )
            runs.append(train_pattern(cfg, tc, train_ids, val_ids))
            print(f"{pattern} seed {seed}: val {runs[-1]['val']:.4f}", flush=True)
        vals = [r["val"] for r in runs]
        memory[pattern] = cache_bytes_by_length(cfg, lengths, device)
        rows.append({
            "layer pattern": pattern,
            "params": runs[0]["params"],
            "val loss": f"{statistics.mean(vals):.4f}" + (f" ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else ""),
            "ms/step (median run)": statistics.median(r["ms_step"] for r in runs),
            f"cache KiB @ {lengths[0]}": memory[pattern][0] / 1024,
            f"cache KiB @ {lengths[-1]}": memory[pattern][-1] / 1024,
        })  # fmt: skip
    table = markdown_table(rows, formats={"params": ",", "ms/step (median run)": ".1f"}, floatfmt=".1f")
    print(f"\n{hardware_info(device)}\n{args.preset} preset, {args.iters} steps × {args.batch_size} × block, "
          f"seeds {args.seeds}, same batches per seed (wall times are noisy on a shared machine):\n{table}")  # fmt: skip
    plot_dir = Path(args.out) if args.out else assets_dir(__file__)
    plot = line_plot(
        {pat: (lengths, [b / 1024 for b in mem]) for pat, mem in memory.items()},
        plot_dir / "hybrid_decode_memory.png",
        title=f"decode cache size vs generated length ({args.preset}, batch 1, fp32)",
        xlabel="generated tokens",
        ylabel="allocated cache KiB (KV buffers double)",
    )
    print(f"plot: {plot}")
    return {"rows": rows, "memory": memory, "lengths": lengths, "plot": str(plot)}


if __name__ == "__main__":
    main()
