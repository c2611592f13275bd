"""QK-norm: RMSNorm on every query and key head before RoPE (OLMo 2, Qwen3, Gemma 3) — what it does to training at
a high learning rate.

What it shows: an attention logit is q·k/√D, and nothing bounds it: at a high learning rate the q/k weights grow, a few
logits run away, the softmax saturates to one-hot, its gradient vanishes and the loss spikes or stalls (Dehghani et al.
2023 saw it at 22B parameters; Wortsman et al. 2023 reproduce it in small models by raising the learning rate). With
QK-norm every q and k head has RMS 1 times a learned gain, so |q·k|/√D ≤ √D·g_q·g_k whatever the weights do.
``GPTConfig.qk_norm = True`` switches it on (parameters ``attn.q_norm`` / ``attn.k_norm``, Qwen3's names: the model
exports to Hugging Face ``Qwen3ForCausalLM``, tested in tests/test_04_attention_variants.py).

The script trains the same seeded model with and without QK-norm at a few learning rates and reports the final train
loss, the validation loss, the worst loss after warm-up and the largest attention logit on a validation batch (read
through a probe registered in ch01's attention registry).

Run:  python 04_efficient_attention/qk_norm.py                         (a few CPU minutes)
      python 04_efficient_attention/qk_norm.py --lrs 0.01 0.1 --seeds 0 1 2 --iters 500
References: Henry et al. 2020 (Query-Key normalization); Dehghani et al. 2023 (ViT-22B); Wortsman et al. 2023
(small-scale proxies for large-scale instabilities); OLMo 2 (2024); Qwen3 (2025).
"""

from __future__ import annotations

import math

import torch

from ch01.model import GPT, GPTConfig, register_attention, sdpa_attention
from common.bench import hardware_info, markdown_table
from common.cli import base_parser
from common.plot import assets_dir, line_plot

_LOGITS: list[float] = []


@register_attention("logit_probe")
def _logit_probe(q, k, v, *, causal: bool, attn_mask=None, dropout_p: float = 0.0):
    """SDPA that also records the largest |q·k|/√D it sees (the quantity QK-norm bounds)."""
    _LOGITS.append(float((q @ k.transpose(-1, -2)).abs().amax()) / math.sqrt(q.shape[-1]))
    return sdpa_attention(q, k, v, causal=causal, attn_mask=attn_mask, dropout_p=dropout_p)


@torch.no_grad()
def max_attention_logit(model: GPT, idx: torch.Tensor) -> float:
    impl, model.config.attn_impl = model.config.attn_impl, "logit_probe"
    _LOGITS.clear()
    try:
        model.eval()(idx)
    finally:
        model.config.attn_impl = impl
    return max(_LOGITS)


def run(preset: str, qk_norm: bool, lr: float, iters: int, seed: int, data, device: str = "cpu") -> dict:
    """Train once; the loss numbers and the largest attention logit at the end."""
    from ch01.evaluate import evaluate_loss
    from ch01.train import TrainConfig, train

    tok_vocab, train_ids, val_ids = data
    cfg = GPTConfig.preset(preset, vocab_size=tok_vocab, qk_norm=qk_norm)
    tc = TrainConfig(
        max_iters=iters,
        batch_size=12,
        lr=lr,
        min_lr=lr / 10,
        warmup_iters=max(1, iters // 20),
        eval_iters=0,
        seed=seed,
        device=device,
        progress=False,
        out_dir=None,
    )
    res = train(cfg, tc, train_ids, val_ids)
    losses = res["train_losses"]
    tail = losses[-max(1, iters // 10) :]
    x = val_ids[: cfg.block_size][None].to(device)  # (1, T)
    return {
        "qk_norm": qk_norm,
        "lr": lr,
        "seed": seed,
        "final train loss": sum(tail) / len(tail),
        "val loss": evaluate_loss(res["model"], val_ids, max_batches=10),
        "worst loss after warm-up": max(losses[tc.warmup_iters :]),
        "max q·k/√D": max_attention_logit(res["model"], x),
        "losses": losses,
    }


def main(argv=None) -> dict:
    p = base_parser(__doc__, device=True, seed=True)
    p.add_argument("--preset", default="tiny", help="ch01 GPTConfig preset")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 3e-1], help="peak learning rates to compare")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="several seeds (default: --seed)")
    p.add_argument("--no-plot", action="store_true", help="skip writing the PNG")
    args = p.parse_args(argv)
    from ch01.train import prepare_data
    from common.device import pick_device

    device = str(pick_device(args.device))

    tok, train_ids, val_ids = prepare_data("char")
    data = (tok.vocab_size, train_ids, val_ids)
    runs = []
    for lr in args.lrs:
        for seed in args.seeds or [args.seed]:
            for qk in (False, True):
                runs.append(run(args.preset, qk, lr, args.iters, seed, data, device))
                print(f"lr {lr:g} seed {seed} qk_norm {qk}: val {runs[-1]['val loss']:.3f}", flush=True)
    rows = [{k: v for k, v in r.items() if k != "losses"} for r in runs]
    print(f"\n{hardware_info(device)}\n{args.preset} model, {args.iters} iterations, batch 12, char tiny-shakespeare")
    print(markdown_table(rows, floatfmt=".3f"))
    if not args.no_plot:
        smooth = max(1, args.iters // 60)
        series = {
            f"lr {r['lr']:g} {'QK-norm' if r['qk_norm'] else 'plain'} (seed {r['seed']})": (
                range(smooth, len(r["losses"]) + 1, smooth),
                torch.tensor(r["losses"][: len(r["losses"]) // smooth * smooth]).view(-1, smooth).mean(1).tolist(),
            )
            for r in runs
        }
        line_plot(
            series,
            assets_dir(__file__) / "qk_norm_training.png",
            title=f"{args.preset} model: train loss with and without QK-norm",
            xlabel="iteration",
            ylabel="train loss (nats)",
            legend_outside=True,
        )
    return {"rows": rows}


if __name__ == "__main__":
    main()
