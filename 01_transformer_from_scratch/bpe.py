"""Byte-level BPE from scratch: train a vocabulary, encode and decode text, and agree with tiktoken token for token.

Training (Sennrich et al. 2016, byte-level as in GPT-2, Radford et al. 2019): start from the 256 byte values, then
repeatedly merge the most frequent adjacent pair into a new token. Text is first split on special tokens (no merge crosses
them), then cut into pre-tokens by GPT-2's regex (no merge crosses a word/space/punctuation boundary either). Only the
*unique* pre-tokens are kept, with their counts, and the pair counts are updated incrementally after each merge: only
the pre-tokens that contain the merged pair are touched (an index pair -> pre-tokens finds them) and a heap with lazy
deletion yields the next most frequent pair. Ties go to the lexicographically greatest pair of byte strings.

Encoding (what tiktoken does): pre-tokenize, then inside each pre-token merge the adjacent pair whose concatenation has
the lowest rank (= token id, = merge order) until none is in the vocabulary. Results are cached per pre-token.
A vocabulary published with its merges list (Hugging Face tokenizers, llama.cpp's GGUF "gpt2" vocab, e.g. SmolLM2) is
encoded the way Sennrich's BPE defines it instead: ``rank_by="merge"`` joins the adjacent pair that comes first in the
merges list — token ids need not follow merge order there (see gguf_tokenizer.py).

Run:  python 01_transformer_from_scratch/bpe.py --vocab-size 512       (trains on tiny-shakespeare, shows an encoding)
Refs: Sennrich, Haddow & Birch 2016 (BPE for NMT); Radford et al. 2019 (GPT-2 byte-level BPE); tiktoken; Karpathy minbpe.
"""

from __future__ import annotations

import base64
import gc
import heapq
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import regex

from common.cli import base_parser
from common.data import SHAKESPEARE_PATH

# GPT-2's pre-tokenizer: contractions, optional space + letters, optional space + digits, optional space + other symbols,
# whitespace not followed by a non-space (so " word" keeps its leading space), remaining whitespace.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_PRETOKEN_RE = regex.compile(GPT2_PATTERN)
# llama.cpp's "smollm" pre-tokenizer (llama-vocab.cpp: regexes "\p{N}" then GPT-2's; Hugging Face: Sequence[Digits(
# individual_digits=True), ByteLevel]): every digit is a pre-token of its own, GPT-2's regex runs on the text between.
# As one regex: digits match alone, " ?\p{N}+" is gone, and the whitespace look-ahead treats a digit like the end of text.
SMOLLM_PATTERN = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
PRE_TOKENIZERS = {"gpt-2": GPT2_PATTERN, "smollm": SMOLLM_PATTERN}  # keyed by GGUF's tokenizer.ggml.pre names


def _special_splitter(special_tokens: Iterable[str]) -> regex.Pattern | None:
    """A regex that captures special tokens, longest first, so "<|a|><|a|>" wins over "<|a|>" where both match."""
    specials = sorted(set(special_tokens), key=len, reverse=True)
    return regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")") if specials else None


# ------------------------------------------------------------------------------------------------------- training


def count_pretokens(text: str, special_tokens: Iterable[str] = ()) -> Counter[bytes]:
    """How often each pre-token (as UTF-8 bytes) occurs; special tokens are cut out and never counted."""
    splitter = _special_splitter(special_tokens)
    specials = set(special_tokens)
    counts: Counter[str] = Counter()
    for segment in splitter.split(text) if splitter else [text]:
        if segment and segment not in specials:
            counts.update(_PRETOKEN_RE.findall(segment))
    return Counter({word.encode("utf-8"): n for word, n in counts.items()})


def _count_file_range(args: tuple[str, int, int, tuple[str, ...]]) -> Counter[bytes]:
    path, start, end, special_tokens = args
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read(end - start).decode("utf-8", errors="replace")
    return count_pretokens(text, special_tokens)


