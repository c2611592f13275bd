"""The capstone's post-training stages: ``sft`` (chapter 03's SFT with a ChatML template, assistant-only loss) and
``rl`` (chapter 03's GRPO, rewards from the task checkers) on the pretrained mini-GPT, with held-out exact-match
accuracy per task and the Shakespeare val loss after every stage (base, SFT, GRPO). ``[sft] replay_rows`` mixes rows
of the pretraining tokens into every SFT batch, so the model does not forget Shakespeare while it learns the tasks.
Each stage writes a self-contained model directory (``runs/<name>/sft``, ``runs/<name>/rl``: weights, config,
tokenizer and its chat template) that ``minigpt.py serve`` serves with that template. ``[sft] enabled = false`` /
``[rl] enabled = false`` skip them.
References: Ouyang et al. 2022 (SFT); Shao et al. 2024 (GRPO)."""

from __future__ import annotations

import copy

from ch01.model import GPT
from ch01.train import TrainConfig
from ch03.grpo import GRPOConfig, accuracy, grpo_train, plot_history
from ch03.sft import ChatTokenizer, extend_model, sft
from ch03.tasks import make_suite

POSTTRAIN_STAGES = ("sft", "rl")


def task_split(run) -> tuple[list, list]:
    """(train, held-out test) examples of the configured tasks: the same split for both stages."""
    c = run.cfg["sft"]
    difficulty = {"add": {"digits": c["digits"]}, "sub": {"digits": c["digits"]}, "sort": {"k": 4}}
    return make_suite(c["n_train"], c["n_test"], c["tasks"], seed=run.cfg["seed"], difficulty=difficulty)


def _summary(acc: dict[str, float], val_loss: float) -> dict:
    """Accuracy per task and their mean, plus the Shakespeare val loss: what post-training costs the pretraining."""
    return {**{t: round(a, 4) for t, a in acc.items()}, "mean": round(sum(acc.values()) / max(len(acc), 1), 4),
            "val_loss": round(val_loss, 4)}  # fmt: skip


def stage_sft(run) -> dict:
    c = run.cfg["sft"]
    if not c["enabled"]:
        return {"skipped": "sft.enabled = false"}
    train_set, test_set = task_split(run)
    tok = ChatTokenizer(run.tokenizer())  # the run's BPE + <|im_start|> / <|im_end|> as new ids
    pretrained = run.model()
    base_loss = run.val_loss(pretrained)  # before the new rows: the eval stage's number
    model = extend_model(pretrained, tok.vocab_size)
    base = _summary(accuracy(model, tok, test_set), base_loss)
    tc = TrainConfig(max_iters=c["iters"], batch_size=c["batch_size"], lr=c["lr"], min_lr=c["lr"] / 10,
                     warmup_iters=max(1, c["iters"] // 10), seed=run.cfg["seed"], device=str(run.device),
                     out_dir=None, progress=run.progress)  # fmt: skip
    res = sft(model, tok, [e.messages() for e in train_set], tc, replay=run.tokens("train"),
              replay_rows=c["replay_rows"])  # fmt: skip
    tok.save(model.save(run.dir / "sft"))
    return {"accuracy": {"base": base, "SFT": _summary(accuracy(model, tok, test_set), run.val_loss(model))},
            "final_train_loss": res["train_losses"][-1], "train_examples": len(train_set), "replay_rows": c["replay_rows"],
            "test_examples": len(test_set)}  # fmt: skip


def stage_rl(run) -> dict:
    c = run.cfg["rl"]
    if not c["enabled"]:
        return {"skipped": "rl.enabled = false"}
    if "skipped" in run.metrics.get("sft", {}):
        return {"skipped": "GRPO starts from the SFT model (sft.enabled = false)"}
    train_set, test_set = task_split(run)
    model, tok = GPT.load(run.dir / "sft", map_location=str(run.device)), ChatTokenizer.load(run.dir / "sft")
    rl_tasks = c["tasks"] or run.cfg["sft"]["tasks"]
    cfg = GRPOConfig(steps=c["steps"], prompts_per_step=c["prompts_per_step"], group_size=c["group_size"],
                     max_new_tokens=c["max_new_tokens"], lr=c["lr"], beta=c["beta"], dr_grpo=c["dr_grpo"],
                     seed=run.cfg["seed"])  # fmt: skip
    history = grpo_train(model, tok, [e for e in train_set if e.task in rl_tasks], cfg)
    tok.save(model.save(run.dir / "rl"))
    plot_history(history, run.dir / "grpo.png", title=f"{run.cfg['name']}: GRPO on {', '.join(rl_tasks)}")
    acc = copy.deepcopy(run.metrics["sft"]["accuracy"])
    acc["GRPO"] = _summary(accuracy(model, tok, test_set), run.val_loss(model))
    return {"accuracy": acc, "reward_first_last": [history["reward"][0], history["reward"][-1]],
            "kl_last": history["kl"][-1]}  # fmt: skip


def served_model_dir(run):
    """The directory ``serve`` loads by default: the last post-training stage that finished with the current config
    (rl, else sft), else the pretrained model."""
    for stage in reversed(POSTTRAIN_STAGES):
        if run.current(stage) and (run.dir / stage / "model.safetensors").exists():
            return run.dir / stage
    return run.model_dir
