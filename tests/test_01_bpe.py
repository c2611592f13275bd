"""ch01.bpe: our byte-level BPE trainer and tokenizer vs tiktoken (same ranks), GPT-2's published files, a naive trainer."""

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ch01.bpe import (
    GPT2_PATTERN,
    Tokenizer,
    bytes_to_unicode,
    chunk_boundaries,
    count_pretokens,
    main,
    merge_pretokens,
    train_bpe,
)
from common.data import load_shakespeare

EOT = "<|endoftext|>"
GPT2_DIR = Path(__file__).resolve().parent.parent / "01_transformer_from_scratch" / "data" / "gpt2"
UNICODE_TEXT = (
    "Café naïve façade — 東京は日本の首都です。北京欢迎你！서울 특별시. Привет, мир! Γειά σου Κόσμε. مرحبا بالعالم "
    "שלום עולם नमस्ते दुनिया สวัสดีชาวโลก\u00a0non-breaking\u3000ideographic space\ttab\r\nCRLF "
    "emoji 👋🏽 👨‍👩‍👧‍👦 🇺🇳 ❤️ 🤖🤖🤖 combining e\u0301 a\u0308 Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇ "
    "numbers 12345 ١٢٣ 一二三 ½ ², contractions: I'm you're we've they'll it's I'd   \n\n\n   spaces  "
)


def _naive_merges(word_counts: dict[bytes, int], num_merges: int) -> list[tuple[bytes, bytes]]:
    """Reference trainer: recount every pair from scratch before each merge, pick max by (count, pair bytes)."""
    words = {tuple(bytes([b]) for b in w): c for w, c in word_counts.items()}
    merges = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new_words: Counter = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    return merges


def _as_bytes(id_merges):
    vocab = {i: bytes([i]) for i in range(256)}
    out = []
    for a, b in id_merges:
        out.append((vocab[a], vocab[b]))
        vocab[len(vocab)] = vocab[a] + vocab[b]
    return out


@pytest.fixture(scope="session")
def shakespeare():
    return load_shakespeare()


@pytest.fixture(scope="session")
def trained(shakespeare, tmp_path_factory):
    """A ~1000-token vocabulary trained on a 300 KB slice (built once per test session)."""
    path = tmp_path_factory.mktemp("bpe") / "slice.txt"
    path.write_text(shakespeare[:300_000], encoding="utf-8")
    vocab, merges = train_bpe(path, 1000, [EOT])
    return Tokenizer(vocab, merges, [EOT])


@pytest.fixture(scope="session")
def trained_unicode(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "unicode.txt"
    path.write_text(UNICODE_TEXT * 3, encoding="utf-8")
    vocab, merges = train_bpe(path, 420, [EOT])
    return Tokenizer(vocab, merges, [EOT])


@pytest.fixture(scope="session")
def gpt2():
    return Tokenizer.from_gpt2_files(GPT2_DIR / "vocab.json", GPT2_DIR / "merges.txt")


# ------------------------------------------------------------------------------------------------------- training


def test_cs336_hand_example_merges_and_tie_breaking():
    # Stanford CS336 (2025) assignment 1, section 2.4's worked example: whitespace-split words with these counts.
    counts = {b"low": 5, b"lower": 2, b"widest": 3, b"newest": 6}
    expected = ["s t", "e st", "o w", "l ow", "w est", "n e", "ne west", "w i", "wi d", "wid est", "low e", "lowe r"]
    merges = _as_bytes(merge_pretokens(counts, 12))
    assert [f"{a.decode()} {b.decode()}" for a, b in merges] == expected


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="aab bc\n'éé🤖", max_size=120), st.integers(1, 40))
def test_incremental_updates_equal_a_full_recount(text, num_merges):
    counts = count_pretokens(text)
    assert _as_bytes(merge_pretokens(counts, num_merges)) == _naive_merges(counts, num_merges)


