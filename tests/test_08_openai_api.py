"""Chapter 08 server, the OpenAI API surface: ``n`` (forked KV blocks), prompt lists and token-id prompts, real
``logprobs`` (== ``log_softmax`` of a plain forward), seeds, stream usage, prefix caching, 400s for what is not
implemented, and a load test (200 requests, 16 concurrent clients, disconnects) that leaks no KV block.

References: ch01's ``generate`` (greedy tokens) and ch01's ``GPT.forward`` + ``log_softmax`` (log-probabilities)."""

import asyncio
import json
import random
import re

import httpx
import openai
import pytest
import torch
from test_08_server import MODEL, checkpoint  # noqa: F401  (the tiny char model saved with a 512-token context)

from ch01.generate import generate
from ch08.engine import PagedEngine
from ch08.serve_thread import ServerThread
from ch08.server import build_state, load_model

MAX_BATCH = 8


@pytest.fixture(scope="module")
def server(checkpoint):  # noqa: F811
    model, tok, name = load_model(str(checkpoint))
    state = build_state(model, tok, name, max_batch=MAX_BATCH, shutdown_timeout=2.0)
    with ServerThread(state) as url:
        yield {"url": url, "model": model, "tok": tok, "state": state}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(server, prompt_ids: list[int], n: int) -> list[int]:
    return generate(server["model"], [prompt_ids], n, temperature=0.0)[0]


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_forked_and_prefix_cached_engine_paths_equal_generate():
    """Engine level: n choices forked off one prefill (shared blocks, copy-on-write of the partial last one) and a
    second request served from the prefix cache give ch01's greedy tokens; every block is unreferenced afterwards."""
    from ch01.pretrained import pretrained_char_model

    model, tok, _ = pretrained_char_model("tiny", 200, verbose=False)
    engine = PagedEngine(model, max_slots=4, block_size=4)
    prompt = tok.encode("KING RICHARD III:\nNow is th")  # 27 tokens: 6 full blocks + a partial one
    ref = greedy({"model": model}, prompt, 12)
    parent = engine.alloc()
    first = int(engine.prefill(parent, prompt).argmax())
    slots = [parent, engine.fork(parent), engine.fork(parent)]
    assert engine.cache.block_table(slots[1]) == engine.cache.block_table(parent)  # shared, not copied
    outs = [[first] for _ in slots]
    for _ in range(11):
        nxt = engine.decode(slots, [o[-1] for o in outs]).argmax(-1).tolist()
        for o, t in zip(outs, nxt):
            o.append(t)
    assert outs == [ref] * 3
    tables = [engine.cache.block_table(s) for s in slots]
    assert tables[0][:6] == tables[1][:6] == tables[2][:6] and len({t[6] for t in tables}) == 3  # copy-on-write
    for s in slots:
        engine.release(s)
    again = engine.alloc()
    hits = engine.prefix_hit_tokens
    out = [int(engine.prefill(again, prompt).argmax())]
    assert engine.prefix_hit_tokens - hits == 24  # 6 full blocks from the cache: only 2 tokens prefilled
    while len(out) < 12:
        out.append(int(engine.decode([again], [out[-1]])[0].argmax()))
    assert out == ref
    engine.release(again)
    assert engine.stats()["blocks_used"] == 0 and engine.stats()["blocks_free"] == engine.cache.num_blocks


def test_slots_engine_fork_copies_the_prompt():
    """The decode-graph engine (onnxruntime's, here eager) forks by copying the parent's KV slot."""
    from ch01.pretrained import pretrained_char_model
    from ch08.engine import Engine, TorchBackend

    model, tok, _ = pretrained_char_model("tiny", 200, verbose=False)
    engine = Engine(model, TorchBackend(model), max_slots=3)
    prompt = tok.encode("ROMEO:")
    parent = engine.alloc()
    first = int(engine.prefill(parent, prompt).argmax())
    slots = [parent, engine.fork(parent)]
    outs = [[first], [first]]
    for _ in range(7):
        for o, t in zip(outs, engine.decode(slots, [o[-1] for o in outs]).argmax(-1).tolist()):
            o.append(t)
    assert outs == [greedy({"model": model}, prompt, 8)] * 2


