"""The one tokenizer interface of the course, and loading whichever tokenizer a model directory holds.

Every tokenizer (``CharTokenizer``, the from-scratch byte-level BPE ``ch01.bpe.Tokenizer``, also when built from a GGUF
or a Hugging Face tokenizer.json by ``ch01.gguf_tokenizer``) offers

    encode(text) -> list[int]        decode(ids) -> str        vocab_size -> int
    special_ids -> {token: id}       save(directory) -> Path   Tokenizer.load(directory)

so training, sampling, export and serving take either; chat models' BPE tokenizers also carry ``bos_id``, ``eos_id``
and ``chat_template``. ``load_tokenizer(directory)`` reads what ``save`` (or ``save_hf_tokenizer``) wrote:

    tok = load_tokenizer(".cache/runs/ch01/model")   # tokenizer.json {"type": "char"} or vocab.json + merges.txt (BPE)
    tok = load_tokenizer("hf_checkpoint/")           # Hugging Face tokenizer.json: byte-level BPE or our char layout
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    special_ids: dict[str, int]

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...

    def save(self, directory: str | Path) -> Path: ...


def load_tokenizer(directory: str | Path, chat: bool = True) -> Tokenizer:
    """Our char tokenizer.json, our BPE files (vocab.json + merges.txt with special_tokens.json / bpe_config.json), or a
    Hugging Face tokenizer.json — checked in that order, so a directory holding ours and HF's loads ours. A directory
    written by a post-trained model (chapter 03's ``ChatTokenizer``: chat_tokenizer.json beside the base tokenizer)
    loads as that, with its special tokens and chat template, unless ``chat=False`` (the base tokenizer only)."""
    directory = Path(directory)
    if chat and (directory / "chat_tokenizer.json").exists():
        from ch03.sft import ChatTokenizer  # chapter 03 extends this chapter's tokenizers; imported only when used

        return ChatTokenizer.load(directory)
    hf_file = directory / "tokenizer.json"
    data = json.loads(hf_file.read_text(encoding="utf-8")) if hf_file.exists() else None
    if data is not None and data.get("type") == "char":
        from ch01.char_tokenizer import CharTokenizer

        return CharTokenizer.load(directory)
    has_bpe = (directory / "vocab.json").exists() and (directory / "merges.txt").exists()
    ours = any((directory / f).exists() for f in ("special_tokens.json", "bpe_config.json"))
    if has_bpe and (data is None or ours):  # a HF checkpoint's vocab.json + merges.txt lack its specials: use its json
        from ch01.bpe import Tokenizer as BPETokenizer

        return BPETokenizer.load(directory)
    if data is not None:
        from ch01.gguf_tokenizer import tokenizer_from_hf

        return tokenizer_from_hf(directory)
    raise FileNotFoundError(
        f"{directory} holds no tokenizer: expected tokenizer.json (char or Hugging Face) or vocab.json + merges.txt "
        "(BPE), as written by a tokenizer's save(directory) or ch01.gguf_tokenizer.save_hf_tokenizer"
    )
