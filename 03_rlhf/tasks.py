"""Verifiable tasks for post-training: generators with disjoint train/test splits and exact answer checkers.

    from ch03.tasks import make_examples, check, TASK_NAMES
    train = make_examples("add", 500, split="train", seed=0, digits=2)
    test = make_examples("add", 100, split="test", seed=0, digits=2)
    train[0].messages()        # [{"role": "user", "content": "37+45=?"}, {"role": "assistant", "content": "82"}]
    check(test[0], "I think it is 82.")   # parses the final answer out of free text

Tasks (short enough for a 64-to-160-token character model; difficulty is a keyword of each generator):
``add`` / ``sub`` (``digits``-digit operands, non-negative differences), ``count`` (how many times a letter occurs in a
word: nanochat's SpellingBee idea, the "r in strawberry" failure), ``reverse`` (a word backwards), ``sort`` (``k``
digits ascending), ``cloze`` (which of ``n_choices`` lines follows a Shakespeare line: ch01.cloze's items from the
validation split, which the mini-GPTs never trained on).

Splits are by *key*, not by draw: every example has a key (the operand pair, the word, the cloze line) and a fixed hash
sends each key to train or test (20%), so the two never share a question whatever the seeds and sizes; words for
``count``/``reverse`` are split by word, so test words are words never seen in training. The checker takes the last
answer-shaped thing in the text (an integer, a run of integers, a lower-case word) and compares it exactly: extra
words around it are fine, a different format ("forty-six", "4.6", "46abc") is wrong. Reference: Cobbe et al. 2021
(verifiers), DeepSeek-AI 2025 (R1: rule-based rewards), Karpathy's nanochat (SpellingBee task).

    python 03_rlhf/tasks.py            # a few examples of every task with the checker's verdict
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch

from common.data import load_shakespeare, train_val_split

TASK_NAMES = ("add", "sub", "count", "reverse", "sort", "cloze")
TEST_FRACTION = 5  # one key in 5 goes to the test split


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str  # the user's message
    answer: str  # the assistant's reply, exactly as the checker's canonical form
    key: str  # what decides the split (operands, word, cloze line)

    def prompt_messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]

    def messages(self) -> list[dict]:
        """The conversation for SFT: the user's question and the assistant's answer."""
        return [*self.prompt_messages(), {"role": "assistant", "content": self.answer}]


def split_of(key: str) -> str:
    """'test' for one key in TEST_FRACTION (a fixed hash: the same on every machine and run), else 'train'."""
    return "test" if zlib.crc32(key.encode()) % TEST_FRACTION == 0 else "train"


# ------------------------------------------------------------------------------------------------------- answer parsing
_INT = r"(?<![\w.])-?\d+(?!\w|\.\d)"  # a whole integer: not part of a word or a decimal ("46." at a sentence end is ok)
_INT_RUN = rf"{_INT}(?:(?:, ?| ){_INT})*"  # integers separated by single spaces or commas


def parse_int(text: str) -> str | None:
    found = re.findall(_INT, text)
    return str(int(found[-1])) if found else None


def parse_int_list(text: str) -> str | None:
    runs = [m.group(0) for m in re.finditer(_INT_RUN, text)]
    return " ".join(str(int(x)) for x in re.findall(_INT, runs[-1])) if runs else None


def parse_word(text: str) -> str | None:
    found = re.findall(r"(?<![A-Za-z0-9])[a-z]+(?![A-Za-z0-9])", text)  # a whole lower-case word
    return found[-1] if found else None


# ------------------------------------------------------------------------------------------------------------ generators
def _digits_range(digits: int) -> tuple[int, int]:
    if not 1 <= digits <= 9:
        raise ValueError(f"digits must be in 1..9, got {digits}")
    return (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1


def draw_add(rng: random.Random, digits: int = 2) -> tuple[str, str, str]:
    lo, hi = _digits_range(digits)
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    return f"add{a},{b}", f"{a}+{b}=?", str(a + b)


def draw_sub(rng: random.Random, digits: int = 2) -> tuple[str, str, str]:
    lo, hi = _digits_range(digits)
    a, b = sorted((rng.randint(lo, hi), rng.randint(lo, hi)), reverse=True)  # a >= b: no negative answers
    return f"sub{a},{b}", f"{a}-{b}=?", str(a - b)


@lru_cache(maxsize=8)
def shakespeare_words(min_len: int = 3, max_len: int = 6) -> tuple[str, ...]:
    """Distinct lower-case words of tiny-shakespeare's training split, sorted (a fixed order for seeded draws)."""
    train_text, _ = train_val_split(load_shakespeare())
    return tuple(sorted({w for w in re.findall(r"[a-z]+", train_text.lower()) if min_len <= len(w) <= max_len}))