def test_n_prompt_lists_and_token_id_prompts_are_greedy_exact(server, client):
    tok = server["tok"]
    prompts = ["ROMEO:", "JULIET:\nO"]
    r = client.completions.create(model=MODEL, prompt=prompts, n=3, max_tokens=10, temperature=0)
    assert [c.index for c in r.choices] == list(range(6))
    for i, c in enumerate(r.choices):
        assert c.text == tok.decode(greedy(server, tok.encode(prompts[i // 3]), 10))
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)  # each prompt counted once
    assert r.usage.completion_tokens == 60
    ids = [tok.encode(p) for p in prompts]
    one = client.completions.create(model=MODEL, prompt=ids[0], max_tokens=10, temperature=0)
    both = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0)
    assert one.choices[0].text == r.choices[0].text
    assert [c.text for c in both.choices] == [r.choices[0].text, r.choices[3].text]
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=8, temperature=0, stop=["zzz"]
    )
    assert chat.choices[0].message.content == chat.choices[1].message.content
    assert chat.choices[0].message.content == tok.decode(greedy(server, tok.encode("USER:\nHi\n\nASSISTANT:\n"), 8))


def test_seeded_n_choices_repeat_and_differ(client):
    kw = dict(model=MODEL, prompt="The ", max_tokens=30, temperature=1.0, n=3, seed=11)
    a = [c.text for c in client.completions.create(**kw).choices]
    b = [c.text for c in client.completions.create(**kw).choices]
    assert a == b and len(set(a)) > 1  # same seed -> same texts; the n choices are different samples


def test_logprobs_equal_log_softmax_of_a_plain_forward(server, client):
    tok, model = server["tok"], server["model"]
    prompt = tok.encode("ROMEO:\n")
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    gen = greedy(server, prompt, 8)
    assert lp.tokens == [tok.decode([t]) for t in gen] and "".join(lp.tokens) == r.choices[0].text
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt + gen]))[0].float(), -1)  # (T, V)
    for i, t in enumerate(gen):
        row = ref[len(prompt) - 1 + i]
        assert lp.token_logprobs[i] == pytest.approx(float(row[t]), abs=1e-4)
        top = row.topk(3)
        want = {tok.decode([j]): v for j, v in zip(top.indices.tolist(), top.values.tolist())}
        assert lp.top_logprobs[i].keys() == want.keys()
        assert all(lp.top_logprobs[i][k] == pytest.approx(v, abs=1e-4) for k, v in want.items())
    assert lp.text_offset == list(range(8))  # one character per token
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0}
    chat = client.chat.completions.create(**body, logprobs=True, top_logprobs=2, stop=["zzz"])
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)
    assert bytes(content[0].bytes).decode() == content[0].token
    parts = list(client.chat.completions.create(**body, logprobs=True, stop=["zzz"], stream=True))
    streamed = [c for p in parts if p.choices and p.choices[0].logprobs for c in p.choices[0].logprobs.content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-6)


def test_streaming_n_with_usage_equals_non_streaming(client):
    kw = dict(model=MODEL, prompt=["A", "BB"], n=2, max_tokens=12, temperature=0)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts, finish = {}, {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            finish[ch.index] = ch.finish_reason or finish.get(ch.index)
    assert texts == {c.index: c.text for c in full.choices} and set(finish.values()) == {"length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_prefix_cache_hits_on_a_shared_system_prompt(server, client):
    url, tok = server["url"], server["tok"]
    system = "You are a helpful assistant who answers in the style of a play. " * 3
    hits = metric(url, "llm_prefix_cache_hit_tokens_total")
    outs = [
        client.completions.create(model=MODEL, prompt=system + q, max_tokens=8, temperature=0).choices[0].text
        for q in ("ROMEO:", "JULIET:")
    ]
    assert metric(url, "llm_prefix_cache_hit_tokens_total") - hits >= len(tok.encode(system)) - 16
    assert outs == [tok.decode(greedy(server, tok.encode(system + q), 8)) for q in ("ROMEO:", "JULIET:")]


UNSUPPORTED = [
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"echo": True}, "echo"),
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1.0}, "frequency_penalty"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"logprobs": 50}, "logprobs"),
    ({"prompt": [3, 10**6]}, "prompt"),  # token id outside the vocabulary
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"n": 0}, "n"),
]


