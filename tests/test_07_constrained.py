"""JSON constrained decoding (ch07/json_automaton.py, ch07/constrained.py) and ch08's ``response_format``.

References: ``json.loads`` for the automaton (random valid JSON from hypothesis, and random mutations of it); a
brute-force walk of every token for the trie masks; ``json.loads`` + a schema validator for decoded outputs (checked
against ``jsonschema`` where that is installed); ch01's ``generate`` for the decoding loop.
"""

import json
import random

import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ch01.char_tokenizer import CharTokenizer
from ch01.model import GPT, GPTConfig
from ch07.constrained import (
    EXAMPLE_SCHEMA,
    JSONConstraint,
    TokenGuide,
    generate_json,
    guide_for,
    main,
    vocab_for,
)
from ch07.json_automaton import JSONAutomaton, validate
from ch07.sampling import Sampler
from common.data import load_shakespeare

ANY = JSONAutomaton.for_schema({}, max_ws=64, max_number_chars=64)  # limits wide enough for json.dumps(indent=...)
SCHEMA_FMT = {"type": "json_schema", "json_schema": {"name": "cat", "schema": EXAMPLE_SCHEMA}}


def accepts(fsm: JSONAutomaton, text: str) -> bool:
    state = fsm.walk(fsm.initial, text.encode())
    return state is not None and fsm.accepts(state)


def loads_ok(text: str) -> bool:
    def reject(name):
        raise ValueError(name)  # NaN / Infinity are Python's extension, not JSON

    try:
        json.loads(text, parse_constant=reject)
        return True
    except ValueError:
        return False


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from([None, 0, 2]), st.booleans(), st.randoms(use_true_random=False))
def test_automaton_matches_json_loads(value, indent, ascii_only, rnd):
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
    data = text.encode()
    state = ANY.initial
    for i, b in enumerate(data):  # every prefix of valid JSON is alive
        state = ANY.step(state, b)
        assert state is not None, data[: i + 1]
    assert ANY.accepts(state)
    for _ in range(20):  # random edits: the automaton accepts exactly what json.loads parses (no trailing whitespace)
        i = rnd.randrange(len(text) + 1)
        ch = (
            rnd.choice('{}[]":,.-+eE0123456789 \\\nabdtrufnlsux#\x01é')
            if rnd.random() < 0.8
            else chr(rnd.randrange(128))
        )
        edit = rnd.choice([text[:i] + ch + text[i:], text[:i] + text[i + 1 :], text[:i] + ch + text[i + 1 :]])
        assert accepts(ANY, edit) == (loads_ok(edit) and edit == edit.rstrip()), repr(edit)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=8))
def test_strings_are_checked_as_utf8(raw):
    data = b'"' + raw + b'"'
    try:
        ok = loads_ok(data.decode("utf-8"))  # strict UTF-8 (no overlongs, no surrogates) and JSON's string rules
    except UnicodeDecodeError:
        ok = False
    state = ANY.walk(ANY.initial, data)
    assert (state is not None and ANY.accepts(state)) == ok


def test_limits_and_json_object_mode():
    fsm = JSONAutomaton.for_json_object(max_ws=2, max_number_chars=3)
    assert accepts(fsm, '{"a": [1, {"b": null}]}') and not accepts(fsm, "[1]") and not accepts(fsm, '"x"')
    assert fsm.walk(fsm.initial, b"{   ") is None  # a whitespace run past max_ws
    assert accepts(fsm, '{"n":123}') and fsm.walk(fsm.initial, b'{"n":1234') is None
    assert fsm.walk(fsm.initial, b'{"n":12.') is None and accepts(fsm, '{"n":1.5}')  # never a prefix it cannot finish
    assert not fsm.accepts(fsm.walk(fsm.initial, b'{"a":1'))
    assert fsm.finished(fsm.walk(fsm.initial, b"{}"))


def completable(fsm: JSONAutomaton, state, budget: int = 20000) -> bool:
    """Breadth-first search over printable-ASCII bytes for an accepting state: an alive prefix must have a completion."""
    seen, frontier = {state}, [state]
    while frontier and len(seen) < budget:
        nxt = []
        for s in frontier:
            if fsm.accepts(s):
                return True
            for b in range(32, 127):
                n = fsm.step(s, b)
                if n is not None and n not in seen:
                    seen.add(n)
                    nxt.append(n)
        frontier = nxt
    return False


