"""The capstone pipeline's stages. Each reuses the chapter that teaches it and records what it measured in
``runs/<name>/metrics.json``. ``runs/<name>/stages.json`` holds, per stage, the fingerprint of its inputs (its config
sections + the previous stage's fingerprint, hashed by ``common.data.fingerprint``) and whether it finished: a re-run
skips stages that are up to date (``--force`` redoes them), and training resumes from its checkpoint only when it was
started with the same fingerprint and did not finish.

tokenizer (ch01 BPE) -> data (memmapped token files) -> train (ch01 loop, resumable) -> eval (val loss, samples,
decode speed with ch07's KV cache) -> quantize (ch06 int8 RTN, GGUF Q8_0) -> export (HF via ch01, ONNX via ch08,
GGUF via ch06) -> sft, rl (ch03 SFT and GRPO on verifiable tasks: posttrain.py) -> report (report.md) -> serve
(ch08's OpenAI-compatible server, the post-trained model with its chat template).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ch01.bpe import Tokenizer, train_bpe
from ch01.evaluate import evaluate_loss
from ch01.model import GPT
from ch01.tokenizer import load_tokenizer
from ch10.config import model_config, train_config
from ch10.posttrain import stage_rl, stage_sft
from common.checkpoint import atomic_write
from common.data import SHAKESPEARE_PATH, SHAKESPEARE_SHA256, fingerprint, load_shakespeare, train_val_split
from common.device import pick_device
from common.plot import line_plot

REPO_ROOT = Path(__file__).resolve().parent.parent
STAGES = ["tokenizer", "data", "train", "eval", "quantize", "export", "sft", "rl", "report"]


class Run:
    """Paths, the stage manifest and the metrics file of one run directory."""

    def __init__(self, cfg: dict, root: str | Path | None = None, force: bool = False, progress: bool = True):
        self.cfg, self.force, self.progress = cfg, force, progress
        self.dir = Path(root or REPO_ROOT / "runs") / cfg["name"]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.device = pick_device(cfg["device"])
        self.resumable: dict[str, bool] = {}

    tokenizer_dir = property(lambda self: self.dir / "tokenizer")
    model_dir = property(lambda self: self.dir / "model")
    export_dir = property(lambda self: self.dir / "exports")

    def _read(self, name: str) -> dict:
        path = self.dir / name
        return json.loads(path.read_text()) if path.exists() else {}

    def _write(self, name: str, data: dict) -> None:
        text = json.dumps(data, indent=2, default=str)
        atomic_write(self.dir / name, lambda tmp: Path(tmp).write_text(text))

    # ------------------------------------------------------------------------- the one up-to-date mechanism
    def entry(self, stage: str) -> dict:
        """The stage's manifest entry: {"key": fingerprint of its inputs, "done": finished} ({} if never started)."""
        e = self._read("stages.json").get(stage)
        return e if isinstance(e, dict) else {}

    def key(self, stage: str) -> str:
        """Fingerprint of everything the stage's outputs depend on: its config sections and the previous stage's key
        (which covers every stage before it)."""
        c = self.cfg
        own = {
            "tokenizer": (c["tokenizer"], SHAKESPEARE_SHA256),
            "data": (SHAKESPEARE_SHA256,),
            "train": (c["model"], c["train"], c["seed"], self.device.type),
            "eval": (c["eval"], c["sample"], c["seed"]),
            "quantize": (c["quantize"], c["eval"]),
            "export": (c["eval"],),
            "sft": (c["sft"], c["seed"]),
            "rl": (c["rl"],),
            "report": (),
        }[stage]
        i = STAGES.index(stage)
        return fingerprint(stage, own, self.key(STAGES[i - 1]) if i else None)

    def current(self, stage: str) -> bool:
        """The stage finished with the inputs it has now (whatever ``force`` says)."""
        e = self.entry(stage)
        return e.get("done") is True and e.get("key") == self.key(stage)

    def started(self, stage: str) -> bool:
        """The stage was started (finished or not) with the inputs it has now, and no ``force``."""
        return not self.force and self.entry(stage).get("key") == self.key(stage)

    def up_to_date(self, stage: str) -> bool:
        """The only check of whether a stage must run: finished with the current inputs, and no ``force``."""
        return not self.force and self.current(stage)

    def _set(self, stage: str, done: bool) -> None:
        self._write("stages.json", {**self._read("stages.json"), stage: {"key": self.key(stage), "done": done}})

    def begin(self, stage: str) -> bool:
        """Mark ``stage`` as started with its current inputs. Returns (and keeps in ``self.resumable``) whether it
        had been started with the same inputs and not finished (interrupted): its partial outputs may be continued."""
        self.resumable[stage] = self.started(stage) and not self.entry(stage).get("done")
        self._set(stage, done=False)
        return self.resumable[stage]

    def done(self, stage: str, metrics: dict | None = None) -> None:
        if metrics:
            self._write("metrics.json", {**self._read("metrics.json"), stage: metrics})
        self._set(stage, done=True)

    @property
    def metrics(self) -> dict:
        return self._read("metrics.json")

    # ------------------------------------------------------------------------------------------------ loaders
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_dir)

    def tokens(self, split: str) -> np.ndarray:
        """The split's token ids, memory-mapped (uint16): batches read only their windows from disk."""
        return np.load(self.dir / "data" / f"{split}.npy", mmap_mode="r")

    def eval_ids(self, block_size: int) -> torch.Tensor:
        """The validation ids the eval windows read (consecutive, from the start), as int64: only those leave disk."""
        ev, val = self.cfg["eval"], self.tokens("val")
        if ev["max_batches"] is not None:
            val = val[: ev["max_batches"] * ev["batch_size"] * block_size + 1]
        return torch.from_numpy(val.astype(np.int64))

    def val_loss(self, model) -> float:
        """``ch01.evaluate.evaluate_loss`` on the eval windows: the number every stage reports."""
        ev = self.cfg["eval"]
        return evaluate_loss(model, self.eval_ids(model.config.block_size), ev["batch_size"], ev["max_batches"])

    def model(self) -> GPT:
        return GPT.load(self.model_dir, map_location=str(self.device)).eval()


