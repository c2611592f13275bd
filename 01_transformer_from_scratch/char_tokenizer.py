"""Character-level tokenizer: one id per distinct character (65 for tiny-shakespeare), as in nanoGPT's shakespeare_char.

tok = CharTokenizer.from_text(load_shakespeare())
tok.decode(tok.encode("ROMEO:")) == "ROMEO:"
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class CharTokenizer:
    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer needs distinct characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this tokenizer's vocabulary") from None

    def encode_array(self, text: str) -> np.ndarray:
        """Vectorised encode for whole corpora (a lookup table over code points)."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = np.full(max(map(ord, self.chars)) + 1, -1, dtype=np.int64)
        table[[ord(c) for c in self.chars]] = np.arange(len(self.chars))
        ids = table[np.minimum(codes, len(table) - 1)]
        if (ids < 0).any() or (codes >= len(table)).any():
            bad = next(c for c in text if c not in self.stoi)
            raise ValueError(f"character {bad!r} is not in this tokenizer's vocabulary")
        return ids.astype(np.uint16)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    special_ids: dict[str, int] = {}  # no special tokens (ch01/tokenizer.py's interface)

    def save(self, directory: str | Path) -> Path:
        """``directory/tokenizer.json`` = {"type": "char", "chars": ...}; returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.json").write_text(json.dumps({"type": "char", "chars": self.chars}))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> CharTokenizer:
        path = Path(directory)
        path = path / "tokenizer.json" if path.is_dir() else path
        data = json.loads(path.read_text())
        if data.get("type") != "char":
            raise ValueError(f"{path} is not a char tokenizer file")
        return cls(data["chars"])
