"""STaR — the Self-Taught Reasoner: a model bootstraps its own chain-of-thought data from answers alone.

Setup on the synthetic arithmetic problems (arith_tasks.py, single-digit numbers by default):
- a small *seed* set has gold rationales: "4 boxes of 7 eggs, 3 eggs break. eggs left?>4*7=28, 28-3=25 #25|";
- a larger *pool* has only the final answers; a held-out *test* set measures exact match of the final "#answer".
M0 is the ch01 mini-GPT fine-tuned on the seed set (plain prompts, and prompts with the answer as a hint,
"... eggs left? (answer 25)>", so that it can *rationalise*). Each STaR round r:
  1. M_{r-1} writes a rationale + answer for every pool problem (greedy);
  2. keep only those whose final answer is right (the filter; nothing else is checked);
  3. for the failures, show the answer as a hint and let it write a rationale again; keep the ones that now end right,
     but store them with the plain prompt (rationalisation: the hint is removed from the training example);
  4. M_r = M0 fine-tuned again (restart, as in the paper) on seed + this round's kept rationales.
The control ("initial data only") fine-tunes M0 on the seed set for the same number of steps each round.

    python 09_advanced_topics/self_improve.py                        # 3 rounds, ~3 min on one CPU core
    python 09_advanced_topics/self_improve.py --n-pool 800 --seed-iters 600 --iters 250   # ~5 min

Reference: Zelikman, Wu, Mu, Goodman 2022, "STaR: Bootstrapping Reasoning With Reasoning" (NeurIPS).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

from ch09.arith_tasks import Problem, make_problems
from ch09.paths import plot_dir
from ch09.seq2seq import finetune, greedy_complete, task_model, task_tokenizer
from common.bench import markdown_table
from common.cli import base_parser
from common.plot import line_plot
from common.seed import seed_everything


def completion(p: Problem) -> str:
    return f"{p.rationale} #{p.answer}"


def hinted(text: str, answer: int) -> str:
    return f"{text} (answer {answer})"


def final_answer(output: str) -> int | None:
    """The integer after the last '#', or None if the output is malformed."""
    if "#" not in output:
        return None
    tail = output.rsplit("#", 1)[1].strip()
    return int(tail) if tail.isdigit() and len(tail) < 10 else None


@dataclass
class RoundStats:
    correct: int  # pool problems solved without a hint
    rationalized: int  # failures that ended right once the answer was hinted
    kept: list  # (prompt, completion) pairs added to the training set


def star_round(model, tok, pool: list[Problem], rationalize: bool = True, max_new_tokens: int = 40) -> RoundStats:
    """Steps 1-3 of a STaR round: generate, filter by the final answer, rationalise the failures."""
    outs = greedy_complete(model, tok, [p.text for p in pool], max_new_tokens)
    kept, failed = [], []
    for p, out in zip(pool, outs):
        (kept if final_answer(out) == p.answer else failed).append((p, out))
    kept = [(p.text, out) for p, out in kept]
    n_correct, n_rat = len(kept), 0
    if rationalize and failed:
        hints = greedy_complete(model, tok, [hinted(p.text, p.answer) for p, _ in failed], max_new_tokens)
        for (p, _), out in zip(failed, hints):
            if final_answer(out) == p.answer:
                kept.append((p.text, out))  # trained WITHOUT the hint
                n_rat += 1
    return RoundStats(n_correct, n_rat, kept)


def accuracy(model, tok, problems: list[Problem], max_new_tokens: int = 40) -> float:
    outs = greedy_complete(model, tok, [p.text for p in problems], max_new_tokens)
    return sum(final_answer(o) == p.answer for o, p in zip(outs, problems)) / len(problems)


def main(argv=None) -> dict:
    p = base_parser(__doc__, seed=True, out=True)
    p.add_argument("--n-seed", type=int, default=300, help="problems with gold rationales")
    p.add_argument(
        "--n-pool", type=int, default=500, help="problems with answers only (> 500: plot star_accuracy_pool<N>.png)"
    )
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--max-value", type=int, default=9)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed-iters", type=int, default=500, help="steps to train M0 on the seed set")
    p.add_argument("--iters", type=int, default=200, help="fine-tuning steps per round (STaR and control)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--no-rationalize", action="store_true")
    args = p.parse_args(argv)
    if min(args.n_seed, args.n_pool, args.n_test, args.rounds, args.seed_iters, args.iters, args.batch_size) < 1:
        p.error("--n-seed, --n-pool, --n-test, --rounds, --seed-iters, --iters and --batch-size must be at least 1")
    seed_everything(args.seed)
    probs = make_problems(args.n_seed + args.n_pool + args.n_test, max_value=args.max_value, seed=args.seed)
    seed_set, pool = probs[: args.n_seed], probs[args.n_seed : args.n_seed + args.n_pool]
    test = probs[args.n_seed + args.n_pool :]
    seed_pairs = [(q.text, completion(q)) for q in seed_set] + [
        (hinted(q.text, q.answer), completion(q)) for q in seed_set
    ]
    tok = task_tokenizer()
    t0 = time.perf_counter()
    m0 = task_model(tok, n_layer=2, n_embd=96, block_size=128)
    finetune(m0, tok, seed_pairs, args.seed_iters, args.batch_size, args.lr, seed=args.seed)
    acc0 = accuracy(m0, tok, test)
    print(f"M0 (seed set only, {args.seed_iters} steps): held-out accuracy {100 * acc0:.1f}%")
    star_acc, control_acc, rows, model = [acc0], [acc0], [], m0
    for r in range(1, args.rounds + 1):
        stats = star_round(model, tok, pool, rationalize=not args.no_rationalize)
        model = copy.deepcopy(m0)
        finetune(model, tok, seed_pairs + stats.kept, args.iters, args.batch_size, args.lr / 2, seed=args.seed + r)
        star_acc.append(accuracy(model, tok, test))
        control = copy.deepcopy(m0)  # same steps on the initial data only
        finetune(control, tok, seed_pairs, args.iters, args.batch_size, args.lr / 2, seed=args.seed + r)
        control_acc.append(accuracy(control, tok, test))
        rows.append(
            {
                "round": r,
                "pool solved (no hint)": f"{stats.correct}/{len(pool)}",
                "rationalised": stats.rationalized,
                "kept for training": len(stats.kept),
                "STaR held-out": f"{100 * star_acc[-1]:.1f}%",
                "control held-out": f"{100 * control_acc[-1]:.1f}%",
            }
        )
        print(
            f"round {r}: solved {stats.correct}, rationalised {stats.rationalized}, "
            f"STaR {100 * star_acc[-1]:.1f}% vs control {100 * control_acc[-1]:.1f}% ({time.perf_counter() - t0:.0f} s)"
        )
    elapsed = time.perf_counter() - t0
    print(
        f"\nnumbers in [2, {args.max_value}], seed {args.n_seed} gold rationales, pool {args.n_pool}, test "
        f"{len(test)}; M0 accuracy {100 * acc0:.1f}%; total {elapsed:.0f} s"
    )
    print(markdown_table(rows))
    rounds = list(range(args.rounds + 1))
    # a pool bigger than the default (the README's bigger-budget run) gets its own file, so both plots can be shown
    name = f"star_accuracy_pool{args.n_pool}.png" if args.n_pool > 500 else "star_accuracy.png"
    plot = line_plot(
        {"STaR": (rounds, [100 * a for a in star_acc]), "initial data only": (rounds, [100 * a for a in control_acc])},
        plot_dir(args.out, __file__) / name,
        title="STaR: held-out exact match per round",
        xlabel="round (0 = M0, before self-training)",
        ylabel="held-out exact match (%)",
        integer_x=True,
    )
    print(f"plot: {plot}")
    return {"star": star_acc, "control": control_acc, "time_s": elapsed}


if __name__ == "__main__":
    main()
