"""Synthetic arithmetic word problems with known answers, a matching Python program and a step-by-step rationale.

    from ch09.arith_tasks import make_splits
    train, test = make_splits(n_train=2000, n_test=200, split="numbers", seed=0)
    p = train[0]; p.text, p.answer, p.program, p.rationale

Each template is a sentence with slots for numbers and a formula. From one draw of the numbers we build: the question,
the integer answer, a short program that PAL (Gao et al. 2023) executes to get the answer, and a rationale that STaR
(Zelikman et al. 2022) learns to write before its answer. Two held-out splits:
- ``split="numbers"``: every template in both halves, test number tuples never seen in training (interpolation);
- ``split="template"``: the last ``n_test_templates`` templates only in the test half (new phrasing: much harder).
Everything is deterministic given the seed.

    python 09_advanced_topics/arith_tasks.py --n 5        # print a few problems of every template
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

NAMES = ["tom", "ana", "li", "sam", "eva", "raj", "mia", "ben"]


@dataclass(frozen=True)
class Template:
    text: str  # slots {n} (a name), {a} {b} {c}
    names: tuple[str, str, str]  # program variable names for a, b, c
    formula: str  # Python over a, b, c; the answer
    steps: tuple[str, ...]  # rationale steps, each "expr" over a, b, c and the previous step's value r


TEMPLATES: list[Template] = [
    Template(
        "{n} has {a} apples and buys {b} bags of {c}. apples now?",
        ("apples", "bags", "per_bag"),
        "a + b * c",
        ("b * c", "a + r"),
    ),
    Template(
        "a shop sells {a} pens a day for {b} days, then {c} more. pens sold?",
        ("per_day", "days", "extra"),
        "a * b + c",
        ("a * b", "r + c"),
    ),
    Template(
        "{n} had {a} coins, spent {b} and found {c}. coins now?",
        ("coins", "spent", "found"),
        "a - b + c",
        ("a - b", "r + c"),
    ),
    Template(
        "{a} boxes of {b} eggs, {c} eggs break. eggs left?",
        ("boxes", "per_box", "broken"),
        "a * b - c",
        ("a * b", "r - c"),
    ),
    Template(
        "{a} boys and {b} girls get {c} stickers each. stickers?",
        ("boys", "girls", "each"),
        "(a + b) * c",
        ("a + b", "r * c"),
    ),
    Template(
        "{n} buys {a} shirts at {b} dollars and a hat at {c}. total?",
        ("shirts", "price", "hat"),
        "a * b + c",
        ("a * b", "r + c"),
    ),
    Template(
        "{n} saves {a} a week for {b} weeks, spends {c}. money left?",
        ("per_week", "weeks", "spent"),
        "a * b - c",
        ("a * b", "r - c"),
    ),
    Template(
        "a bus has {a} rows of {b} seats and {c} people stand. people?",
        ("rows", "per_row", "standing"),
        "a * b + c",
        ("a * b", "r + c"),
    ),
]


@dataclass(frozen=True)
class Problem:
    template_id: int
    text: str
    numbers: tuple[int, int, int]
    answer: int
    program: str  # PAL's program, named variables as in Gao et al.: "apples=3\nbags=4\nper_bag=5\nanswer=apples+bags*per_bag"
    expression: str  # the one-line program: "answer=3+4*5"
    rationale: str  # "4*5=20, 3+20=23"


def render(template_id: int, a: int, b: int, c: int, name: str = "tom") -> Problem | None:
    """One problem from a template and its numbers (answer, programs, rationale computed from the formula);
    None when an intermediate value would be negative (no negative coins or eggs)."""
    t = TEMPLATES[template_id]
    env = {"a": a, "b": b, "c": c}
    answer = eval(t.formula, {"__builtins__": {}}, env)  # trusted: our own template formulas, not model output
    r, shown, steps_ok = None, [], True
    for step in t.steps:
        value = eval(step, {"__builtins__": {}}, {**env, "r": r})
        shown.append(f"{_substitute(step, {**env, 'r': r})}={value}")
        steps_ok &= value >= 0
        r = value
    if r != answer:
        raise AssertionError(f"template {template_id}: steps give {r}, formula gives {answer}")
    names = t.names
    expr = _substitute(t.formula, dict(zip("abc", names)))
    program = f"{names[0]}={a}\n{names[1]}={b}\n{names[2]}={c}\nanswer={expr}"
    expression = "answer=" + _substitute(t.formula, env)
    problem = Problem(
        template_id, t.text.format(n=name, a=a, b=b, c=c), (a, b, c), answer, program, expression, ", ".join(shown)
    )
    return problem if steps_ok else None


def _substitute(expr: str, values: dict) -> str:
    """Replace whole-word variables (a, b, c, r) by their values or names, and drop spaces."""
    return re.sub(r"\b[abcr]\b", lambda m: str(values[m.group(0)]), expr).replace(" ", "")


def _draw(rng: random.Random, template_id: int, max_value: int) -> Problem:
    while True:
        a, b, c = (rng.randint(2, max_value) for _ in range(3))
        p = render(template_id, a, b, c, rng.choice(NAMES))
        if p is not None:
            return p


def make_problems(
    n: int, template_ids: list[int] | None = None, max_value: int = 20, seed: int = 0, exclude: set | None = None
) -> list[Problem]:
    """``n`` problems, templates round-robin, numbers in [2, max_value]; skips (template, numbers) in ``exclude``."""
    if n < 0 or max_value < 2:
        raise ValueError(f"need n >= 0 and max_value >= 2, got n={n}, max_value={max_value}")
    ids = list(range(len(TEMPLATES))) if template_ids is None else list(template_ids)
    if not ids or any(not 0 <= i < len(TEMPLATES) for i in ids):
        raise ValueError(f"template ids must be in [0, {len(TEMPLATES)}), got {ids}")
    rng = random.Random(seed)
    exclude = set() if exclude is None else exclude
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct problems with max_value={max_value}; raise max_value")
        p = _draw(rng, ids[len(out) % len(ids)], max_value)
        key = (p.template_id, p.numbers)
        if key not in exclude:
            exclude.add(key)
            out.append(p)
    return out


def make_splits(
    n_train: int, n_test: int, split: str = "numbers", max_value: int = 20, seed: int = 0, n_test_templates: int = 2
) -> tuple[list[Problem], list[Problem]]:
    """(train, test) with no (template, numbers) pair shared; ``split`` = "numbers" or "template" (see module doc)."""
    if split == "numbers":
        train_ids = test_ids = list(range(len(TEMPLATES)))
    elif split == "template":
        if not 0 < n_test_templates < len(TEMPLATES):
            raise ValueError(f"n_test_templates must be in [1, {len(TEMPLATES) - 1}]")
        train_ids = list(range(len(TEMPLATES) - n_test_templates))
        test_ids = list(range(len(TEMPLATES) - n_test_templates, len(TEMPLATES)))
    else:
        raise ValueError(f"split must be 'numbers' or 'template', got {split!r}")
    seen: set = set()
    test = make_problems(n_test, test_ids, max_value, seed=seed * 2 + 1, exclude=seen)
    train = make_problems(n_train, train_ids, max_value, seed=seed * 2, exclude=seen)
    return train, test


def alphabet() -> str:
    """Every character a problem, program, rationale or prompt format can contain (for a CharTokenizer)."""
    chars = set("abcdefghijklmnopqrstuvwxyz0123456789 .,?:=+-*/()_\n#>|")
    for t in TEMPLATES:
        chars |= set(t.text.replace("{", "").replace("}", ""))
    return "".join(sorted(chars))


def main(argv=None) -> list[Problem]:
    from common.bench import markdown_table
    from common.cli import base_parser

    p = base_parser(__doc__, seed=True)
    p.add_argument("--n", type=int, default=1, help="problems per template")
    p.add_argument("--max-value", type=int, default=20)
    args = p.parse_args(argv)
    probs = make_problems(args.n * len(TEMPLATES), max_value=args.max_value, seed=args.seed)
    rows = [
        {
            "template": q.template_id,
            "problem": q.text,
            "answer": q.answer,
            "program": f"`{q.program.replace(chr(10), '; ')}`",
            "expression": f"`{q.expression}`",
            "rationale": q.rationale,
        }
        for q in probs
    ]
    print(markdown_table(rows))
    return probs


if __name__ == "__main__":
    main()