@settings(max_examples=25, deadline=None)
@given(json_values)
def test_every_alive_prefix_can_be_completed(value):
    fsm = JSONAutomaton.for_schema({}, max_ws=2, max_number_chars=8)
    state = fsm.initial
    for b in json.dumps(value, indent=1).encode()[:40]:
        state = fsm.step(state, b)
        if state is None:  # past a limit of this small automaton: the rest of the text is not its language
            break
        assert completable(fsm, state)


def cat(**kw) -> dict:
    return {"name": "Tom", "age": 3, "color": "grey", "indoor": True, **kw}


def test_schema_mode_accepts_valid_and_rejects_invalid():
    fsm = JSONAutomaton.for_schema(EXAMPLE_SCHEMA)
    good = [cat(), cat(toys=[]), cat(toys=["ball", "mouse"]), cat(age=-12, name="")]
    bad = [
        {"name": "Tom", "age": 3, "color": "grey"},  # missing required
        cat(extra=1),  # additionalProperties false
        cat(name="a" * 17),  # maxLength
        cat(age=3.5),  # integer
        cat(color="blue"),  # enum
        cat(indoor="yes"),
        cat(toys=["a", "b", "c", "d"]),  # maxItems
    ]
    for v in good:
        assert validate(v, EXAMPLE_SCHEMA) == [] and accepts(fsm, json.dumps(v)), v
        assert accepts(fsm, json.dumps(v, indent=1))
    for v in bad:
        assert validate(v, EXAMPLE_SCHEMA) != [] and not accepts(fsm, json.dumps(v)), v
    assert not accepts(fsm, json.dumps({"age": 3, "name": "Tom", "color": "grey", "indoor": True}))  # schema order
    for prefix in [
        '{"name": "abcdefghijklmnop',
        '{"name":"a","age":-',
        '{"name":"a","age":1',
        '{"name":"a","age":1,"c',
    ]:
        assert completable(fsm, fsm.walk(fsm.initial, prefix.encode())), prefix
    nested = {
        "type": "object",
        "properties": {"pts": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}, "minItems": 1},
                       "meta": {"type": "object"}, "k": {"const": [1, "x"]}, "z": {"type": "null"}},
        "required": ["pts", "k"],
    }  # fmt: skip
    fsm = JSONAutomaton.for_schema(nested)
    assert accepts(fsm, '{"pts": [[1.5, -2e3], []], "meta": {"any": [true]}, "k": [1,"x"]}')
    assert not accepts(fsm, '{"pts": [], "k": [1,"x"]}') and not accepts(fsm, '{"pts": [[1]], "k": [1, "y"]}')


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"type": "string", "pattern": "a+"}, "pattern"),
        ({"anyOf": [{"type": "string"}]}, "anyOf"),
        ({"type": ["string", "null"]}, "not supported"),
        ({"type": "integer", "minimum": 0}, "minimum"),
        ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "required"),
        ({"$ref": "#/$defs/x"}, "$ref"),
        ({"type": "array", "maxItems": -1}, "maxItems"),
        ({"type": "string", "minLength": 3, "maxLength": 2}, "no value fits"),
    ],
)
def test_unsupported_schemas_raise(schema, words):
    with pytest.raises(ValueError, match=words.replace("$", r"\$")):
        JSONAutomaton.for_schema(schema)


def test_validator_agrees_with_jsonschema():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed: the validator cross-check skips")
    rnd = random.Random(0)
    for _ in range(200):
        v = cat(age=rnd.choice([1, -1, 2.5, "3", True]), toys=rnd.choice([[], ["x"], ["x"] * 4, [1], ["y" * 13]]))
        assert (validate(v, EXAMPLE_SCHEMA) == []) == jsonschema.Draft202012Validator(EXAMPLE_SCHEMA).is_valid(v)


# ------------------------------------------------------------------------------------------------------ masks
def json_char_tokenizer() -> CharTokenizer:
    """Printable ASCII + newline + é + \\x00 (used as the end token): a character vocabulary that can spell JSON."""
    return CharTokenizer("".join(map(chr, range(32, 127))) + "\né\x00")