def test_train_bpe_vocab_layout_and_special_tokens_never_merged(tmp_path):
    path = tmp_path / "docs.txt"
    docs = [load_shakespeare()[i : i + 300] + " <|" for i in range(0, 30_000, 300)]
    path.write_text(f"{EOT}".join(docs), encoding="utf-8")
    vocab, merges = train_bpe(path, 400, [EOT, "<pad>"])
    assert b" <|" in vocab.values()  # the frequent text " <|" right before each special is learned ...
    assert len(vocab) == 400 and len(merges) == 400 - 2 - 256
    assert vocab[0] == EOT.encode() and vocab[1] == b"<pad>"
    assert [vocab[2 + b] for b in range(256)] == [bytes([b]) for b in range(256)]
    assert [vocab[258 + i] for i in range(len(merges))] == [a + b for a, b in merges]
    assert len(set(vocab.values())) == len(vocab)
    assert not any(b"<|<" in t or b"|>" in t or b"end" in t for i, t in vocab.items() if i > 1)  # ... never a special


def test_multiprocessing_gives_the_same_result(tmp_path):
    path = tmp_path / "docs.txt"
    docs = [load_shakespeare()[i : i + 5000] for i in range(0, 60_000, 5000)]
    path.write_text(EOT.join(docs), encoding="utf-8")
    assert train_bpe(path, 400, [EOT], num_processes=2) == train_bpe(path, 400, [EOT])


@pytest.mark.timeout(60)
def test_multiprocessing_with_few_special_tokens(tmp_path):
    path = tmp_path / "one_special.txt"
    text = load_shakespeare()[:20_000]
    path.write_text(text[:12_000] + EOT + text[12_000:], encoding="utf-8")  # ASCII: chars == bytes
    # cuts start at 1/4, 2/4, 3/4 of the file and move forward to the next special token (or the end)
    assert chunk_boundaries(path, 4, EOT.encode()) == [0, 12_000, path.stat().st_size]
    assert train_bpe(path, 320, [EOT], num_processes=4) == train_bpe(path, 320, [EOT])


def test_bad_inputs_raise_clear_errors(tmp_path, trained):
    path = tmp_path / "t.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(path, 100)
    with pytest.raises(FileNotFoundError):
        train_bpe(tmp_path / "missing.txt", 300)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        trained.decode([10**6])
    with pytest.raises(ValueError, match="single-byte"):
        Tokenizer({0: b"a"}, [])


# ------------------------------------------------------------------------------------------- parity with tiktoken


def test_identical_to_tiktoken_on_all_of_tiny_shakespeare(trained, shakespeare):
    enc = trained.to_tiktoken()
    assert trained.encode(shakespeare) == enc.encode(shakespeare, allowed_special="all")
    text = shakespeare[:20_000].replace("\n\n", f"\n\n{EOT}")
    assert trained.encode(text) == enc.encode(text, allowed_special="all")


def test_identical_to_tiktoken_on_unicode_heavy_text(trained, trained_unicode):
    for tok in (trained, trained_unicode):
        assert tok.encode(UNICODE_TEXT) == tok.to_tiktoken().encode(UNICODE_TEXT)
    assert len(trained_unicode.encode(UNICODE_TEXT)) < len(UNICODE_TEXT.encode())  # merges of multi-byte chars learned


def test_gpt2_published_files_match_tiktoken_gpt2(gpt2, shakespeare):
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    vocab = json.loads((GPT2_DIR / "vocab.json").read_text(encoding="utf-8"))
    ranks = {bytes(decoder[c] for c in s): i for s, i in vocab.items() if s != EOT}
    enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256})
    assert gpt2.encode("Hello world") == enc.encode("Hello world") == [15496, 995]
    for text in (shakespeare[:200_000], UNICODE_TEXT, f"a{EOT}b {EOT}"):
        assert gpt2.encode(text) == enc.encode(text, allowed_special="all")
    assert gpt2.special_ids == {EOT: 50256} and len(gpt2.vocab) == 50257


# ---------------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("text", ["", "hello world", "東京は日本の首都", "👋🏽👨‍👩‍👧‍👦", UNICODE_TEXT, f"x{EOT}y{EOT}"])
def test_round_trip_examples(trained, gpt2, text):
    for tok in (trained, gpt2):
        assert tok.decode(tok.encode(text)) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_round_trip_any_text(trained, text):
    assert trained.decode(trained.encode(text)) == text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200))
