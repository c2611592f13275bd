"""Four architectures, one training loop, same batches and steps on tiny-shakespeare (char level):
Transformer (ch01 GPT), Transformer + MoE (8 experts, top-2, each expert half the dense FFN: same active parameters),
Mamba (layers chosen to match the Transformer's parameter count) and Transformer + KAN FFN (parameter-matched).

Reports parameters (total / active per token), validation loss (ch01's deterministic ``evaluate_loss``), training tokens/s
and inference tokens/s with a KV cache (Transformers) or the recurrent state (Mamba), plus one plot of val-loss curves.

    python 05_emerging_architectures/compare.py                                  # tiny preset, 150 steps (~1-3 min)
    python 05_emerging_architectures/compare.py --preset small --iters 1000 --eval-interval 50   # README (~30 min)

References: see the chapter README (Fedus 2021, Jiang 2024, Gu & Dao 2023, Liu 2024).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ch01.evaluate import evaluate_loss
from ch01.generate import generate
from ch01.model import GPT, GPTConfig
from ch01.train import prepare_data, train
from ch05.kan import KANGPT
from ch05.lm_train import arch_config
from ch05.mamba import MambaConfig, MambaLM
from ch05.moe import MoEConfig, MoEGPT
from common.bench import hardware_info, markdown_table
from common.cli import base_parser
from common.device import pick_device
from common.plot import assets_dir, line_plot
from common.seed import seed_everything


def mamba_matching(cfg: GPTConfig) -> MambaConfig:
    """Same width as the Transformer, and as many Mamba layers as needed to match its non-embedding parameters."""
    per_layer = sum(p.numel() for p in MambaLM(MambaConfig(n_layer=1, d_model=cfg.n_embd)).blocks.parameters())
    target = GPT(cfg).num_params(non_embedding=True) - cfg.n_embd * cfg.vocab_size - cfg.n_embd  # minus head, norm
    return MambaConfig(
        vocab_size=cfg.vocab_size,
        block_size=cfg.block_size,
        d_model=cfg.n_embd,
        n_layer=max(1, round(target / per_layer)),
    )


def build_models(cfg: GPTConfig, seed: int) -> dict[str, torch.nn.Module]:
    builders = {
        "Transformer (ch01)": lambda: GPT(cfg),
        "Transformer + MoE (8 experts, top-2)": lambda: MoEGPT(
            cfg, MoEConfig(n_experts=8, top_k=2, expert_hidden=cfg.ffn_hidden // 2)
        ),
        "Mamba": lambda: MambaLM(mamba_matching(cfg)),
        "Transformer + KAN FFN": lambda: KANGPT(cfg),
    }
    models = {}
    for name, build in builders.items():
        seed_everything(seed)
        models[name] = build()
    return models


@torch.no_grad()
def decode_tokens_per_s(
    model: torch.nn.Module, n_tokens: int, batch_size: int = 1, device="cpu"
) -> tuple[float, float]:
    """Greedy decoding speed with a KV cache (GPT family: ch01's ``generate``) or the recurrent state (Mamba's own
    ``generate``), from a 1-token prompt. Returns (tokens per wall second, tokens per CPU second)."""
    model.eval()
    prompt = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    t0, c0 = time.perf_counter(), time.process_time()
    if isinstance(model, MambaLM):
        model.generate(prompt, n_tokens, temperature=0)
    else:
        generate(model, prompt, n_tokens, temperature=0)
    n = n_tokens * batch_size
    return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)


def active_params(model) -> int:
    return model.num_active_params() if hasattr(model, "num_active_params") else model.num_params()


def main(argv=None) -> dict:
    p = base_parser(__doc__, device=True, seed=True, out=True)
    p.add_argument("--preset", default="tiny", help="ch01 preset for the Transformer family (tiny, small, ...)")
    p.add_argument("--iters", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--only", nargs="*", help="substrings of model names to run (default: all four)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    tok, train_ids, val_ids = prepare_data("char")
    cfg = GPTConfig.preset(args.preset, vocab_size=tok.vocab_size)
    tc = arch_config(
        max_iters=args.iters,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr=args.lr / 10,
        warmup_iters=max(1, args.iters // 10),
        eval_interval=args.eval_interval,
        eval_iters=10,
        seed=args.seed,
        device=args.device,
        progress=False,
    )
    rows, curves = [], {}
    for name, model in build_models(cfg, args.seed).items():
        if args.only and not any(s.lower() in name.lower() for s in args.only):
            continue
        print(f"training {name} ({model.num_params():,} params) ...", flush=True)
        res = train(model, tc, train_ids, val_ids)
        curves[name] = ([v[0] for v in res["val"]], [v[2] for v in res["val"]])  # rows are [iter, train, val]
        decode_wall, decode_cpu = decode_tokens_per_s(model, cfg.block_size - 1, device=device)
        rows.append(
            {
                "model": name,
                "params total": f"{model.num_params():,}",
                "params active": f"{active_params(model):,}",
                "val loss": evaluate_loss(model, val_ids.to(device), max_batches=10),
                "train tokens/s": res["tokens_per_s"],
                "train tokens/CPU-s": res["tokens_per_cpu_s"],
                "decode tokens/s": decode_wall,
                "decode tokens/CPU-s": decode_cpu,
            }
        )
    shown = [
        {k: (f"{v:.3f}" if k == "val loss" else f"{v:,.0f}") if isinstance(v, float) else v for k, v in r.items()}
        for r in rows
    ]
    table = markdown_table(shown)
    print(
        f"\n{hardware_info(device)}; machine shared with other jobs (throughputs are noisy)\n"
        f"{args.preset} preset, {args.iters} steps × {args.batch_size} × {cfg.block_size} tokens, same batches:\n"
        f"{table}"
    )
    plot_dir = Path(args.out) if args.out else assets_dir(__file__)  # --out: keep the README's plot untouched
    plot = line_plot(
        curves,
        plot_dir / f"compare_val_loss_{args.preset}.png",
        title=f"val loss, {args.preset} preset, tiny-shakespeare (char)",
        xlabel="training step",
        ylabel="val cross-entropy",
        marker="",
    )
    print(f"plot: {plot}")
    return {"rows": rows, "curves": curves, "plot": str(plot)}


if __name__ == "__main__":
    main()
