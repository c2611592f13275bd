"""One table for chapter 03: every way of steering the policy toward the (hidden) true reward, on one yardstick.

Methods: the SFT baseline; best-of-n sampling with the reward model (no training at all); PPO from scratch (adaptive KL,
and β = 0 to show reward hacking); DPO from scratch; TRL's GRPO, RLOO and DPO. Each trained policy is sampled on the
same prompts (``evaluate.py``): mean true reward, mean reward-model score, KL to the SFT policy, and training wall time.
The plot puts true reward against KL — the "reward vs. KL budget" frontier of Gao et al. 2022 / Stiennon et al. 2020.

    python 03_rlhf/bench_rlhf.py            # SFT, best-of-n, PPO, DPO from scratch (~3 min on one core)
    python 03_rlhf/bench_rlhf.py --all      # + PPO with β = 0 and TRL GRPO / RLOO / DPO (the README table)
"""

from __future__ import annotations

import time

from ch03.dpo import train_dpo
from ch03.evaluate import evaluate_policy
from ch03.ppo import PPOConfig, train_ppo
from ch03.reward_model import add_rm_args, get_reward_model, rm_kwargs, subset_pairs
from ch03.rollout import add_policy_args, set_threads
from common.bench import hardware_info, markdown_table
from common.cli import base_parser


def plot_frontier(rows: list[dict], path) -> None:
    import matplotlib.pyplot as plt

    from common.plot import save_fig

    fig, ax = plt.subplots(figsize=(9, 4.6))
    markers = "osD^vP*Xh"
    for i, r in enumerate(rows):  # a legend, not text labels: several methods land on almost the same point
        ax.scatter(r["kl"], r["true_reward"], s=50, color=f"C{i}", marker=markers[i % len(markers)], label=r["method"])
    ax.set_xscale("symlog", linthresh=1.0)  # KL spans 0 … ~70 nats: linear below 1 nat, log above
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    ax.set_xlabel("KL(π ‖ π_SFT), nats per response (symlog)")
    ax.set_ylabel("true reward (mean over the evaluation prompts)")
    ax.set_title("true reward vs. KL budget")
    ax.grid(alpha=0.3)
    save_fig(fig, path)


def main(argv=None):
    p = add_rm_args(add_policy_args(base_parser(__doc__.split("\n")[0], device=True, seed=True)))
    p.add_argument("--pairs", type=int, default=2000, help="labelled pairs for DPO (a random subset of the RM's)")
    p.add_argument("--ppo-iters", type=int, default=PPOConfig.iters)
    p.add_argument("--best-of", default="4,16", help="comma-separated n for best-of-n")
    p.add_argument("--trl-steps", type=int, default=15, help="GRPO/RLOO optimizer steps")
    p.add_argument("--with-trl", action="store_true", help="add TRL GRPO, RLOO and DPO (a few minutes more)")
    p.add_argument("--with-hacking", action="store_true", help="add the β = 0 PPO run (reward hacking)")
    p.add_argument("--all", action="store_true", help="= --with-trl --with-hacking (the README table)")
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    set_threads(args.threads, args.device)
    quiet = lambda *a: None
    rmd = get_reward_model(args.preset, args.iters, **rm_kwargs(args))
    sft, rm, tok, ids = rmd["policy"], rmd["rm"], rmd["tok"], rmd["train_ids"]
    P, R = rmd["settings"]["prompt_len"], rmd["settings"]["response_len"]
    ev = lambda pol, **kw: evaluate_policy(pol, sft, rm, tok, ids, args.eval_samples, P, R, **kw)
    rows = []

    def add(name, train_s, result):
        rows.append({"method": name, **result, "train_s": train_s})
        print(
            f"  {name}: true {result['true_reward']:+.3f}  RM {result['rm_reward']:+.3f}  KL {result['kl']:.2f}  "
            f"({train_s:.0f} s)",
            flush=True,
        )

    add("SFT baseline", 0.0, ev(sft))
    for n in [int(x) for x in args.best_of.split(",") if x]:
        t0 = time.perf_counter()
        result = ev(sft, best_of=n)
        add(f"best-of-{n} (RM)", 0.0, result)  # no training; sampling n× costs inference instead
        rows[-1]["sample_s"] = time.perf_counter() - t0
    ppo_runs = [("PPO scratch (adaptive β)", PPOConfig(iters=args.ppo_iters))]
    if args.with_hacking or args.all:
        ppo_runs.append(("PPO scratch (β = 0)", PPOConfig(iters=args.ppo_iters, init_kl_coef=0.0, target_kl=None)))
    for name, cfg in ppo_runs:
        t0 = time.perf_counter()
        pol, _ = train_ppo(sft, rm, tok, ids, cfg, seed=args.seed, log=quiet)
        add(name, time.perf_counter() - t0, ev(pol))
    t0 = time.perf_counter()
    pol, _ = train_dpo(
        sft, subset_pairs(rmd["train_pairs"], args.pairs, args.seed), P, beta=0.1, epochs=1, seed=args.seed, log=quiet
    )
    add("DPO scratch", time.perf_counter() - t0, ev(pol))
    if args.with_trl or args.all:
        from ch03.trl_rlhf import run_trl

        out = run_trl(
            ("grpo", "rloo", "dpo"),
            args.preset,
            args.iters,
            args.pairs,
            args.trl_steps,
            eval_samples=args.eval_samples,
            seed=args.seed,
            log=quiet,
            rm_kw=rm_kwargs(args),
        )
        for r in out["rows"]:
            add(r["method"], r["train_s"], {k: r[k] for k in ("true_reward", "rm_reward", "kl")})
    print(
        f"\npolicy {args.preset}-{args.iters}; reward model held-out accuracy {rmd['metrics']['pair_accuracy']:.3f};"
        f" {hardware_info()}"
    )
    print(markdown_table(rows, ["method", "true_reward", "rm_reward", "kl", "train_s"]))
    if not args.no_plot:
        from common.plot import assets_dir

        plot_frontier(rows, assets_dir(__file__) / "bench_rlhf.png")
    return rows


if __name__ == "__main__":
    main()