def test_round_trip_random_bytes(trained, data):
    text = data.decode("utf-8", errors="replace")
    assert trained.decode(trained.encode(text)) == text
    ids = [trained.ranks[bytes([b])] for b in data]  # arbitrary byte tokens: decode replaces invalid UTF-8
    assert trained.decode(ids) == text


def test_decode_replaces_partial_utf8(trained):
    first_byte_of_euro = trained.ranks["€".encode()[:1]]
    assert trained.decode([first_byte_of_euro]) == "\ufffd"


# ------------------------------------------------------------------------------------------------ special tokens


def test_overlapping_special_tokens_match_longest_first(trained):
    vocab, merges = dict(trained.vocab), list(trained.merges)
    tok = Tokenizer(vocab, merges, ["<|a|>", "<|a|><|a|>", EOT])
    one, two = tok.special_ids["<|a|>"], tok.special_ids["<|a|><|a|>"]
    assert one != two and one not in trained.vocab and two not in trained.vocab  # appended to the vocabulary
    ids = tok.encode("x<|a|><|a|><|a|>y <|a|>")
    assert ids == [*tok.encode("x"), two, one, *tok.encode("y "), one]
    assert tok.decode(ids) == "x<|a|><|a|><|a|>y <|a|>"
    assert tok.encode("<|a|") == tok.to_tiktoken().encode("<|a|")  # a partial special is ordinary text


def test_special_token_splits_pretokens(trained):
    assert trained.encode(f"hello{EOT} world") == [*trained.encode("hello"), 0, *trained.encode(" world")]
    no_specials = Tokenizer(trained.vocab, trained.merges)
    assert EOT not in no_specials.special_ids and len(no_specials.encode(EOT)) > 1


# ----------------------------------------------------------------------------------------------- encode_iterable


def test_encode_iterable_on_a_file_equals_encode(trained, shakespeare, tmp_path):
    path = tmp_path / "s.txt"
    text = shakespeare[:50_000]
    path.write_text(text, encoding="utf-8")
    with open(path, encoding="utf-8") as f:
        assert list(trained.encode_iterable(f)) == trained.encode(text)


def test_encode_iterable_is_lazy(trained):
    endless = itertools.cycle(["First Citizen:\n", "Before we proceed any further, hear me speak.\n"])
    assert len(list(itertools.islice(trained.encode_iterable(endless), 500))) == 500


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pieces=st.lists(
        st.sampled_from(["a", "l", "'", " ", "  ", "\n", "\n\n", "ll", "1", "é", "<|", "endoftext", "|>", EOT]),
        max_size=40,
    ),
    cuts=st.lists(st.integers(0, 200), max_size=8),
)
def test_encode_iterable_any_chunking_equals_encode(trained, pieces, cuts):
    text = "".join(pieces)
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert list(trained.encode_iterable(chunks)) == trained.encode(text)


# --------------------------------------------------------------------------------------------------- save / load


def test_save_and_load_readable_files(trained, tmp_path):
    loaded = Tokenizer.load(trained.save(tmp_path / "tok"))
    assert loaded.vocab == trained.vocab and loaded.merges == trained.merges
    assert loaded.special_tokens == [EOT]
    assert loaded.encode(UNICODE_TEXT + EOT) == trained.encode(UNICODE_TEXT + EOT)


def test_save_and_load_tiktoken_rank_file(trained, tmp_path, monkeypatch):
    path = trained.save_tiktoken(tmp_path / "ours.tiktoken")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no caching by path inside tiktoken
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == trained.ranks  # tiktoken's own reader agrees
    loaded = Tokenizer.load_tiktoken(path, trained.special_ids)
    assert loaded.vocab == trained.vocab and loaded.merges == trained.merges  # merges recovered from ranks alone
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not base64 at all\n")
    with pytest.raises(ValueError, match="bad.tiktoken:1"):
        Tokenizer.load_tiktoken(bad)


def test_cli_main_trains_and_round_trips(tmp_path, shakespeare):
    path = tmp_path / "in.txt"
    path.write_text(shakespeare[:20_000], encoding="utf-8")
    out = main(["--input", str(path), "--vocab-size", "300", "--out", str(tmp_path / "tok")])
    assert len(out["vocab"]) == 300
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.decode(out["sample_ids"]).endswith(EOT)
