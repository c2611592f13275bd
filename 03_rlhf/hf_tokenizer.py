"""A Hugging Face ``PreTrainedTokenizerFast`` for our character vocabulary, built locally with ``tokenizers`` (no hub).

    hf_tok = hf_char_tokenizer(tok)          # tok: ch01 CharTokenizer
    hf_tok("ROMEO:")["input_ids"] == tok.encode("ROMEO:")

TRL's trainers need a tokenizer with pad/eos tokens. The char model has no spare id, so we reuse its rarest character
``$`` (once in tiny-shakespeare) as end-of-text and padding: the pretrained model practically never samples it, and
TRL appends it to completions, so every method sees the same extra token.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS_CHAR = "$"


def hf_char_tokenizer(tok, eos_char: str = EOS_CHAR) -> PreTrainedTokenizerFast:
    if eos_char not in tok.stoi:
        raise ValueError(f"{eos_char!r} is not in the vocabulary; pick another rare character as end-of-text")
    core = Tokenizer(models.WordLevel(vocab=dict(tok.stoi), unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character is a token
    core.decoder = decoders.Fuse()  # join characters back without spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=eos_char, pad_token=eos_char, clean_up_tokenization_spaces=False
    )
    fast.model_max_length = 1_000_000
    return fast


def check_roundtrip(hf_tok, tok, text: str) -> bool:
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    return ids == tok.encode(text) and hf_tok.decode(ids) == text
