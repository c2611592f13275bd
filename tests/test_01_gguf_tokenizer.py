"""ch01.gguf_tokenizer: SmolLM2's GGUF vocabulary in our BPE vs Hugging Face tokenizers (built independently from the
same tokens and merges) and llama.cpp, token for token; HF export/import and AutoTokenizer round trips."""

import json

import gguf
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from ch01.bpe import GPT2_PATTERN, SMOLLM_PATTERN, Tokenizer, bytes_to_unicode, train_bpe
from ch01.char_tokenizer import CharTokenizer
from ch01.gguf_tokenizer import (
    gguf_tokenizer_metadata,
    save_hf_tokenizer,
    to_hf_tokenizer,
    tokenizer_from_gguf,
    tokenizer_from_hf,
)
from ch01.tokenizer import load_tokenizer
from common.data import SHAKESPEARE_PATH, load_shakespeare

TEXTS = {
    "shakespeare": load_shakespeare()[:40_000],
    "multilingual": (
        "Voilà l'été : où est le garçon ? Straße, Größe, Übermäßig — schön! 自然语言处理很有趣。"
        "東京は日本の首都です。カタカナとひらがな。Привет, как дела? Ёлка. مرحبا بالعالم، كيف حالك؟"
    ),
    "emoji": "hi 👋🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷🇯🇵 ❤️‍🔥 🧑🏿‍💻 keycap 1️⃣ #️⃣ 🤖🤖🤖 e\u0301 a\u0308",
    "digits": "pi 3.14159265358979 year 2024, 1,000,000 v2.0.1 0x1F 1e-9 ٣٤٥ ½ ² 0000123 9999999999999999999",
    "whitespace": "a  b   c\t\td\n\n\ne \r\n f    \n   \t\n end   \u00a0nbsp\u3000wide  ",
    "specials": "<|im_start|>user\nHi<|im_end|>\n<|endoftext|><|endoftext|>x<file_sep>y <|im_start|>",
    "code": "I'm you're it's we'll DON'T\ndef f(x):\n    return x**2  # 'quoted' \"dq\" {a: [1, 2]}\n",
}
SMALL_TEXTS = {k: v for k, v in TEXTS.items() if k != "shakespeare"}


