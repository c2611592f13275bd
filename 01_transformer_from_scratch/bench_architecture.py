"""Ablation: what each Llama-era change buys over GPT-2 on char-level tiny-shakespeare, at equal steps and ~equal params.

Variants: GPT-2 style (learned positions, LayerNorm, GELU MLP), Llama style (RoPE, RMSNorm, SwiGLU), and GPT-2 with each
swap alone (+RoPE, +RMSNorm, +SwiGLU). Same data order, seed, optimizer and schedule for all; val loss table + curves.

    python 01_transformer_from_scratch/bench_architecture.py                 # 300 steps each (~2 min on a laptop)
    python 01_transformer_from_scratch/bench_architecture.py --max-iters 2000   # the README table

References: Radford 2019 (GPT-2); Su 2021 (RoPE); Zhang & Sennrich 2019 (RMSNorm); Shazeer 2020 (SwiGLU); Touvron 2023.
"""

from __future__ import annotations

from ch01.model import GPTConfig
from ch01.train import TrainConfig, prepare_data, train
from common.bench import hardware_info, markdown_table
from common.cli import base_parser
from common.data import cache_dir
from common.plot import assets_dir, line_plot

GPT2 = dict(pos_emb="learned", norm="layernorm", mlp="gelu")
VARIANTS = {
    "gpt2": GPT2,
    "gpt2 + rope": {**GPT2, "pos_emb": "rope"},
    "gpt2 + rmsnorm": {**GPT2, "norm": "rmsnorm"},
    "gpt2 + swiglu": {**GPT2, "mlp": "swiglu"},
    "llama": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu"),
}


def main(argv=None) -> list[dict]:
    p = base_parser(__doc__, device=True, seed=True)
    p.add_argument("--preset", default="small")
    p.add_argument("--max-iters", type=int, default=300)
    p.add_argument("--eval-interval", type=int, default=100)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args(argv)
    tok, train_ids, val_ids = prepare_data("char")
    rows, curves = [], {}
    for name in args.variants:
        mcfg = GPTConfig.preset(args.preset, vocab_size=tok.vocab_size, **VARIANTS[name])
        tc = TrainConfig(
            max_iters=args.max_iters,
            eval_interval=args.eval_interval,
            seed=args.seed,
            device=args.device,
            warmup_iters=min(100, args.max_iters // 10),
            progress=False,
            ckpt_interval=args.max_iters + 1,
            out_dir=str(cache_dir("runs", "ablation", name)),
        )
        res = train(mcfg, tc, train_ids, val_ids)
        curves[name] = ([v[0] for v in res["val"]], [v[2] for v in res["val"]])
        rows.append(
            {
                "variant": name,
                "params": f"{res['model'].num_params():,}",
                "val loss": res["val"][-1][2],
                "train loss": res["val"][-1][1],
                "tokens/s": f"{res['tokens_per_s']:,.0f}",
            }
        )
        print(f"{name}: val loss {res['val'][-1][2]:.4f}")
    print(f"\n{args.preset} preset, {args.max_iters} iterations, batch 12 x block 64; {hardware_info()}\n")
    print(markdown_table(rows))
    path = line_plot(
        curves,
        assets_dir(__file__) / "architecture_ablation.png",
        xlabel="iteration",
        ylabel="val loss",
        title=f"GPT-2 vs Llama-style blocks ({args.max_iters} iters)",
    )
    print(f"\nplot: {path}")
    return rows


if __name__ == "__main__":
    main()