def draw_count(rng: random.Random, min_len: int = 3, max_len: int = 6) -> tuple[str, str, str]:
    word = rng.choice(shakespeare_words(min_len, max_len))
    letter = rng.choice(word) if rng.random() < 0.75 else rng.choice("abcdefghijklmnopqrstuvwxyz")  # some zeros
    return f"word:{word}", f"how many {letter} in {word}?", str(word.count(letter))


def draw_reverse(rng: random.Random, min_len: int = 3, max_len: int = 5) -> tuple[str, str, str]:
    word = rng.choice(shakespeare_words(min_len, max_len))
    return f"word:{word}", f"reverse {word}", word[::-1]


def draw_sort(rng: random.Random, k: int = 4) -> tuple[str, str, str]:
    if not 2 <= k <= 10:
        raise ValueError(f"k must be in 2..10, got {k}")
    xs = [rng.randint(0, 9) for _ in range(k)]
    return f"sort{xs}", "sort " + " ".join(map(str, xs)), " ".join(map(str, sorted(xs)))


@lru_cache(maxsize=4)
def _cloze_items(n_choices: int, max_chars: int) -> tuple[tuple[str, str, str], ...]:
    from ch01.cloze import build_cloze  # every place of the validation split, one line of context

    items = build_cloze(n=1451, seed=1234, context_lines=1, n_choices=n_choices)
    out = []
    for it in items:
        options = "\n".join(f"{i + 1}) {c}" for i, c in enumerate(it["choices"]))
        prompt = f"which line follows?\n{it['context']}\n{options}"
        if len(prompt) <= max_chars:
            out.append((f"line{it['line']}", prompt, str(it["gold"] + 1)))
    return tuple(out)


def draw_cloze(rng: random.Random, n_choices: int = 2, max_chars: int = 140) -> tuple[str, str, str]:
    return rng.choice(_cloze_items(n_choices, max_chars))


@dataclass(frozen=True)
class Task:
    draw: Callable[..., tuple[str, str, str]]  # (rng, **difficulty) -> (key, prompt, answer)
    parse: Callable[[str], str | None]  # free text -> canonical answer, or None when no answer-shaped text


TASKS: dict[str, Task] = {
    "add": Task(draw_add, parse_int),
    "sub": Task(draw_sub, parse_int),
    "count": Task(draw_count, parse_int),
    "reverse": Task(draw_reverse, parse_word),
    "sort": Task(draw_sort, parse_int_list),
    "cloze": Task(draw_cloze, parse_int),
}


def _task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASK_NAMES)}")
    return TASKS[name]


