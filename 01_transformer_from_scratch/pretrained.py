"""A trained char-level mini-GPT on tiny-shakespeare, cached so later chapters (RLHF, quantization, decoding, serving)
start from a real model in seconds instead of retraining it each run.

    from ch01.pretrained import pretrained_char_model
    model, tok, (train_ids, val_ids) = pretrained_char_model("small", max_iters=2000)

The first call trains (``small`` × 2000 iterations ≈ 2 min on a laptop CPU) and saves under ``.cache/pretrained/``;
later calls load the safetensors weights. The cache key covers every setting, so a different request never gets a stale model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json

import torch

from ch01.char_tokenizer import CharTokenizer
from ch01.model import GPT, GPTConfig
from ch01.train import TrainConfig, prepare_data, train
from common.data import cache_dir


def pretrained_char_model(preset: str = "small", max_iters: int = 2000, seed: int = 1337, device: str = "cpu",
                          verbose: bool = True, **config_overrides):
    """(model in eval mode, CharTokenizer, (train_ids, val_ids)) — trained once, then loaded from the cache."""
    tok, train_ids, val_ids = prepare_data("char")
    mcfg = GPTConfig.preset(preset, vocab_size=tok.vocab_size, **config_overrides)
    key = json.dumps({"model": mcfg.to_dict(), "iters": max_iters, "seed": seed}, sort_keys=True)
    run_dir = cache_dir("pretrained", f"{preset}-{max_iters}-{hashlib.sha256(key.encode()).hexdigest()[:10]}")
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
            print(f"training a {mcfg.n_layer}-layer char model for {max_iters} iterations (cached in {run_dir}) ...")
        tc = TrainConfig(max_iters=max_iters, seed=seed, device=device, out_dir=str(run_dir), progress=verbose,
                         warmup_iters=min(100, max_iters // 10), eval_interval=max_iters, ckpt_interval=max_iters + 1)
        model = train(mcfg, tc, train_ids, val_ids, tokenizer=tok)["model"].to(device)
    return model


@torch.no_grad()
def val_loss(model: GPT, val_ids: torch.Tensor, batch_size: int = 32, max_batches: int | None = 20) -> float:
    """Mean next-token loss over consecutive, non-overlapping windows of ``val_ids`` (deterministic, no sampling)."""
    T = model.config.block_size
    device = next(model.parameters()).device
    n_windows = (len(val_ids) - 1) // T
    starts = torch.arange(n_windows) * T
    if max_batches is not None:
        starts = starts[: max_batches * batch_size]
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        s = starts[i: i + batch_size]
        idx = s[:, None] + torch.arange(T + 1)
        w = val_ids[idx].to(device)  # (B, T+1)
        total += model.loss(w[:, :-1], w[:, 1:]).item() * len(s)
        count += len(s)
    return total / count


__all__ = ["pretrained_char_model", "val_loss", "CharTokenizer"]
