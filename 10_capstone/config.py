"""The capstone's one config: a TOML file (``configs/<name>.toml`` or any path) merged over defaults and validated.

Sections: ``[tokenizer]`` (BPE vocab size), ``[model]`` (a ch01 preset plus GPTConfig overrides), ``[train]`` (ch01
TrainConfig fields), ``[eval]``, ``[sample]``, ``[quantize]``, ``[serve]``. Unknown keys are errors, so a typo never
silently trains the wrong model.
"""

from __future__ import annotations

import copy
import tomllib  # Python >= 3.11 (pyproject's requires-python)
from dataclasses import fields
from pathlib import Path

from ch01.model import GPTConfig
from ch01.train import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "cpu-demo"

DEFAULTS: dict = {
    "name": DEFAULT_CONFIG,
    "device": "auto",
    "seed": 1337,
    "tokenizer": {"vocab_size": 512, "special_tokens": ["<|endoftext|>"]},
    "model": {"preset": "small", "attn_impl": "auto"},
    "train": {},
    "eval": {
        "max_batches": None,
        "batch_size": 32,
        "decode_tokens": 100,
        "decode_prompt_tokens": 16,
        "bpb_chars": 4000,  # held-out Shakespeare and README prose for bits per byte (10_capstone/eval_suite.py)
        "cloze_items": 100,  # ch01's Shakespeare next-line multiple choice
        "task_items": 10,  # held-out items per chapter-03 task (0: skip)
    },
    "sample": {
        "prompt": "ROMEO:\n",
        "max_new_tokens": 200,
        "temperature": 0.8,
        "top_k": 50,
        "top_p": None,
        "num_samples": 3,
    },
    "quantize": {"int8": True, "q8_0": True},
    # post-training (10_capstone/posttrain.py, chapter 03): SFT on verifiable tasks, then GRPO on them
    "sft": {
        "enabled": True,
        "tasks": ["add", "sub"],  # chapter 03's task suite: add, sub, count, reverse, sort, cloze
        "digits": 2,  # operand digits of add / sub
        "n_train": 3000,  # training examples per task
        "n_test": 50,  # held-out examples per task (accuracy after every stage)
        "iters": 450,  # cpu-demo: 300 -> 7% held-out, 450 -> 48%, 600 -> 100% (README "Measured")
        "lr": 3e-3,
        "batch_size": 16,
        "replay_rows": 4,  # + rows of pretraining text per batch (0: none; the model then forgets Shakespeare)
    },
    "rl": {
        "enabled": True,
        "tasks": [],  # tasks GRPO trains on (empty: all of sft.tasks)
        "steps": 60,
        "prompts_per_step": 16,
        "group_size": 8,
        "max_new_tokens": 10,
        "lr": 3e-5,
        "beta": 0.04,  # KL coefficient
        "dr_grpo": False,
    },
    "serve": {"host": "127.0.0.1", "port": 8000, "max_batch": 16},
}
_MODEL_KEYS = {f.name for f in fields(GPTConfig)} | {"preset"}
_TRAIN_KEYS = {f.name for f in fields(TrainConfig)} - {"out_dir", "device", "seed", "progress"}


class ConfigError(ValueError):
    pass


def _merge(base: dict, override: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in base:
            raise ConfigError(f"unknown config key {where}{key!r}")
        if isinstance(base[key], dict) and base[key] and not isinstance(value, dict):
            raise ConfigError(f"config key {where}{key!r} must be a table")
        out[key] = _merge(base[key], value, f"{where}{key}.") if isinstance(value, dict) and base[key] else value
    return out


def load_config(name_or_path: str | Path = DEFAULT_CONFIG) -> dict:
    """Read a config by name (``configs/NAME.toml``) or path, merged over DEFAULTS; raises ConfigError if invalid."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
        raise ConfigError(f"config {str(name_or_path)!r} not found (built in: {known}; or pass a .toml path)")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e
    model, train = raw.get("model", {}), raw.get("train", {})
    bad = (set(model) - _MODEL_KEYS) | (set(train) - _TRAIN_KEYS)
    if bad:
        raise ConfigError(f"{path}: unknown model/train keys {sorted(bad)}")
    base = copy.deepcopy(DEFAULTS)
    base["model"] = {**base["model"], **{k: None for k in model}}
    base["train"] = {k: None for k in train}
    cfg = _merge(base, raw)
    cfg["path"] = str(path)
    if cfg["tokenizer"]["vocab_size"] < 256 + len(cfg["tokenizer"]["special_tokens"]):
        raise ConfigError("tokenizer.vocab_size must be at least 256 + the number of special tokens")
    return cfg


def model_config(cfg: dict, vocab_size: int, device_type: str) -> GPTConfig:
    m = dict(cfg["model"])
    preset = m.pop("preset")
    if m.get("attn_impl") == "auto":  # the Triton kernel only pays off where it compiles: on a CUDA GPU
        triton_ok = device_type == "cuda" and not m.get("mla_kv_rank")  # MLA's q/k and v head sizes differ
        m["attn_impl"] = "flash_triton" if triton_ok else "sdpa"
    return GPTConfig.preset(preset, vocab_size=vocab_size, **m)


def train_config(cfg: dict, out_dir: str, device: str, progress: bool = True) -> TrainConfig:
    return TrainConfig(**cfg["train"], out_dir=out_dir, device=device, seed=cfg["seed"], progress=progress)