def stage_tokenizer(run: Run) -> dict:
    tc = run.cfg["tokenizer"]
    t0 = time.perf_counter()
    vocab, merges = train_bpe(SHAKESPEARE_PATH, tc["vocab_size"], tc["special_tokens"])
    seconds = time.perf_counter() - t0
    tok = Tokenizer(vocab, merges, tc["special_tokens"])
    tmp = run.dir / "tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save(tmp)
    shutil.rmtree(run.tokenizer_dir, ignore_errors=True)
    tmp.rename(run.tokenizer_dir)
    return {"vocab_size": tok.vocab_size, "train_seconds": round(seconds, 2)}


def stage_data(run: Run) -> dict:
    text = load_shakespeare()
    ids = np.asarray(run.tokenizer().to_tiktoken().encode_ordinary(text), dtype=np.uint16)
    (run.dir / "data").mkdir(exist_ok=True)
    for split, part in zip(("train", "val"), train_val_split(ids)):
        atomic_write(run.dir / "data" / f"{split}.npy", lambda tmp, p=part: np.save(open(tmp, "wb"), p))
    return {"tokens": int(ids.size), "chars_per_token": round(len(text) / ids.size, 3)}


def stage_train(run: Run) -> dict:
    from ch01.train import train

    tok = run.tokenizer()
    mcfg = model_config(run.cfg, tok.vocab_size, run.device.type)
    ckpt_dir = run.dir / "checkpoints"
    resume = run.resumable.get("train", False) and (ckpt_dir / "ckpt.safetensors").exists()  # interrupted: continue
    if not resume:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        ckpt_dir.mkdir(parents=True)
    tc = train_config(run.cfg, str(ckpt_dir), str(run.device), run.progress)
    res = train(mcfg, tc, run.tokens("train"), run.tokens("val"), resume=resume, tokenizer=tok)
    shutil.rmtree(run.model_dir, ignore_errors=True)
    shutil.copytree(ckpt_dir / "model", run.model_dir)  # self-contained: weights + config + tokenizer
    val = res["val"]
    line_plot(
        {
            "train (per step)": (range(1, len(res["train_losses"]) + 1), res["train_losses"]),
            "val": ([v[0] for v in val], [v[2] for v in val]),
        },
        run.dir / "loss.png",
        marker="",
        title=f"{run.cfg['name']}: mini-GPT on tiny-shakespeare",
        xlabel="iteration",
        ylabel="loss",
    )
    model = res["model"]
    return {
        "params": model.num_params(),
        "iters": tc.max_iters,
        "train_seconds": round(res["train_time_s"], 1),
        "train_tokens_per_s": round(res["tokens_per_s"]),
        "final_val_estimate": val[-1][2],
        "resumed": resume,
        "config": mcfg.to_dict(),
    }