def brute_force_mask(guide: TokenGuide, sid: int) -> torch.Tensor:
    m = torch.zeros(guide.vocab.size, dtype=torch.bool)
    for i, data in enumerate(guide.vocab.tokens):
        if data and guide.fsm.walk(guide.states[sid], data) is not None:
            m[i] = True
    if guide.vocab.eos_id is not None and guide.fsm.accepts(guide.states[sid]):
        m[guide.vocab.eos_id] = True
    return m


def check_masks(tok, eos_id, texts):
    guide = TokenGuide(JSONAutomaton.for_schema(EXAMPLE_SCHEMA), vocab_for(tok, eos_id))
    for text in texts:
        c = JSONConstraint(guide)
        for t in tok.encode(text):
            c.advance(t)
        fast, full = guide.mask(c.sid), guide._compute(c.sid, fast=False)
        assert torch.equal(fast, full) and torch.equal(full, brute_force_mask(guide, c.sid)), text


PREFIXES = ['{"name": "To', '{"name": "', '{"name": "Tom", "age": 1', '{"name": "abcdefghijklmno', "{\n"]


def test_trie_masks_equal_brute_force_char_vocab():
    tok = json_char_tokenizer()
    check_masks(tok, tok.vocab_size - 1, PREFIXES + ['{"name": "Tom", "age": 1, "color": "grey", "indoor": true}'])


def test_trie_masks_equal_brute_force_smollm2(smollm2):
    _, tok = smollm2
    check_masks(tok, tok.eos_id, PREFIXES[:3])


def test_vocabulary_that_cannot_spell_json_is_a_value_error():
    shakespeare = CharTokenizer.from_text(load_shakespeare())  # the course's char models: no '{', '[' or '"'
    with pytest.raises(ValueError, match="no token that can start"):
        guide_for(shakespeare, {"type": "json_object"}, eos_id=None)
    assert guide_for(shakespeare, {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}})
    with pytest.raises(ValueError, match="not supported"):
        guide_for(json_char_tokenizer(), {"type": "yaml"})


# --------------------------------------------------------------------------------------------------- decoding
@pytest.fixture(scope="module")
def tiny(one_thread):
    torch.manual_seed(0)
    tok = json_char_tokenizer()
    return GPT(GPTConfig.preset("tiny", vocab_size=tok.vocab_size, block_size=512)).eval(), tok


def parsed_and_valid(text: str, schema: dict | None) -> bool:
    return loads_ok(text) and (schema is None or validate(json.loads(text), schema) == [])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_random_tiny_model_emits_schema_json(tiny, temperature):
    model, tok = tiny
    prompts = [tok.encode("cat: "), tok.encode("A cat as JSON, please: ")]  # a ragged batch of two
    base = Sampler(temperature=temperature)
    texts, finish = generate_json(
        model, tok, prompts, 400, SCHEMA_FMT, eos_id=tok.vocab_size - 1, base=base, generator=torch.Generator().manual_seed(0)
    )  # fmt: skip
    assert finish == ["stop", "stop"]
    assert all(parsed_and_valid(t, EXAMPLE_SCHEMA) for t in texts), texts


def test_length_finish_leaves_a_valid_prefix(tiny):
    model, tok = tiny
    eos = tok.vocab_size - 1
    texts, finish = generate_json(model, tok, [tok.encode("x")], 6, {"type": "json_object"}, eos_id=eos, temperature=0)
    assert finish == ["length"] and not loads_ok(texts[0])
    fsm = JSONAutomaton.for_json_object()
    assert fsm.walk(fsm.initial, texts[0].encode()) is not None  # an unfinished but valid prefix


def chat_ids(tok, content: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": content}])


def test_smollm2_schema_greedy_and_sampled(smollm2, one_thread):
    model, tok = smollm2
    ids = chat_ids(tok, "Describe a cat as JSON with its name, age, color and whether it is indoor.")
    greedy, finish = generate_json(model, tok, [ids], 80, SCHEMA_FMT, base=Sampler(temperature=0.0))
    assert finish == ["stop"] and parsed_and_valid(greedy[0], EXAMPLE_SCHEMA), greedy
    small = {"type": "object", "required": ["name", "age", "indoor"], "additionalProperties": False,
             "properties": {k: EXAMPLE_SCHEMA["properties"][k] for k in ("name", "age", "indoor")}}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "cat", "schema": small}}
    gen = torch.Generator().manual_seed(1)
    sampled, finish = generate_json(model, tok, [ids], 80, fmt, base=Sampler(temperature=0.7), generator=gen)
    assert finish == ["stop"] and parsed_and_valid(sampled[0], small), sampled