def _reference_hf(meta: dict):
    """Hugging Face tokenizers built straight from the GGUF strings (none of our code): BPE(vocab, merges),
    Digits(individual) + ByteLevel pre-tokenizer, control tokens as added special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    hf = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    return hf


@pytest.fixture(scope="session")
def meta(smollm2_path):
    return gguf_tokenizer_metadata(gguf.GGUFReader(str(smollm2_path)))


@pytest.fixture(scope="session")
def smol(meta):
    return tokenizer_from_gguf(meta)


@pytest.fixture(scope="session")
def reference(meta):
    return _reference_hf(meta)


@pytest.fixture(scope="session")
def exported(smol):
    return to_hf_tokenizer(smol)


@pytest.fixture(scope="session")
def llama(smollm2_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp parity needs llama-cpp-python (pip install it)")
    return llama_cpp.Llama(model_path=str(smollm2_path), vocab_only=True, verbose=False)


@pytest.fixture(scope="session")
def small_bpe(tmp_path_factory):
    """Our own trained BPE (GPT-2 regex, rank == id) on a 50 KB slice."""
    path = tmp_path_factory.mktemp("bpe") / "corpus.txt"
    path.write_text(load_shakespeare()[:50_000], encoding="utf-8")
    return Tokenizer(*train_bpe(path, 400, ["<|endoftext|>"]), ["<|endoftext|>"])


# ----------------------------------------------------------------------------------------------- the vocabulary


def test_gguf_metadata_becomes_a_chat_tokenizer(smol, meta):
    assert smol.vocab_size == len(smol.vocab) == 49152
    assert (smol.bos_id, smol.eos_id) == (1, 2) and smol.special_ids["<|im_end|>"] == 2
    assert smol.special_ids["<|im_start|>"] == 1 and smol.special_ids["<|endoftext|>"] == 0
    assert len(smol.special_ids) == 17 and smol.pre_tokenizer == "smollm" and smol.rank_by == "merge"
    assert smol.chat_template == meta["tokenizer.chat_template"] and "<|im_start|>" in smol.chat_template
    assert smol.vocab[504] == meta["tokenizer.ggml.tokens"][504].replace("Ġ", " ").encode()  # byte-mapped back


@pytest.mark.parametrize("name", list(TEXTS))
def test_ids_identical_to_hf_tokenizers(smol, reference, exported, name):
    """Ours = HF built independently from the GGUF strings = our HF export; and every text decodes back exactly."""
    text = TEXTS[name]
    ids = smol.encode(text)
    assert ids == reference.encode(text).ids == exported.encode(text).ids
    assert smol.decode(ids) == text == reference.decode(ids, skip_special_tokens=False)


def test_special_tokens_are_matched_whole_and_never_merged(smol):
    ids = smol.encode("<|im_start|>assistant\n<|im_end|><|im_end|>")
    assert ids[0] == 1 and ids[-2:] == [2, 2]
    assert 1 not in smol.encode("<|im_start") and all(i >= 17 for i in smol.encode("im_start im_end 12"))


@pytest.mark.parametrize("name", list(TEXTS))
def test_ids_identical_to_llama_cpp(smol, llama, name):
    text = TEXTS[name]
    assert smol.encode(text) == llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)


MISSING_BYTES = "ab\x04cd \x06\x06 x\x1dy !\x04! ..\x04.."  # SmolLM2 has no token for 0x04, 0x06, 0x1d (21 are missing)


def test_bytes_missing_from_the_vocabulary_are_dropped_like_llama_cpp(smol, llama):
    assert smol.encode(MISSING_BYTES) == llama.tokenize(MISSING_BYTES.encode(), add_bos=False, special=True)
    assert smol.decode(smol.encode(MISSING_BYTES)) == regex.sub("[\x04\x06\x1d]", "", MISSING_BYTES)


def test_hf_drops_a_missing_byte_before_merging_llama_cpp_after(smol, exported):
    """The one known difference of the two references: "!" 0x04 "!" is "!", "!" in llama.cpp (and ours), "!!" in HF."""
    assert smol.encode("!\x04!") == smol.encode("!") * 2 and exported.encode("!\x04!").ids == smol.encode("!!")


# Any text but (1) characters whose UTF-8 holds a byte SmolLM2 lacks (0x04 ..., lead bytes 0xF1/0xF2: planes 4-11) and
# (2) code points unassigned in Python 3.11's Unicode 14 table ("Cn"): the `regex` module's newer tables call ~27k of
# them (Unicode 16/17 additions) letters or digits where HF's and llama.cpp's older tables don't (README: limitations).
ANY_TEXT = st.lists(
    st.one_of(
        st.text(
            st.characters(
                max_codepoint=0x3FFFF, exclude_categories=("Cs", "Cn"), exclude_characters="\x04\x06\x13\x14\x16\x1d"
            ),
            max_size=12,
        ),
        st.sampled_from(["<|im_start|>", "<|im_end|>", " 2024", "\n\n ", "'re", "  "]),
    ),
    max_size=8,
).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=ANY_TEXT)
def test_any_text_identical_to_hf_tokenizers(smol, reference, text):
    ids = smol.encode(text)
    assert ids == reference.encode(text).ids and smol.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(text=ANY_TEXT)
def test_any_text_identical_to_llama_cpp(smol, llama, text):
    assert smol.encode(text) == llama.tokenize(text.encode(), add_bos=False, special=True)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(list("ab1 2\t\n'sé9½٣!?-") + ["  ", "\r\n", "'ll", " 42", "x\u00a0"]), max_size=20))
def test_smollm_regex_equals_digits_then_gpt2_and_hf(parts):
    """One combined regex = llama.cpp's two passes (\\p{N}, then GPT-2's regex between digits) = HF's Sequence."""
    from ch01.gguf_tokenizer import hf_pre_tokenizer

    text = "".join(parts)
    two_pass = [p for seg in regex.split(r"(\p{N})", text) for p in regex.findall(GPT2_PATTERN, seg)]
    assert regex.findall(SMOLLM_PATTERN, text) == two_pass
    dec = {c: b for b, c in bytes_to_unicode().items()}
    hf_pieces = [bytes(dec[c] for c in p).decode() for p, _ in hf_pre_tokenizer("smollm").pre_tokenize_str(text)]
    assert hf_pieces == two_pass


