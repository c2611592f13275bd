"""The bundled tiny-shakespeare corpus, train/val split, batches of (x, y) windows, and a token cache.

Nothing is downloaded: the text ships in ``common/data/`` and its checksum is verified when loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

DATA_DIR = Path(__file__).resolve().parent / "data"
SHAKESPEARE_PATH = DATA_DIR / "tiny_shakespeare.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_CHARS = 1_115_394


def cache_dir(*parts: str) -> Path:
    """Writable cache folder (gitignored): ``$LLM_ROADMAP_CACHE`` or ``<repo>/.cache``; created on demand."""
    root = Path(os.environ.get("LLM_ROADMAP_CACHE", Path(__file__).resolve().parent.parent / ".cache"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fingerprint(*parts, length: int = 12) -> str:
    """A short sha256 of settings: JSON-able values, plus tensors / arrays / modules by their bytes (a model's weights).

    The one "settings -> key" function: a cache entry keyed by it is never reused for different settings."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.nn.Module):
            x = x.state_dict()
        if isinstance(x, dict) and any(isinstance(v, (torch.Tensor, np.ndarray)) for v in x.values()):
            for k in sorted(x):
                h.update(str(k).encode())
                feed(x[k])
        elif isinstance(x, torch.Tensor):
            h.update(
                str((tuple(x.shape), x.dtype)).encode()
                + x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            )
        elif isinstance(x, np.ndarray):
            h.update(str((x.shape, x.dtype)).encode() + np.ascontiguousarray(x).tobytes())
        else:
            h.update(json.dumps(x, sort_keys=True, default=str).encode())

    for part in parts:
        feed(part)
    return h.hexdigest()[:length]


def keyed_cache_dir(*parts: str, key) -> Path:
    """``cache_dir(*parts[:-1], f"{parts[-1]}-{fingerprint(key)}")``: a cache folder per distinct setting."""
    *head, name = parts
    return cache_dir(*head, f"{name}-{fingerprint(key)}")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_shakespeare(verify: bool = True) -> str:
    """The whole tiny-shakespeare text (1,115,394 characters); raises if the bundled file was altered."""
    if verify:
        digest = sha256_file(SHAKESPEARE_PATH)
        if digest != SHAKESPEARE_SHA256:
            raise ValueError(f"{SHAKESPEARE_PATH} is corrupt: sha256 {digest} != expected {SHAKESPEARE_SHA256}")
    return SHAKESPEARE_PATH.read_text(encoding="utf-8")


def train_val_split(data, train_frac: float = 0.9):
    """First 90% for training, last 10% for validation (as nanoGPT); works on str, list, array or tensor."""
    if not 0.0 < train_frac < 1.0:
        raise ValueError(f"train_frac must be in (0, 1), got {train_frac}")
    n = int(len(data) * train_frac)
    return data[:n], data[n:]


def get_batch(
    data, batch_size: int, block_size: int, device: str | torch.device = "cpu", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: x = data[i:i+T], y = data[i+1:i+T+1] (next-token targets), both (B, T) int64."""
    n = len(data)
    if n <= block_size:
        raise ValueError(f"need more than block_size={block_size} tokens, got {n}")
    ix = torch.randint(n - block_size, (batch_size,), generator=generator)
    if isinstance(data, torch.Tensor):
        offsets = torch.arange(block_size + 1)
        windows = data[ix[:, None] + offsets]  # (B, T+1)
    else:
        arr = np.asarray(data)
        idx = ix.numpy()[:, None] + np.arange(block_size + 1)
        windows = torch.from_numpy(arr[idx].astype(np.int64))  # (B, T+1)
    windows = windows.long()
    x, y = windows[:, :-1], windows[:, 1:]
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def cached_tokens(
    name: str, encode: Callable[[str], list[int]], text: str | None = None, dtype=np.uint16
) -> np.ndarray:
    """Encode ``text`` (default: tiny-shakespeare) once and keep it as a memory-mapped ``.npy`` in the cache."""
    path = cache_dir("tokens") / f"{name}.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    ids = np.asarray(encode(load_shakespeare() if text is None else text))
    if ids.size and ids.max() >= np.iinfo(dtype).max:
        raise ValueError(f"token id {ids.max()} does not fit in {np.dtype(dtype).name}")
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, ids.astype(dtype))
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def load_hf_dataset(path: str | Path = SHAKESPEARE_PATH):
    """The corpus as a Hugging Face ``datasets.Dataset`` of lines (local file, no hub access)."""
    from datasets import load_dataset

    return load_dataset("text", data_files=str(path), split="train", cache_dir=str(cache_dir("hf_datasets")))