def test_smollm2_json_object(smollm2, one_thread):
    model, tok = smollm2
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}
    ids = chat_ids(tok, "Give the capital of France and its population as JSON.")
    texts, finish = generate_json(model, tok, [ids], 40, fmt, base=Sampler(temperature=0.0))
    assert finish == ["stop"] and parsed_and_valid(texts[0], schema), texts
    texts, finish = generate_json(model, tok, [ids], 40, {"type": "json_object"}, base=Sampler(temperature=0.0))
    assert (finish == ["stop"] and parsed_and_valid(texts[0], None)) or finish == ["length"]
    fsm = JSONAutomaton.for_json_object()
    assert fsm.walk(fsm.initial, texts[0].encode()) is not None


def test_main_tiny():
    out = main(["--model", "tiny", "--max-new-tokens", "24", "--repeats", "1"])
    fsm = JSONAutomaton.for_schema(EXAMPLE_SCHEMA)
    assert fsm.walk(fsm.initial, out["text"].encode()) is not None
    assert [r["decoding"] for r in out["table"]][0] == "plain"


# ----------------------------------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def json_server(tiny):
    from ch08.serve_thread import ServerThread
    from ch08.server import build_state

    model, tok = tiny
    state = build_state(model, tok, "json-tiny", max_batch=4, shutdown_timeout=2.0)
    with ServerThread(state) as url:
        yield url


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json={"model": "json-tiny", "max_tokens": 400, **body}, timeout=120)


def test_server_response_format(json_server):
    chat = {"messages": [{"role": "user", "content": "a cat"}], "response_format": SCHEMA_FMT, "temperature": 0}
    r = post(json_server, "/v1/chat/completions", chat)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and parsed_and_valid(choice["message"]["content"], EXAMPLE_SCHEMA)
    r = post(json_server, "/v1/completions", {"prompt": "x", "response_format": SCHEMA_FMT, "seed": 3, "n": 2})
    assert r.status_code == 200, r.text
    assert all(parsed_and_valid(c["text"], EXAMPLE_SCHEMA) for c in r.json()["choices"])
    lines = []  # streamed: the joined deltas parse too
    with httpx.stream("POST", json_server + "/v1/chat/completions", timeout=120,
                      json={"model": "json-tiny", **chat, "stream": True, "max_tokens": 400}) as s:  # fmt: skip
        lines = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in lines if c["choices"])
    assert parsed_and_valid(text, EXAMPLE_SCHEMA), text


def test_server_length_and_text_format(json_server):
    r = post(json_server, "/v1/completions", {"prompt": "x", "response_format": SCHEMA_FMT, "max_tokens": 5})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and not loads_ok(choice["text"])
    fsm = JSONAutomaton.for_schema(EXAMPLE_SCHEMA)
    assert fsm.walk(fsm.initial, choice["text"].encode()) is not None  # the unfinished prefix is still valid
    r = post(json_server, "/v1/completions", {"prompt": "x", "response_format": {"type": "text"}, "max_tokens": 5})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.slow
def test_server_smollm2_json_schema(smollm2):
    from ch08.serve_thread import ServerThread
    from ch08.server import build_state

    model, tok = smollm2
    state = build_state(model, tok, "smollm2", max_batch=2, shutdown_timeout=2.0)
    with ServerThread(state) as url:
        msg = "Describe a cat as JSON with its name, age, color and whether it is indoor."
        body = {"model": "smollm2", "messages": [{"role": "user", "content": msg}], "response_format": SCHEMA_FMT}
        r = httpx.post(url + "/v1/chat/completions", json={**body, "temperature": 0, "max_tokens": 80}, timeout=300)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and parsed_and_valid(choice["message"]["content"], EXAMPLE_SCHEMA)


@pytest.mark.parametrize(
    "fmt, words",
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "a"}}},
            "pattern",
        ),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema"),
        ({"type": "xml"}, "not supported"),
        ("json", "response_format"),
    ],
)
def test_server_bad_response_format_is_400(json_server, fmt, words):
    r = post(
        json_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": fmt}
    )
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]
    r = post(json_server, "/v1/completions", {"prompt": "hi", "max_tokens": 4})  # and it keeps serving
    assert r.status_code == 200
