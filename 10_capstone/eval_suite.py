"""One evaluation table for every model of the course: bits per byte, a multiple-choice cloze, task exact-match and
HumanEval — the same held-out measures for a char mini-GPT, a BPE mini-GPT, SmolLM2-135M-Instruct in F32 and as it
computes after Q8_0 and 4-bit (Q4_0) quantization, and any post-trained model you pass.

    python 10_capstone/eval_suite.py                                    # default subsets: minutes on 2 cores
    python 10_capstone/eval_suite.py --models smollm2,smollm2-q4_0 --humaneval 164 --tasks 100
    python 10_capstone/eval_suite.py --extra "SFT=runs/sft_model" --extra "mine=exports/hf"

Columns (each from the chapter that teaches it, nothing re-implemented here):
- ``bpb shakespeare`` / ``bpb prose``: bits per byte (``ch01.evaluate.bits_per_byte``, sliding window) on the held-out
  end of tiny-shakespeare and on this repository's README prose (text no model here trained on; SmolLM2 never saw
  either split of ours, though it may have seen Shakespeare on the web). Comparable across tokenizers.
- ``cloze acc`` / ``acc_norm``: ``ch01.cloze``'s Shakespeare next-line multiple choice (chance 25%), scored by
  log-likelihood as lm-evaluation-harness does (``10_capstone/lm_eval_adapter.py`` shows lm-eval gets the same).
- ``tasks EM``: exact match on chapter 03's verifiable tasks (arithmetic, letter counting, reversal, sorting), the
  prompts rendered with the model's chat template where it has one, greedy answers checked by each task's checker.
- ``HumanEval pass@1``: greedy completions executed in chapter 09's sandbox (``ch09.humaneval``); models whose context
  cannot hold the prompts (our 64-token mini-GPTs) show "–".

Quantized rows: ``ch06.gguf_export.gguf_roundtrip_model`` stores every weight exactly as the GGUF file of that type does
(Q8_0: 32-weight blocks of int8 with an fp16 scale; Q4_0: 4-bit), activations in F32 — quantization's cost measured on
tasks, not only on loss. Results are printed as a markdown table and saved as JSON (``--out``).
References: Gao et al. 2020 (bits per byte, The Pile); Gao et al., lm-evaluation-harness (acc / acc_norm);
Chen et al. 2021 (HumanEval, pass@k); Dettmers et al. / llama.cpp (weight quantization).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common.bench import hardware_info, markdown_table
from common.cli import base_parser
from common.data import cache_dir
from common.device import pick_device

BUILTIN = ("char", "bpe", "smollm2", "smollm2-q8_0", "smollm2-q4_0")
DEFAULT_MODELS = BUILTIN
COLUMNS = ["model", "params", "context", "bpb shakespeare", "bpb prose", "cloze acc", "cloze acc_norm", "tasks EM",
           "HumanEval pass@1", "seconds"]  # fmt: skip


# ------------------------------------------------------------------------------------------------ the models
def load_builtin(name: str, preset: str, max_iters: int, seed: int, device):
    """(label, model, tokenizer) of a built-in row, or None when SmolLM2's package is not installed."""
    from ch01.cloze import load_model

    if not name.startswith("smollm2-"):
        return load_model(name, preset, max_iters, seed, device)
    base = load_model("smollm2", device=device)
    if base is None:
        return None
    from ch06.gguf_export import gguf_roundtrip_model

    qtype = name.split("-", 1)[1]
    label, model, tok = base
    return f"{label} {qtype.upper()} weights", gguf_roundtrip_model(model, qtype).eval(), tok


def load_extra(spec: str, device):
    """``label=path``: a directory written by ``GPT.save`` (+ the tokenizer's ``save`` in the same directory), a
    Hugging Face checkpoint directory, or a ``.gguf`` file."""
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise ValueError(f"--extra takes label=path, got {spec!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--extra {label}: {path} does not exist")
    cfg = path / "config.json"
    if path.is_dir() and cfg.exists() and "n_layer" in json.loads(cfg.read_text()):
        from ch01.model import GPT
        from ch01.tokenizer import load_tokenizer

        return label, GPT.load(path, map_location=str(device)).eval(), load_tokenizer(path)
    from ch01.pretrained import load_pretrained

    model, tok = load_pretrained(path)
    return label, model.to(device).eval(), tok


# ------------------------------------------------------------------------------------------------ the measures
def bpb_texts(chars: int) -> dict[str, str]:
    """The two held-out texts: the end of Shakespeare's validation split, and the README's prose."""
    from ch01.bench_bpb import held_out_text
    from ch06.real_model import readme_prose

    return {"shakespeare": held_out_text(chars), "prose": readme_prose()[:chars]}


def task_exact_match(model, tok, n: int, seed: int, max_new_tokens: int) -> dict | None:
    """Mean and per-task exact match on ``n`` held-out items of each chapter-03 task; None where it cannot run."""
    try:
        from ch03.tasks import evaluate_tasks
    except ImportError:  # chapter 03's task suite is optional here: the column shows "–"
        return None
    return evaluate_tasks(model, tok, n=n, seed=seed, max_new_tokens=max_new_tokens)