def stage_eval(run: Run) -> dict:
    from ch01.generate import generate
    from ch07.sampling import Sampler

    model, tok, ev, sc = run.model(), run.tokenizer(), run.cfg["eval"], run.cfg["sample"]
    loss = run.val_loss(model)
    prompt = tok.encode(sc["prompt"])
    gen = torch.Generator(device=run.device).manual_seed(run.cfg["seed"])
    sampler = Sampler(temperature=sc["temperature"], top_k=sc["top_k"], top_p=sc["top_p"])
    n_new = min(sc["max_new_tokens"], model.config.block_size - len(prompt))
    out = generate(model, [prompt] * sc["num_samples"], n_new, sampler=sampler, generator=gen)
    samples = [sc["prompt"] + tok.decode(row) for row in out]
    (run.dir / "samples.txt").write_text("\n\n".join(f"--- sample {i} ---\n{s}" for i, s in enumerate(samples)))
    p = run.tokens("val")[: ev["decode_prompt_tokens"]].tolist()
    n = min(ev["decode_tokens"], model.config.block_size - len(p))
    return {
        "val_loss": loss,
        "perplexity": math.exp(loss),
        "decode_tokens_per_s": _decode_speed(model, p, n),
        "decode_new_tokens": n,
        "samples": samples,
        "suite": _suite_row(run, model, tok),
    }


def _suite_row(run: Run, model, tok) -> dict:
    """The capstone model's row of the course's one evaluation table (10_capstone/eval_suite.py): bits per byte,
    the Shakespeare cloze, chapter-03 task exact match (HumanEval does not fit a mini-GPT's context)."""
    from ch01.cloze import build_cloze
    from ch10.eval_suite import bpb_texts, evaluate_model, parse_args

    ev = run.cfg["eval"]
    args = parse_args(["--models", "", "--tasks", str(ev["task_items"]), "--humaneval", "0",
                       "--seed", str(run.cfg["seed"])])  # fmt: skip
    row = evaluate_model(model, tok, args, bpb_texts(ev["bpb_chars"]), build_cloze(ev["cloze_items"]))
    return {k: v for k, v in row.items() if k != "HumanEval pass@1"}


def _decode_speed(model, prompt: list[int], n: int) -> dict:
    """Greedy tokens/s of one prompt without and with ch07's KV cache."""
    from ch07.kv_cache import generate

    speed = {}
    for use_cache in (False, True):
        generate(model, [prompt], 4, use_cache=use_cache)  # warm-up
        t0 = time.perf_counter()
        generate(model, [prompt], n, use_cache=use_cache)
        speed["kv_cache" if use_cache else "no_cache"] = round(n / (time.perf_counter() - t0), 1)
    return speed