def chunk_boundaries(path: str | Path, n_chunks: int, split_token: bytes) -> list[int]:
    """Byte offsets that cut the file into ~n_chunks pieces, each cut placed at the start of ``split_token``."""
    size = os.path.getsize(path)
    bounds = [size * i // n_chunks for i in range(n_chunks)] + [size]
    with open(path, "rb") as f:
        for i in range(1, n_chunks):
            f.seek(bounds[i])
            pos = bounds[i]
            while True:  # scan forward to the next special token (or the end of the file)
                block = f.read(1 << 16)
                if not block:
                    bounds[i] = size
                    break
                hit = block.find(split_token)
                if hit >= 0:
                    bounds[i] = pos + hit
                    break
                if len(block) < 1 << 16:  # reached the end without another special token
                    bounds[i] = size
                    break
                pos += len(block) - len(split_token) + 1
                f.seek(pos)
    return sorted(set(bounds))


def merge_pretokens(word_counts: dict[bytes, int], num_merges: int, first_id: int = 0) -> list[tuple[int, int]]:
    """The BPE merge loop on pre-token counts. Token ids: bytes are ``first_id + b``, merge i makes ``first_id+256+i``.

    Returns the merges as id pairs. Pair counts are updated incrementally; ties -> greatest (bytes, bytes) pair.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()  # millions of small tuples/lists, no cycles: the cyclic GC would only rescan them (~30% of the time)
    try:
        return _merge_loop(word_counts, num_merges, first_id)
    finally:
        if gc_was_enabled:
            gc.enable()


def _merge_loop(word_counts: dict[bytes, int], num_merges: int, first_id: int) -> list[tuple[int, int]]:
    token_bytes = [bytes([b]) for b in range(256)]  # local ids 0..255, merges appended

    def tie_key(tok: bytes) -> tuple[int, ...]:
        # Reverses byte-string order for the min-heap: greater strings get smaller keys, and a longer string beats its
        # prefix thanks to the trailing 1 (greater than every negated byte).
        return tuple(-b for b in tok) + (1,)

    keys = [tie_key(t) for t in token_bytes]
    words = [list(w) for w in word_counts]  # each unique pre-token as a list of token ids
    counts = list(word_counts.values())
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> pre-tokens that (may) contain it
    for i, (w, c) in enumerate(zip(words, counts)):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += c
            pair_words[pair].add(i)
    heap = [(-c, keys[a], keys[b], a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    while len(merges) < num_merges and heap:
        neg, _, _, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b), 0) != -neg:
            continue  # stale entry: the count changed after it was pushed
        new_id = len(token_bytes)
        merges.append((a, b))
        token_bytes.append(token_bytes[a] + token_bytes[b])
        keys.append(tie_key(token_bytes[-1]))
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for i in pair_words.pop((a, b)):
            words[i] = _merge_word(words[i], a, b, new_id, counts[i], i, delta, pair_words)
        _apply_delta(delta, pair_counts, heap, keys)
        pair_counts.pop((a, b), None)
    return [(a + first_id, b + first_id) for a, b in merges]


def _merge_word(w: list[int], a: int, b: int, new_id: int, c: int, i: int, delta, pair_words) -> list[int]:
    """Word ``w`` (count c) with every (a, b) replaced by new_id; the changed neighbour pairs' counts go to ``delta``.
    Only the neighbours of each merged occurrence change: (x, a) -> (x, new) and (b, y) -> (new, y)."""
    n, new_w, j = len(w), [], 0
    while j < n:
        if j + 1 < n and w[j] == a and w[j + 1] == b:
            if new_w:
                left = new_w[-1]
                if left != new_id:  # else the previous occurrence already removed (b, a)
                    delta[(w[j - 1], a)] -= c
                delta[(left, new_id)] += c
                pair_words[(left, new_id)].add(i)
            if j + 2 < n:
                right = w[j + 2]
                delta[(b, right)] -= c
                if not (right == a and j + 3 < n and w[j + 3] == b):  # the next occurrence adds (new, new)
                    delta[(new_id, right)] += c
                    pair_words[(new_id, right)].add(i)
            new_w.append(new_id)
            j += 2
        else:
            new_w.append(w[j])
            j += 1
    return new_w


def _apply_delta(delta, pair_counts, heap, keys) -> None:
    """Update pair counts by ``delta`` and push the changed pairs with their new counts (old entries go stale)."""
    for pair, d in delta.items():
        if d == 0:
            continue
        c = pair_counts[pair] + d
        if c > 0:
            pair_counts[pair] = c
            heapq.heappush(heap, (-c, keys[pair[0]], keys[pair[1]], pair[0], pair[1]))
        else:
            del pair_counts[pair]


def train_bpe(
    input_path: str | Path, vocab_size: int, special_tokens: list[str] | None = None, num_processes: int = 1
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train byte-level BPE on a UTF-8 file. Vocab ids: special tokens, then the 256 bytes, then merges in order.

    ``num_processes > 1`` counts pre-tokens in parallel over chunks cut at the first special token's occurrences.
    The vocabulary is smaller than ``vocab_size`` only if the text runs out of pairs to merge.
    """
    special_tokens = list(dict.fromkeys(special_tokens or []))
    n_base = len(special_tokens) + 256
    if vocab_size < n_base:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the {n_base} special + byte tokens")
    if not Path(input_path).is_file():
        raise FileNotFoundError(f"training text not found: {input_path}")
    if num_processes > 1 and special_tokens:
        from multiprocessing import Pool

        bounds = chunk_boundaries(input_path, num_processes, special_tokens[0].encode("utf-8"))
        jobs = [(str(input_path), s, e, tuple(special_tokens)) for s, e in zip(bounds, bounds[1:])]
        with Pool(min(num_processes, len(jobs))) as pool:
            word_counts = sum(pool.map(_count_file_range, jobs), Counter())
    else:
        word_counts = count_pretokens(Path(input_path).read_text(encoding="utf-8"), special_tokens)

    first = len(special_tokens)
    vocab = {i: s.encode("utf-8") for i, s in enumerate(special_tokens)}
    vocab.update({first + b: bytes([b]) for b in range(256)})
    merges = []
    for a, b in merge_pretokens(word_counts, vocab_size - n_base, first_id=first):
        merges.append((vocab[a], vocab[b]))
        vocab[len(vocab)] = vocab[a] + vocab[b]
    return vocab, merges


# ------------------------------------------------------------------------------------------------------ tokenizer
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (the key format of vocab.json)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]  # space, control bytes, ... -> chr(256), chr(257), ...
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def bpe_merge(ranks: dict[bytes, int], piece: bytes, max_rank: int | None = None) -> list[bytes]:
    """tiktoken's merge loop: repeatedly join the adjacent pair whose concatenation has the lowest rank (leftmost on ties)."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best_rank, best_i = max_rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best_rank is None or r < best_rank):
                best_rank, best_i = r, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def bpe_merge_ids(merge_ranks: dict[tuple[int, int], tuple[int, int]], ids: list[int]) -> list[int]:
    """Sennrich / HF / llama.cpp merge loop on token ids: repeatedly apply the adjacent pair that comes first in the merges
    list (leftmost on ties). ``merge_ranks[(a, b)] = (position in merges, id of the merged token)``."""
    ids = list(ids)
    while len(ids) > 1:
        best, best_i = None, -1
        for i in range(len(ids) - 1):
            m = merge_ranks.get((ids[i], ids[i + 1]))
            if m is not None and (best is None or m[0] < best[0]):
                best, best_i = m, i
        if best is None:
            break
        ids[best_i : best_i + 2] = [best[1]]
    return ids


class Tokenizer:
    """Encode text to token ids and back with a byte-level BPE (``vocab`` id -> bytes, ``merges`` in order).

    ``pre_tokenizer``: a name in ``PRE_TOKENIZERS`` ("gpt-2" or "smollm"). ``rank_by``: "token" merges tiktoken's way
    (lowest id of the joined bytes first: our trainer's vocabularies), "merge" the HF / llama.cpp way (earliest pair in
    ``merges`` first: published vocabularies). ``bos_id``, ``eos_id`` and ``chat_template`` are carried for chat models.
    """

    CACHE_LIMIT = 1 << 18  # pre-tokens remembered; the cache is dropped and restarted when full (bounded memory)

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: list[tuple[bytes, bytes]],
        special_tokens: list[str] | None = None,
        *,
        pre_tokenizer: str = "gpt-2",
        rank_by: str = "token",
        bos_id: int | None = None,
        eos_id: int | None = None,
        chat_template: str | None = None,
    ):
        if pre_tokenizer not in PRE_TOKENIZERS:
            raise ValueError(f"pre_tokenizer={pre_tokenizer!r}; known: {', '.join(PRE_TOKENIZERS)}")
        if rank_by not in ("token", "merge"):
            raise ValueError(f"rank_by={rank_by!r}; choose 'token' (tiktoken) or 'merge' (HF / llama.cpp)")
        self.vocab = dict(vocab)
        self.merges = list(merges)
        self.special_tokens = list(dict.fromkeys(special_tokens or []))
        self.pre_tokenizer, self.rank_by = pre_tokenizer, rank_by
        self.bos_id, self.eos_id, self.chat_template = bos_id, eos_id, chat_template
        first_id = {}
        for i in sorted(self.vocab, reverse=True):
            first_id[self.vocab[i]] = i  # lowest id wins if two ids share bytes
        self.special_ids: dict[str, int] = {}
        for s in self.special_tokens:  # specials missing from the vocabulary are appended to it
            sid = first_id.get(s.encode("utf-8"))
            if sid is None:
                sid = max(self.vocab, default=-1) + 1
                self.vocab[sid] = s.encode("utf-8")
            self.special_ids[s] = sid
        special_set = set(self.special_ids.values())
        self.ranks = {t: i for t, i in first_id.items() if i not in special_set}  # bytes -> id (= merge priority)
        missing = [b for b in range(256) if bytes([b]) not in self.ranks]
        if missing and rank_by == "token":
            raise ValueError(
                f"vocabulary lacks {len(missing)} single-byte tokens (e.g. byte {missing[0]}): "
                "byte-level BPE needs all 256 so that any text can be encoded"
            )
        # A published vocabulary may lack a few bytes (SmolLM2: 21, e.g. 0x04 and those UTF-8 never uses): such a byte
        # gets id -1, which no merge joins, and is dropped from the output, as llama.cpp does.
        self._byte_ids = [self.ranks.get(bytes([b]), -1) for b in range(256)]
        self.merge_ranks = self._check_merges()
        self._pretoken_re = regex.compile(PRE_TOKENIZERS[pre_tokenizer])
        self._splitter = _special_splitter(self.special_tokens)
        self._max_special = max((len(s) for s in self.special_tokens), default=0)
        self._cache: dict[str, list[int]] = {}

    def _check_merges(self) -> dict[tuple[int, int], tuple[int, int]]:
        """Every merge must join two tokens into a token of the vocabulary; by token rank, ids must also grow with the
        merge's position. Returns ``{(id_a, id_b): (position, merged id)}`` for ``rank_by="merge"`` (else empty)."""
        ids = [(self.ranks.get(a), self.ranks.get(b), self.ranks.get(a + b)) for a, b in self.merges]
        bad = next((k for k, t in enumerate(ids) if None in t), None)
        if bad is not None:
            raise ValueError(f"merge {bad} {self.merges[bad]!r} joins or makes a token missing from the vocabulary")
        if self.rank_by == "merge":
            return {(a, b): (k, ab) for k, (a, b, ab) in enumerate(ids)}
        made = [ab for _, _, ab in ids]
        if any(x >= y for x, y in zip(made, made[1:])):
            raise ValueError(
                "merges do not match the vocabulary: every merge must produce a token whose id grows "
                "with the merge's position (the rank order tiktoken uses; use rank_by='merge' for HF-style vocabularies)"
            )
        return {}

    @property
    def vocab_size(self) -> int:
        return max(self.vocab) + 1

    # -------------------------------------------------------------------------------------------- encode / decode

    def _encode_piece(self, data: bytes) -> list[int]:
        """Ids of one pre-token's bytes."""
        if self.rank_by == "merge":
            ids = bpe_merge_ids(self.merge_ranks, [self._byte_ids[b] for b in data])
            return [i for i in ids if i >= 0]
        rank = self.ranks.get(data)  # whole pre-token is one token: no merging needed (tiktoken does the same)
        return [rank] if rank is not None else [self.ranks[p] for p in bpe_merge(self.ranks, data)]

    def _encode_ordinary(self, text: str, out: list[int]) -> None:
        cache = self._cache
        for piece in self._pretoken_re.findall(text):
            ids = cache.get(piece)
            if ids is None:
                ids = self._encode_piece(piece.encode("utf-8"))
                if len(cache) >= self.CACHE_LIMIT:
                    cache.clear()
                cache[piece] = ids
            out.extend(ids)

    def encode(self, text: str) -> list[int]:
        """Token ids for ``text``; special tokens in the text become their single ids (longest match first)."""
        out: list[int] = []
        if self._splitter is None:
            self._encode_ordinary(text, out)
            return out
        for k, part in enumerate(self._splitter.split(text)):
            if k % 2:  # odd positions of a capturing split are the separators, i.e. the special tokens
                out.append(self.special_ids[part])
            elif part:
                self._encode_ordinary(part, out)
        return out

    def _safe_cut(self, buf: str) -> int:
        """A prefix length of ``buf`` whose encoding can't change whatever text follows (0 if none yet)."""
        limit = len(buf) - self._max_special  # a special token starting at or after ``limit`` may still be growing
        if limit <= 0:
            return 0
        start = 0
        if self._splitter is not None:
            for m in self._splitter.finditer(buf, 0, limit + self._max_special):
                if m.start() >= limit:
                    break
                start = m.end()
        if start >= limit:
            return start
        # Pre-tokens may still change at the end (e.g. "'l" + "l" -> "'ll"), so keep the last two back.
        starts = [m.start() for m in self._pretoken_re.finditer(buf, start, limit)]
        return start if len(starts) < 3 else starts[-2]

    def encode_iterable(self, chunks: Iterable[str]) -> Iterator[int]:
        """Lazily encode an iterable of strings (e.g. an open file): same ids as ``encode("".join(chunks))``."""
        buf = ""
        for chunk in chunks:
            buf += chunk
            cut = self._safe_cut(buf)
            if cut:
                yield from self.encode(buf[:cut])
                buf = buf[cut:]
        if buf:
            yield from self.encode(buf)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            return b"".join(self.vocab[i] for i in ids)
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the vocabulary (size {len(self.vocab)})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text for ``ids``; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------------------------------------------- chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> list[int]:
        """Token ids of a conversation rendered with ``self.chat_template`` (see ch01/chat_template.py)."""
        from ch01.chat_template import apply_chat_template

        return apply_chat_template(self, messages, add_generation_prompt=add_generation_prompt, **extra)

    # ------------------------------------------------------------------------------------------------ save / load

    def config(self) -> dict:
        """What vocab.json + merges.txt do not hold: how to pre-tokenize and merge, BOS/EOS, the chat template."""
        keys = ("pre_tokenizer", "rank_by", "bos_id", "eos_id", "chat_template")
        return {k: getattr(self, k) for k in keys}

    def save(self, directory: str | Path) -> Path:
        """GPT-2 / Hugging Face layout: vocab.json ({token: id}, bytes shown via ``bytes_to_unicode``), merges.txt;
        plus special_tokens.json (a list) and bpe_config.json (``config()``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        enc = bytes_to_unicode()
        show = lambda t: "".join(enc[b] for b in t)
        vocab = {show(t): i for i, t in sorted(self.vocab.items())}
        (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
        lines = ["#version: 0.2"] + [f"{show(a)} {show(b)}" for a, b in self.merges]
        (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (directory / "special_tokens.json").write_text(json.dumps(self.special_tokens, ensure_ascii=False))
        (directory / "bpe_config.json").write_text(json.dumps(self.config(), ensure_ascii=False, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        specials_file = directory / "special_tokens.json"
        specials = json.loads(specials_file.read_text(encoding="utf-8")) if specials_file.exists() else []
        config_file = directory / "bpe_config.json"  # absent in directories saved before it existed: GPT-2 defaults
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
        return cls.from_gpt2_files(directory / "vocab.json", directory / "merges.txt", specials, **config)

    @classmethod
    def from_gpt2_files(
        cls,
        vocab_json: str | Path,
        merges_txt: str | Path,
        special_tokens: Iterable[str] = ("<|endoftext|>",),
        **config,
    ) -> Tokenizer:
        """Load GPT-2's published ``vocab.json`` + ``merges.txt`` (or our ``save`` output); ``config``: see ``__init__``."""
        dec = {c: b for b, c in bytes_to_unicode().items()}
        raw = lambda s: bytes(dec[c] for c in s)
        try:
            vocab = {i: raw(s) for s, i in json.loads(Path(vocab_json).read_text(encoding="utf-8")).items()}
            merges = []
            for line in Path(merges_txt).read_text(encoding="utf-8").splitlines():
                if line and not line.startswith("#version"):
                    a, b = line.split(" ")
                    merges.append((raw(a), raw(b)))
        except (KeyError, ValueError) as e:
            raise ValueError(f"{vocab_json} / {merges_txt} are not GPT-2 style vocab/merges files: {e}") from None
        return cls(vocab, merges, list(special_tokens), **config)

    def _check_tiktoken(self) -> None:
        if self.rank_by != "token" or self.pre_tokenizer != "gpt-2":
            raise ValueError("tiktoken holds token-ranked BPE with GPT-2's pattern; this tokenizer merges differently")

    def save_tiktoken(self, path: str | Path) -> Path:
        """tiktoken's ``.tiktoken`` rank file: one ``base64(token) rank`` line per non-special token."""
        self._check_tiktoken()
        path = Path(path)
        lines = [
            f"{base64.b64encode(t).decode('ascii')} {r}" for t, r in sorted(self.ranks.items(), key=lambda x: x[1])
        ]
        path.write_text("\n".join(lines) + "\n", encoding="ascii")
        return path

    @classmethod
    def load_tiktoken(cls, path: str | Path, special_tokens: dict[str, int] | None = None) -> Tokenizer:
        """Read a ``.tiktoken`` rank file; the merges are recovered by re-running BPE on each token below its rank."""
        ranks = {}
        for n, line in enumerate(Path(path).read_text(encoding="ascii").splitlines(), 1):
            if line.strip():
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError as e:
                    raise ValueError(f"{path}:{n}: expected 'base64token rank', got {line[:60]!r} ({e})") from None
        merges = []
        for token, rank in sorted(ranks.items(), key=lambda x: x[1]):
            if len(token) > 1:
                parts = bpe_merge(ranks, token, max_rank=rank)
                if len(parts) != 2:
                    raise ValueError(f"{path}: token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
                merges.append((parts[0], parts[1]))
        vocab = {r: t for t, r in ranks.items()}
        specials = special_tokens or {}
        vocab.update({i: s.encode("utf-8") for s, i in specials.items()})
        return cls(vocab, merges, list(specials))

    def to_tiktoken(self, name: str = "ch01_bpe"):
        """A ``tiktoken.Encoding`` with exactly our ranks, pattern and special tokens."""
        import tiktoken

        self._check_tiktoken()
        return tiktoken.Encoding(
            name, pat_str=GPT2_PATTERN, mergeable_ranks=dict(self.ranks), special_tokens=dict(self.special_ids)
        )


__all__ = [
    "GPT2_PATTERN",
    "PRE_TOKENIZERS",
    "SMOLLM_PATTERN",
    "Tokenizer",
    "bpe_merge",
    "bpe_merge_ids",
    "bytes_to_unicode",
    "count_pretokens",
    "merge_pretokens",
    "train_bpe",
]


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0], out=True)
    p.add_argument("--input", default=str(SHAKESPEARE_PATH), help="UTF-8 text file to train on")
    p.add_argument("--vocab-size", type=int, default=512, help="final vocabulary size (special + 256 bytes + merges)")
    p.add_argument("--special", nargs="*", default=["<|endoftext|>"], help="special tokens")
    p.add_argument("--processes", type=int, default=1, help="processes for pre-token counting (needs a special token)")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    vocab, merges = train_bpe(args.input, args.vocab_size, args.special, num_processes=args.processes)
    train_s = time.perf_counter() - t0
    tok = Tokenizer(vocab, merges, args.special)
    sample = "First Citizen:\nBefore we proceed any further, hear me speak.<|endoftext|>"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    print(f"trained {len(merges)} merges on {args.input} in {train_s:.2f} s; vocabulary of {len(vocab)}")
    print("first merges:", ", ".join(repr((a + b).decode("utf-8", "replace")) for a, b in merges[:10]))
    print(
        "longest tokens:", ", ".join(repr(t.decode("utf-8", "replace")) for t in sorted(vocab.values(), key=len)[-5:])
    )
    print(f"{sample!r}\n-> {len(ids)} tokens: {[tok.decode([i]) for i in ids]}")
    if args.out:
        tok.save(args.out)
        print(f"saved vocab.json / merges.txt / special_tokens.json to {args.out}")
    return {"vocab": vocab, "merges": merges, "train_seconds": train_s, "sample_ids": ids}


if __name__ == "__main__":
    main()