def make_examples(task: str, n: int, split: str = "train", seed: int = 0, **difficulty) -> list[Example]:
    """``n`` distinct examples of ``task`` from ``split`` ('train' or 'test'), the same for the same arguments."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    draw = _task(task).draw
    rng = random.Random(f"{task}/{split}/{seed}")  # a string seed: stable across Python versions and processes
    out: dict[str, Example] = {}
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 2000:
            raise ValueError(f"task {task!r} with {difficulty} has fewer than {n} distinct {split} examples")
        key, prompt, answer = draw(rng, **difficulty)
        if split_of(key) == split and prompt not in out:
            out[prompt] = Example(task, prompt, answer, key)
    return list(out.values())


def make_suite(
    n_train: int | dict, n_test: int | dict, tasks=TASK_NAMES, seed: int = 0, difficulty: dict | None = None
) -> tuple[list[Example], list[Example]]:
    """(train, test) with ``n_train`` / ``n_test`` examples of every task (an int, or {task: n} with a default under
    the key "*"); ``difficulty``: {task: {kwarg: value}}."""
    difficulty = difficulty or {}
    count = lambda n, t: n if isinstance(n, int) else n.get(t, n.get("*", 0))  # noqa: E731
    train = [e for t in tasks for e in make_examples(t, count(n_train, t), "train", seed, **difficulty.get(t, {}))]
    test = [e for t in tasks for e in make_examples(t, count(n_test, t), "test", seed, **difficulty.get(t, {}))]
    return train, test


def parse_answer(task: str, text: str) -> str | None:
    return _task(task).parse(text)


def check(example: Example, text: str) -> bool:
    """Exact match of the answer parsed from ``text`` (free text, e.g. a model's reply) with the example's answer."""
    return parse_answer(example.task, text) == example.answer


def _prompt_ids(tok, ex: Example) -> list[int] | None:
    """The question as the model reads it: its chat template with the generation prompt where it has one, else the
    bare question and a newline; None when the tokenizer cannot encode it (a 65-character Shakespeare vocabulary)."""
    from ch01.chat_template import render_chat

    template = getattr(tok, "chat_template", None)
    text = render_chat(template, ex.prompt_messages(), add_generation_prompt=True) if template else ex.prompt + "\n"
    try:
        return tok.encode(text)
    except ValueError:
        return None


@torch.no_grad()
def score_examples(model, tok, examples: list[Example], max_new_tokens: int = 12, batch_size: int = 32) -> dict:
    """Exact match per task of greedy replies ({task: accuracy, or None when no question fits the tokenizer and the
    context}). Replies stop at the tokenizer's ``eos_id`` (chat models) or, without one, at the first newline."""
    from ch01.generate import generate

    model.eval()
    eos = getattr(tok, "eos_id", None)
    fits = [
        (e, ids)
        for e in examples
        if (ids := _prompt_ids(tok, e)) and len(ids) + max_new_tokens <= model.config.block_size
    ]
    right: dict[str, list[bool]] = {e.task: [] for e in examples}
    for i in range(0, len(fits), batch_size):
        chunk = fits[i : i + batch_size]
        outs = generate(
            model, [ids for _, ids in chunk], max_new_tokens, temperature=0.0, stop_ids=[eos] if eos is not None else []
        )
        for (e, _), out in zip(chunk, outs):
            text = tok.decode([t for t in out if t != eos])
            right[e.task].append(check(e, text if eos is not None else text.split("\n")[0]))
    return {t: (sum(v) / len(v) if v else None) for t, v in right.items()}


def evaluate_tasks(model, tok, n: int = 20, seed: int = 0, max_new_tokens: int = 12, tasks=TASK_NAMES) -> dict:
    """Held-out exact match of any model with our tokenizer interface: ``n`` test questions of each task (default
    difficulty), greedy. Returns {task: accuracy or None, "mean": mean over the tasks that ran (None if none)}."""
    examples = [e for t in tasks for e in make_examples(t, n, "test", seed)]
    acc = score_examples(model, tok, examples, max_new_tokens)
    ran = [v for v in acc.values() if v is not None]
    return {**acc, "mean": sum(ran) / len(ran) if ran else None}


def alphabet() -> str:
    """Every character a prompt or answer of the suite can contain (to extend a character tokenizer)."""
    chars = set("abcdefghijklmnopqrstuvwxyz0123456789 +-=?,.\n)")
    for item in _cloze_items(2, 10**6) + _cloze_items(4, 10**6):
        chars |= set(item[1])
    return "".join(sorted(chars))


def main(argv=None) -> list[dict]:
    from common.bench import markdown_table
    from common.cli import base_parser

    p = base_parser(__doc__, seed=True)
    p.add_argument("--n", type=int, default=2, help="examples per task")
    args = p.parse_args(argv)
    rows = []
    for name in TASK_NAMES:
        for ex in make_examples(name, args.n, "test", seed=args.seed):
            reply = f"The answer is {ex.answer}."
            rows.append(
                {
                    "task": name,
                    "prompt": ex.prompt.replace("\n", " / "),
                    "answer": ex.answer,
                    "checks": check(ex, reply),
                }
            )
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