@pytest.mark.parametrize("extra,param", UNSUPPORTED, ids=[p for _, p in UNSUPPORTED])
def test_unsupported_or_bad_fields_are_400_and_name_the_parameter(server, extra, param):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, **extra}
    r = httpx.post(server["url"] + "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert param in f"{err['message']} {err['param']}" and err["type"] == "invalid_request_error"
    assert httpx.post(server["url"] + "/v1/completions", json={"model": MODEL, "prompt": "Hi"}).status_code == 200


def test_chat_unsupported_fields_are_400(server):
    msgs = [{"role": "user", "content": "Hi"}]
    for extra in ({"top_logprobs": 2}, {"tool_choice": "auto"}, {"messages": [{**msgs[0], "tool_calls": []}]}):
        r = httpx.post(server["url"] + "/v1/chat/completions", json={"model": MODEL, "messages": msgs, **extra})
        assert r.status_code == 400 and r.json()["error"]["message"], (extra, r.text)


async def _load_client(url: str, jobs: list[dict], out: dict) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        while jobs:
            job = jobs.pop()
            body = {k: v for k, v in job.items() if k != "disconnect"}
            if not body.get("stream"):
                r = await c.post("/v1/completions", json=body)
                ok = r.status_code == 200 and len(r.json()["choices"]) == body["n"] * len(body["prompt"])
                ok = ok and all(s not in ch["text"] for ch in r.json()["choices"] for s in body.get("stop", []))
                out["ok" if ok else "failed"].append(r.text[:200])
                continue
            async with c.stream("POST", "/v1/completions", json=body) as r:
                seen, done = 0, False
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        seen += 1
                        assert "error" not in json.loads(line[6:]), line
                    done |= line == "data: [DONE]"
                    if job["disconnect"] and seen == 2:
                        break  # the client goes away mid-stream
                out["ok" if (done or job["disconnect"]) and r.status_code == 200 else "failed"].append(str(seen))


@pytest.mark.timeout(300)
def test_load_200_requests_16_clients_no_failure_no_leaked_blocks(server):
    """Mixed load: streaming or not, n = 1..3, 1 or 2 prompts, stop strings, seeds, clients that disconnect mid-stream;
    no request fails, the server stays healthy, and afterwards every KV block and slot is free again."""
    rng, url = random.Random(0), server["url"]
    names = ["ROMEO", "JULIET", "First Citizen", "KING", "Nurse", "HAMLET"]
    jobs = []
    for i in range(200):
        stream = rng.random() < 0.5
        jobs.append(
            {
                "model": MODEL,
                "prompt": [f"{rng.choice(names)}:\n" for _ in range(rng.choice([1, 1, 2]))],
                "n": rng.choice([1, 1, 2, 3]),
                "max_tokens": rng.randint(4, 24),
                "temperature": rng.choice([0.0, 0.8]),
                "seed": i,
                "stop": rng.choice([[], ["e"], ["the", "\n\n"]]),
                "stream": stream,
                "disconnect": stream and rng.random() < 0.3,
            }
        )
    out = {"ok": [], "failed": []}

    async def run():
        await asyncio.gather(*(_load_client(url, jobs, out) for _ in range(16)))

    asyncio.run(run())
    assert len(out["ok"]) == 200 and not out["failed"], out["failed"][:3]
    for _ in range(200):  # cancelled streams leave at the scheduler's next step
        h = httpx.get(url + "/health").json()
        if h["running"] == 0 and h["free_slots"] == MAX_BATCH:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert (h["running"], h["waiting"], h["free_slots"]) == (0, 0, MAX_BATCH)
    assert metric(url, "llm_kv_blocks_used") == 0  # no leaked block: all free or cached-and-evictable
    assert metric(url, "llm_kv_blocks_free") == server["state"].scheduler.engine.cache.num_blocks
    assert metric(url, "llm_requests_cancelled_total") > 0  # the disconnects really cancelled running requests
