"""ch09 arithmetic tasks (deterministic, answers right, splits disjoint) and the PAL pipeline on a tiny budget."""

from __future__ import annotations

import ast

import pytest
import torch

from ch09.arith_tasks import TEMPLATES, alphabet, make_problems, make_splits, render
from ch09.sandbox import run_many, unavailable_reason
from ch09.seq2seq import encode_pairs, finetune, greedy_complete, task_model, task_tokenizer

needs_sandbox = pytest.mark.skipif(
    unavailable_reason() is not None, reason=f"chapter 09 sandbox unavailable: {unavailable_reason()}"
)


def _safe_eval(expr: str) -> int:
    """An independent calculator (AST walk, + - * and parentheses only) to check the generator's answers."""
    ops = {ast.Add: int.__add__, ast.Sub: int.__sub__, ast.Mult: int.__mul__}

    def ev(n):
        if isinstance(n, ast.Constant):
            return n.value
        if isinstance(n, ast.BinOp):
            return ops[type(n.op)](ev(n.left), ev(n.right))
        raise ValueError(ast.dump(n))

    return ev(ast.parse(expr, mode="eval").body)


def test_generator_is_deterministic_by_seed():
    assert make_problems(50, seed=3) == make_problems(50, seed=3)
    assert make_problems(50, seed=3) != make_problems(50, seed=4)
    assert make_splits(100, 20, seed=1) == make_splits(100, 20, seed=1)


def test_answers_programs_and_rationales_agree():
    probs = make_problems(400, seed=0, max_value=30)
    for p in probs:
        a, b, c = p.numbers
        assert all(str(n) in p.text for n in p.numbers)
        assert _safe_eval(p.expression.removeprefix("answer=")) == p.answer >= 0
        env: dict = {}
        exec(p.program, {"__builtins__": {}}, env)  # our own generated program (trusted), not model output
        assert env["answer"] == p.answer
        steps = [s.split("=") for s in p.rationale.split(", ")]
        for expr, value in steps:  # every rationale step is arithmetically right and ends in the answer
            assert _safe_eval(expr) == int(value) >= 0
        assert int(steps[-1][1]) == p.answer
    assert {p.template_id for p in probs} == set(range(len(TEMPLATES)))
    assert set("".join(p.text + p.program + p.rationale for p in probs)) <= set(alphabet())


def test_splits_are_disjoint_and_template_split_holds_out_templates():
    train, test = make_splits(500, 100, "numbers", seed=0)
    assert not {(p.template_id, p.numbers) for p in train} & {(p.template_id, p.numbers) for p in test}
    train, test = make_splits(300, 50, "template", seed=0, n_test_templates=2)
    assert {p.template_id for p in test} == {len(TEMPLATES) - 2, len(TEMPLATES) - 1}
    assert not {p.template_id for p in train} & {p.template_id for p in test}
    with pytest.raises(ValueError, match="split must be"):
        make_splits(10, 10, "random")
    assert render(2, 3, 9, 4) is None  # 3 - 9 < 0: no negative coins


@needs_sandbox
def test_generated_programs_run_in_the_sandbox():
    probs = make_problems(16, seed=5)
    res = run_many([p.program for p in probs] + [p.expression for p in probs], workers=4)
    assert [r.answer for r in res] == [p.answer for p in probs] * 2


def test_encode_pairs_masks_the_prompt():
    tok = task_tokenizer()
    x, y = encode_pairs(tok, [("ab?", "12"), ("a?", "3")], block_size=32)
    assert tok.decode(x[0, :6].tolist()) == "ab?>12"
    assert (y[0, :3] == -100).all() and tok.decode(y[0, 3:6].tolist()) == "12|"
    assert (y[1, :2] == -100).all() and tok.decode(y[1, 2:4].tolist()) == "3|" and (y[1, 4:] == -100).all()


@pytest.mark.timeout(120)
def test_finetune_learns_and_batched_greedy_matches_unbatched_generate():
    torch.manual_seed(0)
    tok = task_tokenizer()
    model = task_model(tok, n_layer=1, n_embd=32, block_size=96)
    pairs = [(p.text, p.expression) for p in make_problems(64, seed=0)]
    losses = finetune(model, tok, pairs, iters=40, batch_size=16, lr=3e-3)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5  # it learns the format
    prompts = [p for p, _ in pairs[:4]]  # different lengths: a ragged batch, each row at its own positions in the cache
    batched = greedy_complete(model, tok, prompts, max_new_tokens=12)
    for prompt, out in zip(prompts, batched):
        ids = torch.tensor([tok.encode(prompt + ">")])
        ref = tok.decode(model.generate(ids, 12, temperature=0)[0, ids.shape[1] :].tolist()).split("|")[0]
        assert out == ref


@pytest.mark.timeout(120)
def test_seq2seq_losses_and_completions_are_pinned(one_thread):
    """Values recorded with the pre-refactor code (left padding + key-padding mask, its own decode loop): moving the
    decoding onto ch01's ``generate`` kept every loss and every completion, greedy or sampled, batched or not."""
    tok = task_tokenizer()
    probs = make_problems(40, seed=0)
    torch.manual_seed(0)
    model = task_model(tok, n_layer=2, n_embd=64, n_head=4, block_size=128)
    losses = finetune(model, tok, [(p.text, str(p.answer)) for p in probs], iters=150, batch_size=8, lr=3e-3, seed=0)
    assert losses[:4] == pytest.approx([3.968893, 3.95085, 3.918013, 3.823152], abs=1e-5)
    prompts = [p.text for p in probs[:6]]  # 45 to 64 characters: a ragged batch
    greedy = ["117", "20", "24", "206", "204", "59"]
    assert greedy_complete(model, tok, prompts, 12) == greedy
    assert greedy_complete(model, tok, prompts, 12, batch_size=2) == greedy
    sampled = greedy_complete(model, tok, prompts[:3], 12, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert sampled == ["117", "20", "2416"]


@needs_sandbox
def test_pal_scoring_runs_programs_in_the_sandbox(monkeypatch):
    import ch09.pal as pal

    probs = make_problems(4, seed=9)
    outputs = [probs[0].expression, "import os\nanswer=1", "answer=1/0", f"answer={probs[3].answer}"]
    monkeypatch.setattr(pal, "greedy_complete", lambda model, tok, prompts, max_new: outputs)
    ev = pal.evaluate(None, None, probs, "pal", max_new_tokens=8)
    assert ev["correct"] == [True, False, False, True] and ev["accuracy"] == 0.5 and ev["valid"] == 0.5
    monkeypatch.setattr(pal, "greedy_complete", lambda model, tok, prompts, max_new: [str(probs[0].answer), "x"] * 2)
    ev = pal.evaluate(None, None, probs, "direct", max_new_tokens=8)
    assert ev["correct"][0] and not any(ev["correct"][1:2]) and ev["valid"] == 0.5
