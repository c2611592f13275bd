"""The post-training story on our mini-GPT: pretrained base -> SFT on the task suite -> GRPO, with held-out exact-match
accuracy per task after every stage.

    python 03_rlhf/posttrain.py                               # CPU minutes: table + reward/KL plot + saved models
    python 03_rlhf/posttrain.py --sft-iters 1500 --grpo-steps 300 --n-train 2000    # a longer run (GPU or patience)

1. base: ch01's char mini-GPT pretrained on tiny-shakespeare (``pretrained_char_model``, cached), given the ChatML
   markers and the digits/symbols the tasks need as new tokens (``sft.ChatTokenizer``, ``sft.extend_model``) and a
   192-token context (RoPE: no position table to grow). It has never seen a question: expect ~0.
2. SFT: the train split of ``--tasks`` (default add, sub; ``--tasks add,sub,count,reverse,sort,cloze`` for the whole
   suite) as conversations, assistant-only loss, packed rows, ch01's ``train`` loop.
3. GRPO: on the train prompts of ``--rl-tasks``, G sampled replies per prompt, reward 1 when the checker accepts.
Every stage is scored on the same held-out test split (questions, words and cloze lines never trained on), greedy.
The SFT and GRPO models are saved with ``GPT.save`` (+ the tokenizer) under ``--out`` for others to evaluate:
``GPT.load(out/"grpo")``, ``ChatTokenizer.load(out/"grpo")``. Refs: Ouyang et al. 2022; Shao et al. 2024 (GRPO).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ch01.pretrained import pretrained_char_model
from ch01.train import TrainConfig
from ch03.grpo import GRPOConfig, accuracy, grpo_train, plot_history
from ch03.sft import ChatTokenizer, extend_model, sft
from ch03.tasks import TASK_NAMES, alphabet, make_suite
from common.bench import hardware_info, markdown_table
from common.cli import base_parser
from common.data import cache_dir
from common.plot import assets_dir
from common.seed import seed_everything

DIFFICULTY = {"add": {"digits": 2}, "sub": {"digits": 2}, "sort": {"k": 4}, "cloze": {"n_choices": 2}}


def parse_args(argv):
    p = base_parser(__doc__, device=True, seed=True, out=True)
    p.add_argument(
        "--tasks", default="add,sub", help=f"comma-separated tasks to fine-tune and score ({','.join(TASK_NAMES)})"
    )
    p.add_argument("--rl-tasks", default="add,sub", help="tasks GRPO trains on (all --tasks are scored)")
    p.add_argument("--digits", type=int, default=2, help="operand digits of add/sub")
    p.add_argument("--n-train", type=int, default=300, help="training examples per task (count, reverse, sort)")
    p.add_argument("--n-train-arith", type=int, default=3000, help="training examples of add and of sub each")
    p.add_argument("--n-train-cloze", type=int, default=100, help="cloze examples (long prompts: costly tokens)")
    p.add_argument("--n-test", type=int, default=100, help="held-out examples per task")
    p.add_argument("--sft-iters", type=int, default=600)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=16, help="SFT rows (64 tokens, 192 with cloze; packed)")
    p.add_argument("--grpo-steps", type=int, default=60)
    p.add_argument("--grpo-lr", type=float, default=3e-5)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient")
    p.add_argument("--dr-grpo", action="store_true", help="Dr. GRPO: no std / length normalisation")
    p.add_argument("--plot-name", default="grpo_minigpt.png", help="reward/KL plot file in 03_rlhf/assets/")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    seed_everything(args.seed)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    rl_tasks = [t.strip() for t in args.rl_tasks.split(",") if t.strip()]
    if not set(rl_tasks) <= set(tasks):
        raise ValueError(f"--rl-tasks {rl_tasks} must be among --tasks {tasks}")
    difficulty = {**DIFFICULTY, "add": {"digits": args.digits}, "sub": {"digits": args.digits}}
    n_train = {"*": args.n_train, "add": args.n_train_arith, "sub": args.n_train_arith, "cloze": args.n_train_cloze}
    train_set, test_set = make_suite(n_train, args.n_test, tasks, seed=args.seed, difficulty=difficulty)
    out = Path(args.out) if args.out else cache_dir("runs", "ch03_posttrain")
    device = "cpu" if args.device == "auto" else args.device  # ch01's pretrained cache is a CPU model; moved below

    base, char_tok, _ = pretrained_char_model("small", max_iters=2000, device="cpu", verbose=True)
    tok = ChatTokenizer(char_tok, extra_chars=alphabet())
    model = extend_model(base, tok.vocab_size, block_size=192 if "cloze" in tasks else 64)
    rows = {"base": accuracy(model, tok, test_set)}
    t0, cpu0 = time.perf_counter(), time.process_time()

    tc = TrainConfig(max_iters=args.sft_iters, batch_size=args.batch_size, lr=args.sft_lr, min_lr=args.sft_lr / 10,
                     warmup_iters=max(1, args.sft_iters // 10), seed=args.seed, device=device, out_dir=None)  # fmt: skip
    sft_res = sft(model, tok, [e.messages() for e in train_set], tc)
    rows["SFT"], sft_s = accuracy(model, tok, test_set), time.perf_counter() - t0
    tok.save(model.save(out / "sft"))

    cfg = GRPOConfig(steps=args.grpo_steps, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                     max_new_tokens=10, lr=args.grpo_lr, beta=args.beta, dr_grpo=args.dr_grpo, seed=args.seed)  # fmt: skip
    history = grpo_train(model, tok, [e for e in train_set if e.task in rl_tasks], cfg, callback=_progress)
    rows["GRPO"], grpo_s = accuracy(model, tok, test_set), time.perf_counter() - t0 - sft_s
    tok.save(model.save(out / "grpo"))

    table = [{"stage": s, **{t: f"{acc[t]:.0%}" for t in tasks}, "mean": f"{sum(acc.values()) / len(acc):.0%}"}
             for s, acc in rows.items()]  # fmt: skip
    plot = plot_history(history, assets_dir(__file__) / args.plot_name, title=f"GRPO on {', '.join(rl_tasks)}")
    print(f"\n{hardware_info('cpu')}\nheld-out exact match ({args.n_test} per task, greedy); SFT {args.sft_iters} "
          f"iters ({sft_s:.0f} s), GRPO {args.grpo_steps} steps on {','.join(rl_tasks)} ({grpo_s:.0f} s); "
          f"{time.process_time() - cpu0:.0f} CPU-s in all\n")  # fmt: skip
    print(markdown_table(table))
    print(f"\nreward/KL plot: {plot}\nmodels: {out / 'sft'}, {out / 'grpo'}")
    result = {"accuracy": rows, "history": history, "sft_losses": sft_res["train_losses"], "out": str(out)}
    (out / "results.json").write_text(json.dumps({k: v for k, v in result.items() if k != "out"}, indent=1))
    return result


def _progress(step: int, history: dict) -> None:
    if (step + 1) % 10 == 0:
        r, kl = history["reward"][-10:], history["kl"][-1]
        print(f"GRPO step {step + 1}: mean reward (last 10) {sum(r) / len(r):.2f}, KL {kl:.4f}", flush=True)


if __name__ == "__main__":
    main()