def stage_quantize(run: Run) -> dict:
    from ch06.gguf_export import gguf_roundtrip_model
    from ch06.quantize import model_size_bytes, quantize_model

    model = run.model()
    rows = {"fp32": {"bytes": model_size_bytes(model), "val_loss": run.val_loss(model)}}
    if run.cfg["quantize"]["int8"]:
        q = quantize_model(model, "rtn", bits=8)
        rows["int8 (RTN per channel)"] = {"bytes": model_size_bytes(q), "val_loss": run.val_loss(q)}
    if run.cfg["quantize"]["q8_0"]:
        q = gguf_roundtrip_model(model, "q8_0")  # exactly the weights llama.cpp computes with
        rows["GGUF Q8_0"] = {"val_loss": run.val_loss(q)}
    base = rows["fp32"]["val_loss"]
    for r in rows.values():
        r["val_loss_change_pct"] = 100 * (r["val_loss"] - base) / base
    return rows


def stage_export(run: Run) -> dict:
    from ch01.hf_interop import save_hf
    from ch06.gguf_export import export_gguf, gguf_roundtrip_model
    from ch08.export_onnx import export_decode, export_full, ort_session, ort_val_loss

    model, tok, ev = run.model(), run.tokenizer(), run.cfg["eval"]
    out = run.export_dir
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    weights = run.model_dir / "model.safetensors"
    res = {"safetensors": {"path": str(weights), "bytes": weights.stat().st_size}}
    hf_dir = save_hf(model, out / "hf", tok)  # + tokenizer.json: AutoTokenizer and pipeline() work on it
    res["hf"] = {"path": str(hf_dir), "bytes": sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))}
    full, decode = export_full(model, out / "onnx" / "model.onnx"), export_decode(model, out / "onnx" / "decode.onnx")
    val = run.eval_ids(model.config.block_size)
    res["onnx"] = {
        "path": str(full),
        "decode_path": str(decode),
        "bytes": _onnx_bytes(full),
        "val_loss": ort_val_loss(
            ort_session(full), val, model.config.block_size, ev["batch_size"], ev["max_batches"] or 10**9
        ),
    }
    for qtype in ("f16", "q8_0"):
        path = out / f"minigpt-{qtype}.gguf"
        try:
            export_gguf(model, tok, path, qtype, name=f"mini-gpt-{run.cfg['name']}")
        except TypeError as e:  # the GGUF writer has no vocabulary type for this tokenizer
            res[f"gguf_{qtype}"] = {"skipped": str(e)}
            continue
        q = gguf_roundtrip_model(model, qtype)
        res[f"gguf_{qtype}"] = {"path": str(path), "bytes": path.stat().st_size, "val_loss": run.val_loss(q)}
    return res


def _onnx_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.stem))


def stage_report(run: Run) -> dict:
    from ch10.report import write_report

    path = write_report(run)
    return {"path": str(path)}


STAGE_FNS = {
    "tokenizer": stage_tokenizer,
    "data": stage_data,
    "train": stage_train,
    "eval": stage_eval,
    "quantize": stage_quantize,
    "export": stage_export,
    "sft": stage_sft,
    "rl": stage_rl,
    "report": stage_report,
}


def run_stage(run: Run, stage: str) -> dict:
    """Run ``stage`` (and nothing else) unless it is up to date; returns its metrics."""
    if run.up_to_date(stage):
        print(f"[{stage}] up to date (use --force to redo)")
        return run.metrics.get(stage, {})
    missing = [s for s in STAGES[: STAGES.index(stage)] if not run.current(s)]
    if missing:
        raise SystemExit(
            f"stage {stage!r} needs {', '.join(missing)} first (missing or out of date): "
            f"run `minigpt.py {missing[0]}` or `all`"
        )
    print(f"[{stage}] running ...")
    run.begin(stage)
    t0 = time.perf_counter()
    metrics = STAGE_FNS[stage](run)
    metrics["stage_seconds"] = round(time.perf_counter() - t0, 1)
    run.done(stage, metrics)
    print(f"[{stage}] done in {metrics['stage_seconds']} s")
    return metrics
