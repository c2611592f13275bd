"""Program-Aided Language models (PAL): let the model write a program and let Python do the arithmetic.

Two copies of the ch01 mini-GPT (character level, same size, same training budget) are fine-tuned on the synthetic word
problems of arith_tasks.py:
  direct:  "3 boxes of 14 eggs, 4 eggs break. eggs left?>" -> "38|"
  PAL:     "3 boxes of 14 eggs, 4 eggs break. eggs left?>" -> "answer=3*14-4|"   (or the named multi-line program)
PAL's program is executed in ch09.sandbox (a separate, limited process) and its ``answer`` is read. We report exact-match
accuracy on held-out problems: by default new numbers for the training templates (``--split numbers``); ``--split
template`` holds out whole templates (new phrasings), which a tiny char model mostly cannot bridge.

    python 09_advanced_topics/pal.py                                  # ~3 min on 2 idle CPU cores
    python 09_advanced_topics/pal.py --program-style named --iters 1500
    python 09_advanced_topics/pal.py --split template

Reference: Gao et al. 2023, "PAL: Program-aided Language Models" (ICML); Chen et al. 2022, "Program of Thoughts".
"""

from __future__ import annotations

import time

from ch09.arith_tasks import Problem, make_splits
from ch09.paths import plot_dir
from ch09.sandbox import run_many
from ch09.seq2seq import finetune, greedy_complete, task_model, task_tokenizer
from common.bench import markdown_table
from common.cli import base_parser
from common.plot import bar_plot
from common.seed import seed_everything


def target(p: Problem, method: str, program_style: str = "expression") -> str:
    if method == "direct":
        return str(p.answer)
    return p.expression if program_style == "expression" else p.program


def parse_int(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() and len(text) < 12 else None


def evaluate(model, tok, problems: list[Problem], method: str, max_new_tokens: int) -> dict:
    """Exact-match accuracy; for PAL the generated programs are run in the sandbox."""
    outs = greedy_complete(model, tok, [p.text for p in problems], max_new_tokens)
    if method == "direct":
        preds = [parse_int(o) for o in outs]
        ran = [pr is not None for pr in preds]
    else:
        results = run_many(outs, workers=4, timeout_s=5.0)
        preds = [r.answer if r.ok else None for r in results]
        ran = [r.ok for r in results]
    correct = [pr is not None and pr == p.answer for pr, p in zip(preds, problems)]
    return {
        "accuracy": sum(correct) / len(problems),
        "valid": sum(ran) / len(problems),
        "outputs": outs,
        "preds": preds,
        "correct": correct,
    }


def main(argv=None) -> dict:
    p = base_parser(__doc__, device=True, seed=True, out=True)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--max-value", type=int, default=20, help="numbers are drawn from [2, max_value]")
    p.add_argument("--split", default="numbers", choices=["numbers", "template"])
    p.add_argument("--program-style", default="expression", choices=["expression", "named"])
    p.add_argument("--iters", type=int, default=400, help="fine-tuning steps for each model")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=96)
    args = p.parse_args(argv)
    if min(args.n_train, args.n_test, args.iters, args.batch_size) < 1:
        p.error("--n-train, --n-test, --iters and --batch-size must be at least 1")
    if args.device not in ("auto", "cpu"):
        print("note: pal.py trains on the CPU; --device is ignored")
    train, test = make_splits(args.n_train, args.n_test, args.split, args.max_value, seed=args.seed)
    tok = task_tokenizer()
    rows, results = [], {}
    for method in ("direct", "pal"):
        seed_everything(args.seed)
        model = task_model(tok, n_layer=args.n_layer, n_embd=args.n_embd, block_size=128)
        pairs = [(q.text, target(q, method, args.program_style)) for q in train]
        t0 = time.perf_counter()
        losses = finetune(
            model, tok, pairs, args.iters, args.batch_size, args.lr, seed=args.seed, log_every=max(1, args.iters // 4)
        )
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        max_new = 8 if method == "direct" else max(len(target(q, method, args.program_style)) for q in train) + 8
        ev = evaluate(model, tok, test, method, max_new)
        ev.update(train_s=train_s, eval_s=time.perf_counter() - t0, final_loss=sum(losses[-20:]) / 20)
        results[method] = ev
        rows.append(
            {
                "method": method,
                "exact match": f"{100 * ev['accuracy']:.1f}%",
                "parsable / ran ok": f"{100 * ev['valid']:.1f}%",
                "final train loss": f"{ev['final_loss']:.3f}",
                "train (s)": f"{train_s:.0f}",
                "eval (s)": f"{ev['eval_s']:.1f}",
            }
        )
    print(
        f"\nheld-out split: {args.split} ({len(test)} problems, numbers in [2, {args.max_value}]), "
        f"{args.iters} steps x {args.batch_size}, {sum(q.numel() for q in model.parameters()):,} params, "
        f"program style: {args.program_style}"
    )
    print(markdown_table(rows))
    print("\nexamples (problem | direct | PAL program -> value | truth):")
    for i, q in enumerate(test[:5]):
        print(
            f"  {q.text} | {results['direct']['outputs'][i]} | {results['pal']['outputs'][i]!r} -> "
            f"{results['pal']['preds'][i]} | {q.answer}"
        )
    by_template = {}
    for method in ("direct", "pal"):
        for q, ok in zip(test, results[method]["correct"]):
            by_template.setdefault(q.template_id, {"direct": [], "pal": []})[method].append(ok)
    plot = bar_plot(
        {"direct": 100 * results["direct"]["accuracy"], "PAL (sandboxed)": 100 * results["pal"]["accuracy"]},
        plot_dir(args.out, __file__) / f"pal_accuracy_{args.split}_{args.program_style}.png",
        title=f"held-out exact match ({args.split} split)",
        ylabel="accuracy (%)",
    )
    print(f"plot: {plot}")
    return {
        "direct": results["direct"]["accuracy"],
        "pal": results["pal"]["accuracy"],
        "results": results,
        "by_template": {k: {m: sum(v) / len(v) for m, v in d.items()} for k, d in by_template.items()},
        "test": test,
    }


if __name__ == "__main__":
    main()