def humaneval_pass1(model, tok, n: int, max_new_tokens: int) -> float | None:
    """Greedy pass@1 on the first ``n`` HumanEval problems in the sandbox; None if the prompts do not fit."""
    from ch09 import humaneval, sandbox

    problems = humaneval.load_problems(n)
    try:
        longest = max(len(tok.encode(p["prompt"])) for p in problems)
    except ValueError:  # a char vocabulary without "_" or digits cannot even read the prompts
        return None
    if longest + max_new_tokens > model.config.block_size or sandbox.unavailable_reason() is not None:
        return None
    completions = humaneval.generate_completions(problems, max_new_tokens, model=model, tok=tok)
    return humaneval.evaluate(problems, completions)["pass@1"]


@torch.no_grad()
def evaluate_model(model, tok, args, texts: dict[str, str], cloze_items: list[dict]) -> dict:
    """Every column of one row (None where a measure does not apply)."""
    from ch01.cloze import TARGET_DELIMITER
    from ch01.evaluate import bits_per_byte
    from ch01.scoring import multiple_choice

    ctx = min(model.config.block_size, args.context)
    row: dict = {"params": model.num_params(), "context": ctx}
    for name, text in texts.items():
        try:
            row[f"bpb {name}"] = bits_per_byte(model, tok, text, block_size=ctx)
        except ValueError as e:  # a char vocabulary of Shakespeare's 65 characters cannot encode "—" or digits
            print(f"bpb {name}: {e}")
            row[f"bpb {name}"] = None
    mc = multiple_choice(model, tok, cloze_items, target_delimiter=TARGET_DELIMITER, batch_size=args.batch_size)
    row["cloze acc"], row["cloze acc_norm"] = mc["acc"], mc["acc_norm"]
    tasks = task_exact_match(model, tok, args.tasks, args.seed, args.task_tokens) if args.tasks else None
    row["tasks EM"] = None if tasks is None else tasks["mean"]
    row["tasks"] = tasks
    row["HumanEval pass@1"] = humaneval_pass1(model, tok, args.humaneval, args.he_tokens) if args.humaneval else None
    return row


def parse_args(argv=None):
    p = base_parser(__doc__, device=True, seed=True, out=True)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, from {', '.join(BUILTIN)}")
    p.add_argument("--extra", action="append", default=[], help="label=path of another model (repeatable)")
    p.add_argument("--preset", default="small", help="mini-GPT preset (trained once, then cached)")
    p.add_argument("--max-iters", type=int, default=2000, help="mini-GPT training iterations")
    p.add_argument("--chars", type=int, default=4000, help="characters of each held-out text for bits per byte")
    p.add_argument("--context", type=int, default=512, help="longest window for bits per byte (capped by the model)")
    p.add_argument("--cloze", type=int, default=100, help="cloze items")
    p.add_argument("--tasks", type=int, default=20, help="held-out items per chapter-03 task (0: skip)")
    p.add_argument("--task-tokens", type=int, default=24, help="greedy tokens per task answer")
    p.add_argument("--humaneval", type=int, default=10, help="the first N HumanEval problems (0: skip; 164: all)")
    p.add_argument("--he-tokens", type=int, default=128, help="greedy tokens per HumanEval completion")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per scoring forward")
    args = p.parse_args(argv)
    args.model_names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.model_names if m not in BUILTIN]
    if unknown:
        p.error(f"unknown --models {unknown}; choose from {BUILTIN} (other models: --extra label=path)")
    return args


def main(argv=None) -> dict:
    from ch01.cloze import build_cloze

    args = parse_args(argv)
    device = pick_device(args.device)
    texts, cloze_items = bpb_texts(args.chars), build_cloze(args.cloze)
    loaders = [lambda m=m: load_builtin(m, args.preset, args.max_iters, args.seed, device) for m in args.model_names]
    loaders += [lambda s=s: load_extra(s, device) for s in args.extra]
    rows = []
    for load in tqdm(loaders, desc="models"):
        loaded = load()
        if loaded is None:
            continue
        label, model, tok = loaded
        t0 = time.perf_counter()
        rows.append({"model": label, **evaluate_model(model, tok, args, texts, cloze_items)})
        rows[-1]["seconds"] = time.perf_counter() - t0
    hw = hardware_info(device)
    result = {"hardware": hw, "rows": rows, "settings": {k: v for k, v in vars(args).items() if k != "model_names"}}
    out = Path(args.out or cache_dir("eval") / "eval_suite.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{hw}; bpb on {len(texts['shakespeare'].encode())} + {len(texts['prose'].encode())} bytes, "
          f"{len(cloze_items)} cloze items, {args.tasks} items per task, {args.humaneval} HumanEval problems")  # fmt: skip
    shown = [{k: "–" if v is None else v for k, v in r.items()} for r in rows]
    print(markdown_table(shown, COLUMNS, floatfmt=".3f", formats={"seconds": ".0f", "params": ","}))
    print(f"saved {out}")
    return result


if __name__ == "__main__":
    main()
