"""The same RLHF pipeline with Hugging Face TRL: RewardTrainer, GRPOTrainer, RLOOTrainer and DPOTrainer.

Our pretrained mini-GPT is exported with ``ch01.hf_interop.save_hf`` (a LlamaForCausalLM directory) next to a
``PreTrainedTokenizerFast`` built locally from the char vocabulary (``hf_tokenizer.py``; nothing from the hub), and the
trainers run on it. TRL 1.16 has no PPOTrainer; its online methods drop the value network instead:
  * GRPO (Shao et al. 2024): sample G completions per prompt, advantage = (r − mean_group) / std_group, PPO-style
    clipped objective, optional KL to the reference.
  * RLOO (Ahmadian et al. 2024): REINFORCE with the leave-one-out baseline, advantage = r_i − mean_{j≠i} r_j.
  * DPO (Rafailov et al. 2023): offline, on the same labelled pairs as our from-scratch dpo.py.
  * RewardTrainer: a LlamaForSequenceClassification reward model with the Bradley–Terry loss.
GRPO/RLOO are rewarded by our from-scratch reward model (``--reward rm``, the RLHF setting) or by the true reward used as
a verifiable reward (``--reward true``, the RLVR setting). Each trained model is converted back with ``from_hf`` and
measured with the same yardstick as every other method (``evaluate.py``).

    python 03_rlhf/trl_rlhf.py                                   # all four, short runs (CPU)
    python 03_rlhf/trl_rlhf.py --methods grpo,dpo --steps 40 --reward true
Docs: https://huggingface.co/docs/trl (GRPOTrainer, RLOOTrainer, DPOTrainer, RewardTrainer).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from ch01.hf_interop import from_hf, save_hf
from ch03.evaluate import evaluate_policy
from ch03.hf_tokenizer import EOS_CHAR, hf_char_tokenizer
from ch03.reward_model import add_rm_args, get_reward_model, rm_kwargs, subset_pairs
from ch03.rollout import add_policy_args, sample_prompts, set_threads
from ch03.true_reward import true_reward
from common.cli import base_parser
from common.data import cache_dir, keyed_cache_dir

METHODS = ("reward", "grpo", "rloo", "dpo")
COMMON = dict(
    use_cpu=True,
    bf16=False,
    report_to="none",
    save_strategy="no",
    logging_steps=5,
    disable_tqdm=True,
    dataloader_num_workers=0,
    seed=0,
)


def export_policy(policy, tok) -> Path:
    """Save the policy as a HF model directory + tokenizer (cached by weight hash): trainers that build the reference
    model from a path need it on disk."""
    d = keyed_cache_dir("ch03", "hf-policy", key=policy)
    if not (d / "config.json").exists():
        save_hf(policy, d)
        hf_char_tokenizer(tok).save_pretrained(d)
    return d


def pairs_dataset(pairs: dict, tok, prompt_len: int, n: int | None = None):
    from datasets import Dataset

    n = n or len(pairs["chosen"])
    text = lambda seqs: [tok.decode(s.tolist()) for s in seqs[:n]]
    chosen, rejected = text(pairs["chosen"]), text(pairs["rejected"])
    return Dataset.from_dict(
        {
            "prompt": [c[:prompt_len] for c in chosen],
            "chosen": [c[prompt_len:] for c in chosen],
            "rejected": [r[prompt_len:] for r in rejected],
        }
    )


def prompts_dataset(ids: torch.Tensor, tok, n: int, prompt_len: int, seed: int):
    from datasets import Dataset

    prompts = sample_prompts(ids, n, prompt_len, torch.Generator().manual_seed(seed))
    return Dataset.from_dict({"prompt": [tok.decode(p.tolist()) for p in prompts]})


def make_reward_func(kind: str, rm, tok, prompt_len: int):
    """A TRL reward function ``f(prompts, completions, **kw) -> list[float]``."""

    @torch.no_grad()
    def rm_reward(prompts, completions, **kwargs):
        out = []
        for p, c in zip(prompts, completions):
            c = c.replace(EOS_CHAR, "")[: 64 - prompt_len]
            seq = torch.tensor([tok.encode(p + c)]) if c else torch.tensor([tok.encode(p + " ")])
            out.append(rm(seq).item())
        return out

    def true_reward_func(prompts, completions, **kwargs):
        return true_reward([c.replace(EOS_CHAR, "") for c in completions]).tolist()

    rm_reward.__name__, true_reward_func.__name__ = "reward_model", "true_reward"
    return rm_reward if kind == "rm" else true_reward_func


def run_reward_trainer(model_dir, train_ds, test_ds, steps: int, out_dir: str) -> dict:
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    hf_tok = hf_char_tokenizer_from(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = hf_tok.pad_token_id
    cfg = RewardConfig(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=32, learning_rate=1e-3, **COMMON
    )
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=train_ds, processing_class=hf_tok)
    trainer.train()
    model = trainer.model.eval()

    @torch.no_grad()
    def scores(texts):
        ids = torch.tensor([hf_tok(t, add_special_tokens=False)["input_ids"] for t in texts])  # equal lengths
        return model(input_ids=ids).logits.squeeze(-1)

    acc = (
        (
            scores([p + c for p, c in zip(test_ds["prompt"], test_ds["chosen"])])
            > scores([p + r for p, r in zip(test_ds["prompt"], test_ds["rejected"])])
        )
        .float()
        .mean()
        .item()
    )
    return {"pair_accuracy": acc}


def hf_char_tokenizer_from(model_dir):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(model_dir)


def run_online(
    method: str, model_dir, prompts_ds, reward_func, steps: int, response_len: int, out_dir: str, lr: float, beta: float
):
    """GRPO or RLOO: 4 prompts × 8 completions per step."""
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    Config, Trainer = (GRPOConfig, GRPOTrainer) if method == "grpo" else (RLOOConfig, RLOOTrainer)
    cfg = Config(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=32,
        num_generations=8,
        max_completion_length=response_len,
        temperature=1.0,
        learning_rate=lr,
        beta=beta,
        **COMMON,
    )
    trainer = Trainer(
        model=str(model_dir),
        reward_funcs=reward_func,
        args=cfg,
        train_dataset=prompts_ds,
        processing_class=hf_char_tokenizer_from(model_dir),
    )
    trainer.train()
    return from_hf(trainer.model)


def run_dpo(model_dir, pairs_ds, epochs: int, out_dir: str, beta: float, lr: float):
    from trl import DPOConfig, DPOTrainer

    cfg = DPOConfig(
        output_dir=out_dir,
        num_train_epochs=epochs,
        per_device_train_batch_size=32,
        learning_rate=lr,
        beta=beta,
        lr_scheduler_type="constant",
        max_length=None,
        **COMMON,
    )
    trainer = DPOTrainer(
        model=str(model_dir), args=cfg, train_dataset=pairs_ds, processing_class=hf_char_tokenizer_from(model_dir)
    )
    trainer.train()
    return from_hf(trainer.model)


def run_trl(
    methods=METHODS,
    preset="small",
    iters=2000,
    pairs=2000,
    steps=20,
    reward="rm",
    dpo_epochs=1,
    eval_samples=256,
    seed=1337,
    log=print,
    rm_kw: dict | None = None,
) -> dict:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    rmd = get_reward_model(preset, iters, **(rm_kw or {"seed": seed}), log=log)
    train_pairs = subset_pairs(rmd["train_pairs"], pairs, seed)  # the same fixed budget of pairs as our dpo.py
    P, R = rmd["settings"]["prompt_len"], rmd["settings"]["response_len"]
    tok, policy = rmd["tok"], rmd["policy"]
    model_dir = export_policy(policy, tok)
    out_dir = str(cache_dir("ch03", "trl-runs"))
    ev = lambda pol: evaluate_policy(pol, policy, rmd["rm"], tok, rmd["train_ids"], eval_samples, P, R)
    rows, policies = [], {}
    for method in methods:
        t0 = time.perf_counter()
        if method == "reward":
            res = run_reward_trainer(
                model_dir,
                pairs_dataset(train_pairs, tok, P),
                pairs_dataset(subset_pairs(rmd["test_pairs"], pairs, seed), tok, P),
                steps * 3,
                out_dir,
            )
            rows.append({"method": "TRL RewardTrainer", **res, "train_s": time.perf_counter() - t0})
            log(
                f"  TRL RewardTrainer: held-out pair accuracy {res['pair_accuracy']:.3f} "
                f"(ours: {rmd['metrics']['pair_accuracy']:.3f})"
            )
            continue
        if method in ("grpo", "rloo"):
            pol = run_online(
                method,
                model_dir,
                prompts_dataset(rmd["train_ids"], tok, 4 * steps, P, seed),
                make_reward_func(reward, rmd["rm"], tok, P),
                steps,
                R,
                out_dir,
                lr=5e-5,
                beta=0.02,
            )
        elif method == "dpo":
            pol = run_dpo(model_dir, pairs_dataset(train_pairs, tok, P), dpo_epochs, out_dir, beta=0.1, lr=1e-4)
        else:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        train_s = time.perf_counter() - t0
        name = f"TRL {method.upper()}" + (f" ({reward} reward)" if method != "dpo" else "")
        policies[name] = pol
        rows.append({"method": name, **ev(pol), "train_s": train_s})
        log(f"  {name}: {rows[-1]}")
    return {"rows": rows, "policies": policies, "rm_metrics": rmd["metrics"]}


def main(argv=None):
    p = add_rm_args(add_policy_args(base_parser(__doc__.split("\n")[0], device=True, seed=True)))
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps for GRPO/RLOO (RewardTrainer: 3×)")
    p.add_argument("--reward", default="rm", choices=["rm", "true"], help="GRPO/RLOO reward: our RM or the true one")
    p.add_argument("--pairs", type=int, default=2000, help="labelled pairs for RewardTrainer / DPO (random subset)")
    p.add_argument("--dpo-epochs", type=int, default=1)
    p.add_argument("--eval-samples", type=int, default=256)
    args = p.parse_args(argv)
    set_threads(args.threads, args.device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    out = run_trl(
        methods,
        args.preset,
        args.iters,
        args.pairs,
        args.steps,
        args.reward,
        args.dpo_epochs,
        args.eval_samples,
        args.seed,
        rm_kw=rm_kwargs(args),
    )
    from common.bench import markdown_table

    print(markdown_table(out["rows"], ["method", "true_reward", "rm_reward", "kl", "pair_accuracy", "train_s"]))
    return out


if __name__ == "__main__":
    main()
