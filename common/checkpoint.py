"""Checkpoints without pickle: one safetensors file holding weights, optimizer tensors and RNG states, plus JSON metadata.

Writes are atomic (temp file + ``os.replace``) so a crash mid-write leaves the previous checkpoint intact,
and a truncated or corrupt file raises :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file


class CheckpointError(RuntimeError):
    pass


def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move every tensor inside a nested dict/list into ``tensors`` and leave a JSON-able placeholder."""
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [_split_tensors(k, f"{prefix}.k{i}", tensors), _split_tensors(v, f"{prefix}.{i}", tensors)]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, (list, tuple)):
        items = [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, np.ndarray):
        return _split_tensors(torch.from_numpy(obj.copy()), prefix, tensors) | {"__numpy__": True}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint (at {prefix})")


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            t = tensors[obj["__tensor__"]]
            return t.numpy() if obj.get("__numpy__") else t
        if "__dict__" in obj:
            return {_join_tensors(k, tensors): _join_tensors(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_join_tensors(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename over ``path``: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer=None,
    scheduler=None,
    step: int = 0,
    extra: dict | None = None,
    include_rng: bool = True,
) -> Path:
    """Save model (+ optimizer, scheduler, RNG states, step, ``extra`` JSON) atomically to one safetensors file."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, torch.Size], str] = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        key = (t.data_ptr(), t.shape)
        # safetensors refuses tensors that share memory (tied weights): store a copy
        tensors[f"model.{name}"] = t.clone() if key in seen else t
        seen[key] = name
    meta = {
        "step": int(step),
        "optimizer": _split_tensors(optimizer.state_dict(), "optim", tensors) if optimizer is not None else None,
        "scheduler": _split_tensors(scheduler.state_dict(), "sched", tensors) if scheduler is not None else None,
        "rng": _split_tensors(rng_state(), "rng", tensors) if include_rng else None,
        "extra": extra or {},
    }
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"llm_roadmap": json.dumps(meta)}))


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors and the metadata dict of a checkpoint; raises CheckpointError for missing/corrupt files."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("llm_roadmap", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated/garbled headers
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {e}") from e
    if meta is None:
        raise CheckpointError(f"{path} is a safetensors file but not an llm-roadmap checkpoint (no metadata)")
    return tensors, meta


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module | None = None,
    optimizer=None,
    scheduler=None,
    restore_rng: bool = True,
    strict: bool = True,
) -> dict:
    """Restore what was saved into the given objects; returns the metadata (``step``, ``extra``, ...)."""
    tensors, meta = read_checkpoint(path)
    if model is not None:
        state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            model.load_state_dict(state, strict=strict)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {path} does not fit this model: {e}") from e
    if optimizer is not None:
        if meta["optimizer"] is None:
            raise CheckpointError(f"checkpoint {path} holds no optimizer state")
        optimizer.load_state_dict(_join_tensors(meta["optimizer"], tensors))
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(_join_tensors(meta["scheduler"], tensors))
    if restore_rng and meta["rng"] is not None:
        set_rng_state(_join_tensors(meta["rng"], tensors))
    return meta
