"""Our models inside EleutherAI's lm-evaluation-harness: one score, three implementations.

    python 10_capstone/lm_eval_adapter.py                 # char mini-GPT, 40 cloze items: ours vs lm-eval(CourseLM)
    python 10_capstone/lm_eval_adapter.py --model bpe --hf  # + lm-eval's own "hf" backend on our HF export

``CourseLM`` subclasses ``lm_eval.api.model.LM`` and answers the harness's three request types (``loglikelihood``,
``loglikelihood_rolling``, ``generate_until``) with ``ch01.scoring``, so any ch01 ``GPT`` (or anything
``idx -> logits`` with a tokenizer) runs every harness task. ``tasks/shakespeare_cloze.yaml`` is the harness task over
ch01's cloze JSONL (``ch01/cloze.py``); ``write_task`` fills in its data path. The check: ``ch01.scoring.multiple_choice``,
``lm_eval.simple_evaluate(model=CourseLM(...))`` and, with ``--hf``, ``simple_evaluate(model="hf")`` on
``ch01.hf_interop.save_hf``'s export give the same ``acc`` / ``acc_norm``. Everything is local: no hub, no downloads.
Reference: Gao et al., lm-evaluation-harness (github.com/EleutherAI/lm-evaluation-harness), v0.4.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from ch01 import scoring

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

try:
    from lm_eval.api.model import LM
except ImportError:  # the module still imports (for --help and the skip line); CourseLM needs lm-eval
    LM = object

TASK_YAML = Path(__file__).resolve().parent / "tasks" / "shakespeare_cloze.yaml"
MISSING = "lm-evaluation-harness is not installed: pip install lm-eval"


class CourseLM(LM):
    """An lm-eval ``LM`` over a course model and tokenizer (single process, any device)."""

    def __init__(self, model, tokenizer, batch_size: int = 8, block_size: int | None = None):
        if LM is object:
            raise ImportError(MISSING)
        super().__init__()
        self.model, self.tok, self.batch_size, self.block_size = model, tokenizer, batch_size, block_size

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args[:2]) for r in requests]
        return scoring.loglikelihood(self.model, self.tok, pairs, self.batch_size, self.block_size)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        return scoring.loglikelihood_rolling(self.model, self.tok, texts, self.batch_size, self.block_size)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return scoring.generate_until(self.model, self.tok, [(r.args[0], dict(r.args[1])) for r in requests])


def write_task(jsonl: str | Path, directory: str | Path, name: str = "shakespeare_cloze") -> Path:
    """A copy of ``tasks/shakespeare_cloze.yaml`` in ``directory`` that reads ``jsonl`` as task ``name``."""
    import yaml

    cfg = yaml.safe_load(TASK_YAML.read_text(encoding="utf-8"))
    cfg["task"] = name
    cfg["dataset_kwargs"]["data_files"]["test"] = str(Path(jsonl).resolve())
    path = Path(directory) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def lm_eval_scores(lm, jsonl: str | Path, name: str = "shakespeare_cloze", lls: bool = False, **kwargs) -> dict:
    """``{"acc", "acc_norm"}`` of ``lm_eval.simple_evaluate`` on the cloze JSONL; ``lm`` is an ``LM`` or a backend
    name (``"hf"``) with ``model_args`` in ``kwargs``. ``lls`` adds ``"lls"``: each item's choice log-likelihoods."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as d:
        write_task(jsonl, d, name)
        tm = TaskManager(include_path=d, include_defaults=False)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[name], task_manager=tm, num_fewshot=0, bootstrap_iters=0, log_samples=lls, **kwargs
        )
    res = out["results"][name]
    scores = {"acc": res["acc,none"], "acc_norm": res["acc_norm,none"]}
    if lls:
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        scores["lls"] = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    return scores


def hf_scores(model, tok, jsonl: str | Path, batch_size: int = 8, device: str = "cpu", lls: bool = False) -> dict:
    """lm-eval's own ``hf`` backend (transformers ``LlamaForCausalLM``) on our model exported with ``save_hf``."""
    from ch01.hf_interop import save_hf

    with tempfile.TemporaryDirectory() as d:
        save_hf(model, d, tok)
        args = {"pretrained": d, "dtype": "float32", "device": device, "max_length": model.config.block_size}
        args["prefix_token_id"] = scoring.prefix_id(tok)  # the same start token for an empty context as ours
        return lm_eval_scores("hf", jsonl, lls=lls, model_args=args, batch_size=batch_size)


def main(argv=None) -> dict:
    from ch01.cloze import TARGET_DELIMITER, build_cloze, load_model, write_jsonl
    from common.bench import hardware_info, markdown_table
    from common.cli import base_parser
    from common.data import cache_dir
    from common.device import pick_device

    p = base_parser(__doc__, device=True, seed=True)
    p.add_argument("--n", type=int, default=40, help="cloze items")
    p.add_argument("--model", default="char", choices=["char", "bpe", "smollm2"], help="which model to score")
    p.add_argument("--hf", action="store_true", help="also run lm-eval's hf backend on our Hugging Face export")
    args = p.parse_args(argv)
    if LM is object:
        print(MISSING)
        return {"rows": []}
    device = pick_device(args.device)
    loaded = load_model(args.model, "small", 2000, args.seed, device)
    if loaded is None:
        return {"rows": []}
    label, model, tok = loaded
    items = build_cloze(args.n)
    jsonl = write_jsonl(items, cache_dir("cloze") / f"shakespeare_cloze_n{args.n}_seed1234.jsonl")
    ours = scoring.multiple_choice(model, tok, items, target_delimiter=TARGET_DELIMITER)
    rows = [{"implementation": "ch01.scoring.multiple_choice", "acc": ours["acc"], "acc_norm": ours["acc_norm"]}]
    rows.append({"implementation": "lm_eval.simple_evaluate(CourseLM)", **lm_eval_scores(CourseLM(model, tok), jsonl)})
    if args.hf:
        rows.append(
            {
                "implementation": 'lm_eval.simple_evaluate("hf", save_hf export)',
                **hf_scores(model, tok, jsonl, device=str(device)),
            }
        )
    print(f"{label}: {args.n} Shakespeare cloze items; {hardware_info(device)}")
    print(markdown_table(rows, floatfmt=".4f"))
    return {"rows": rows}


if __name__ == "__main__":
    main()