def test_merge_rank_not_token_rank_when_ids_disagree_with_merge_order():
    """A vocabulary whose ids don't follow its merges: tiktoken-style ranking would make "ab"+"c"; HF merges "bc" first."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {i: bytes([i]) for i in range(256)} | {256: b"ab", 257: b"bc", 258: b"abc"}
    merges = [(b"b", b"c"), (b"a", b"b"), (b"a", b"bc")]
    ours = Tokenizer(vocab, merges, rank_by="merge")
    with pytest.raises(ValueError, match="rank_by='merge'"):
        Tokenizer(vocab, merges)  # token rank: ids must grow with merge order
    enc = bytes_to_unicode()
    hf = HFTokenizer(
        models.BPE({"".join(enc[b] for b in t): i for i, t in vocab.items()}, [("b", "c"), ("a", "b"), ("a", "bc")])
    )
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    for text in ["abc", "ab", "abcabc bcab", "aabbcc"]:
        assert ours.encode(text) == hf.encode(text).ids
    assert ours.encode("abc") == [258]  # via (b, c) then (a, bc); token rank would stop at [ab, c]


# -------------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trips_everything(smol, tmp_path):
    smol.save(tmp_path)
    back = Tokenizer.load(tmp_path)
    assert back.config() == smol.config() and back.special_ids == smol.special_ids and back.vocab == smol.vocab
    text = TEXTS["digits"] + TEXTS["specials"]
    assert back.encode(text) == smol.encode(text) and load_tokenizer(tmp_path).encode(text) == smol.encode(text)


def test_directories_saved_before_bpe_config_still_load(small_bpe, tmp_path):
    small_bpe.save(tmp_path)
    (tmp_path / "bpe_config.json").unlink()
    back = load_tokenizer(tmp_path)
    assert back.config() == small_bpe.config() and back.encode(TEXTS["code"]) == small_bpe.encode(TEXTS["code"])


def test_bad_gguf_raises_one_clear_error(tmp_path):
    for model, pre, needle in [("llama", "smollm", "tokenizer.ggml.model is 'llama'"), ("gpt2", "qwen2", "'qwen2'")]:
        path = tmp_path / f"{model}-{pre}.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_tokenizer_model(model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(["a", "b"])
        writer.add_token_merges([])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with pytest.raises(ValueError, match=regex.escape(needle)):
            tokenizer_from_gguf(path)


def test_our_bpe_written_as_gguf_reads_back_with_the_same_ids(small_bpe, tmp_path):
    """Our trained BPE as a llama.cpp "gpt2" vocab (pre "gpt-2"), then read back: merge rank gives token rank's ids."""
    enc = bytes_to_unicode()
    show = lambda t: "".join(enc[b] for b in t)
    special = set(small_bpe.special_ids.values())
    writer = gguf.GGUFWriter(str(tmp_path / "bpe.gguf"), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list([t.decode() if i in special else show(t) for i, t in sorted(small_bpe.vocab.items())])
    writer.add_token_types([3 if i in special else 1 for i in sorted(small_bpe.vocab)])
    writer.add_token_merges([f"{show(a)} {show(b)}" for a, b in small_bpe.merges])
    writer.add_eos_token_id(small_bpe.special_ids["<|endoftext|>"])
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    back = tokenizer_from_gguf(tmp_path / "bpe.gguf")
    assert (back.pre_tokenizer, back.rank_by, back.eos_id, back.bos_id) == ("gpt-2", "merge", 0, None)
    for text in [load_shakespeare()[:100_000], *SMALL_TEXTS.values()]:
        assert back.encode(text) == small_bpe.encode(text)


# ---------------------------------------------------------------------------------------- Hugging Face export


def _auto(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def test_autotokenizer_loads_smollm2_export(smol, tmp_path):
    save_hf_tokenizer(smol, tmp_path, model_max_length=8192)
    auto = _auto(tmp_path)
    for text in SMALL_TEXTS.values():
        assert auto(text)["input_ids"] == smol.encode(text)
        assert auto.decode(smol.encode(text)) == text
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id, len(auto)) == (1, 2, 2, 49152)
    assert auto.model_max_length == 8192 and auto.chat_template == smol.chat_template
    back = load_tokenizer(tmp_path)  # no vocab.json here: read from the HF tokenizer.json
    assert back.config() == smol.config() and back.encode(TEXTS["emoji"]) == smol.encode(TEXTS["emoji"])


def test_autotokenizer_loads_our_trained_bpe(small_bpe, tmp_path):
    save_hf_tokenizer(small_bpe, tmp_path)
    auto = _auto(tmp_path)
    text = load_shakespeare()[50_000:70_000] + SMALL_TEXTS["multilingual"] + "<|endoftext|>" + SMALL_TEXTS["emoji"]
    assert auto(text)["input_ids"] == small_bpe.encode(text) and auto.decode(small_bpe.encode(text)) == text
    assert auto.eos_token == "<|endoftext|>" and auto.convert_tokens_to_ids("<|endoftext|>") == 0
    small_bpe.save(tmp_path)  # ours and HF's side by side: load_tokenizer prefers ours (token rank, as trained)
    assert load_tokenizer(tmp_path).config() == small_bpe.config()


def test_autotokenizer_loads_our_char_tokenizer(tmp_path):
    tok = CharTokenizer.from_text(SHAKESPEARE_PATH.read_text(encoding="utf-8"))
    save_hf_tokenizer(tok, tmp_path)
    auto = _auto(tmp_path)
    text = "ROMEO:\nO, she doth teach the torches  to burn bright!\n\n"
    assert auto(text)["input_ids"] == tok.encode(text) and auto.decode(tok.encode(text)) == text
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "WordLevel"
    back = load_tokenizer(tmp_path)
    assert isinstance(back, CharTokenizer) and back.chars == tok.chars
    tok.save(tmp_path)  # our own {"type": "char"} tokenizer.json still loads
    assert isinstance(load_tokenizer(tmp_path), CharTokenizer)


def test_reads_a_hugging_face_tokenizer_json_written_by_tokenizers(meta, smol, tmp_path):
    """A checkpoint directory as HF writes it (tokenizer.json from the reference, not from our exporter)."""
    _reference_hf(meta).save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "chat_template": "{{ 1 }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    back = tokenizer_from_hf(tmp_path)
    assert (back.bos_id, back.eos_id, back.chat_template, back.pre_tokenizer) == (1, 2, "{{ 1 }}", "smollm")
    for text in SMALL_TEXTS.values():
        assert back.encode(text) == smol.encode(text)


def test_script_reports_same_ids_as_the_references(smollm2_path, tmp_path):
    from ch01.gguf_tokenizer import main

    out = main(["--gguf", str(smollm2_path), "--repeats", "1", "--chars", "5000", "--out", str(tmp_path)])
    assert all(row["= HF"] is True and row["= llama.cpp"] in (True, "—") for row in out["samples"])
    assert {r["name"] for r in out["speed"]} >= {"ours (cold cache)", "HF tokenizers (Rust)"}
    assert load_tokenizer(tmp_path).encode("12 ab") == out["tokenizer"].encode("12 ab")
