"""LoRA (or QLoRA) fine-tuning of a real model on CPU: SmolLM2-135M-Instruct learns a task it gets wrong, measured.

1. Held-out exact-match accuracy of the shipped SmolLM2-135M-Instruct (ch01's GPT, its own ChatML template with its
   default system prompt) on every task of ch03.tasks: greedy replies, the task checker parses the answer.
2. LoRA SFT on one weak task (default: 2-digit addition, which the shipped model answers 0% right — it talks around
   the sum): adapters on every projection of every block (r=8: 1.8% of the parameters train), assistant-only loss on
   packed conversations (ch03.sft), ch01's training loop. ``--qlora``: the frozen base stored as NF4 (ch03.nf4).
3. Optionally GRPO with the adapters still the only trainable weights (``--grpo-steps``; ch03.grpo).
4. Accuracy on the same held-out questions after each stage; the adapter saved (KB-MB, not the 540 MB model), then
   merged into plain float weights and exported as a Hugging Face directory (``--out``). ``export_merged`` is the
   step the capstone or a test extends with chapter 06's GGUF writer, so llama.cpp runs the fine-tuned model.

    python 03_rlhf/smollm2_lora.py                    # short: 24 SFT steps (a few minutes on 2 CPU cores)
    python 03_rlhf/smollm2_lora.py --n-train 1000 --steps 150 --n-test 100 --suite-test 50 --grpo-steps 10
    python 03_rlhf/smollm2_lora.py --task count --qlora --out out/smollm2-count

References: Hu et al. 2021 (LoRA), Dettmers et al. 2023 (QLoRA), Allal et al. 2025 (SmolLM2), Shao et al. 2024 (GRPO).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ch01.train import TrainConfig, train
from ch03.grpo import GRPOConfig, accuracy, grpo_train, plot_history
from ch03.lora import apply_lora, merge_and_unload, save_adapter, trainable_parameters
from ch03.nf4 import apply_qlora
from ch03.sft import encode_conversation, masked_loss, pack, sft_batches
from ch03.tasks import TASK_NAMES, make_examples
from common.cli import base_parser

ALL_LINEARS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def lora_sft(model, tok, conversations: list[list[dict]], tc: TrainConfig, block_size: int = 128) -> dict:
    """Assistant-only SFT of the adapters through ch01's ``train``; conversations packed into rows of ``block_size``
    (not the model's 8192-token context: a CPU step then costs what the short conversations need)."""
    docs = [encode_conversation(tok, c) for c in conversations]
    packed = pack(docs, block_size)
    batch_fn = sft_batches(packed, tc.batch_size, seed=tc.seed)
    tc.eval_iters = 0  # accuracy with the task checker is the evaluation here
    return train(model, tc, None, None, loss_fn=masked_loss, batch_fn=batch_fn)


def export_merged(model, tok, out_dir: str | Path) -> Path:
    """Merge the adapters into plain float weights (in place) and write a Hugging Face directory (weights, config,
    tokenizer with its chat template). The merged ``model`` can then go to ch06's ``export_gguf`` for llama.cpp."""
    from ch01.hf_interop import save_hf

    merge_and_unload(model)
    return save_hf(model, Path(out_dir) / "hf", tok)


def parse_args(argv):
    p = base_parser(__doc__, seed=True)
    p.add_argument("--task", default="add", choices=TASK_NAMES, help="the task to fine-tune on")
    p.add_argument("--digits", type=int, default=2, help="operand digits for add/sub")
    p.add_argument("--n-train", type=int, default=300, help="training questions of --task")
    p.add_argument("--n-test", type=int, default=32, help="held-out questions of --task (before/after)")
    p.add_argument("--suite-test", type=int, default=8, help="held-out questions per task for the shipped model")
    p.add_argument("--steps", type=int, default=24, help="SFT optimizer steps")
    p.add_argument("--batch-size", type=int, default=3, help="packed rows per step (~3 conversations per row)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", nargs="+", default=ALL_LINEARS)
    p.add_argument("--qlora", action="store_true", help="NF4 base (QLoRA) instead of a float32 base")
    p.add_argument("--grpo-steps", type=int, default=0, help="GRPO steps after SFT (0 = none)")
    p.add_argument("--grpo-lr", type=float, default=5e-5)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--out", default=None, help="directory for the adapter and the merged HF export")
    return p.parse_args(argv)


def _print_table(rows: list[dict], tasks: list[str]) -> None:
    print("| stage | " + " | ".join(tasks) + " | trainable params | wall s |")
    print("|---" * (len(tasks) + 3) + "|")
    for r in rows:
        accs = " | ".join(f"{r['acc'][t]:.2f}" if t in r["acc"] else "" for t in tasks)
        print(f"| {r['stage']} | {accs} | {r['trainable']:,} | {r['seconds']:.0f} |")


def main(argv=None) -> dict:
    from ch01.pretrained import load_pretrained

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model, tok = load_pretrained("smollm2-135m-instruct")
    kw = {"digits": args.digits} if args.task in ("add", "sub") else {}
    train_set = make_examples(args.task, args.n_train, "train", args.seed, **kw)
    test_set = make_examples(args.task, args.n_test, "test", args.seed, **kw)
    suite = [e for t in TASK_NAMES if t != args.task for e in make_examples(t, args.suite_test, "test", args.seed)]
    rows, t0 = [], time.perf_counter()
    acc = accuracy(model, tok, test_set + suite, args.max_new_tokens)
    rows.append({"stage": "shipped", "acc": acc, "trainable": trainable_parameters(model), "seconds": 0.0})

    t0 = time.perf_counter()
    lora = apply_qlora if args.qlora else apply_lora
    lora(model, args.targets, rank=args.rank, alpha=args.alpha)
    tc = TrainConfig(max_iters=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.lr / 10,
                     warmup_iters=max(1, args.steps // 10), weight_decay=0.0, seed=args.seed, device="cpu",
                     out_dir=None, progress=True)  # fmt: skip
    res = lora_sft(model, tok, [e.messages() for e in train_set], tc)
    name = "QLoRA SFT" if args.qlora else "LoRA SFT"
    losses = res["train_losses"]
    print(f"assistant-only loss: first step {losses[0]:.3f}, last 5 steps {sum(losses[-5:]) / len(losses[-5:]):.3f}")
    acc = accuracy(model, tok, test_set, args.max_new_tokens)
    rows.append(
        {"stage": name, "acc": acc, "trainable": trainable_parameters(model), "seconds": time.perf_counter() - t0}
    )
    history = {}
    if args.grpo_steps:
        t0 = time.perf_counter()
        cfg = GRPOConfig(steps=args.grpo_steps, prompts_per_step=4, group_size=6, lr=args.grpo_lr,
                         max_new_tokens=args.max_new_tokens, seed=args.seed)  # fmt: skip
        history = grpo_train(model, tok, train_set, cfg)
        acc = accuracy(model, tok, test_set, args.max_new_tokens)
        rows.append({"stage": name + " + GRPO", "acc": acc, "trainable": trainable_parameters(model),
                     "seconds": time.perf_counter() - t0})  # fmt: skip
    print(f"\nSmolLM2-135M-Instruct, {args.task}: {args.n_test} held-out questions ({args.suite_test} per other task)")
    _print_table(rows, [args.task] + [t for t in TASK_NAMES if t != args.task])
    out = {"rows": rows, "sft_losses": res["train_losses"], "grpo": history}
    if args.out:
        out["adapter"] = str(save_adapter(model, Path(args.out) / "adapter"))
        out["hf"] = str(export_merged(model, tok, args.out))
        size = (Path(out["adapter"]) / "adapter.safetensors").stat().st_size
        print(f"adapter: {out['adapter']} ({size / 1e6:.1f} MB); merged Hugging Face export: {out['hf']}")
        if history:
            plot_history(history, Path(args.out) / "grpo.png", title=f"GRPO with LoRA on SmolLM2 ({args.task})")
    out["model"], out["tokenizer"] = model, tok
    return out


if __name__ == "__main__":
    main()
