"""Chapter 08 server: a real uvicorn server on 127.0.0.1 driven by the official openai client and raw httpx.

References: outputs are compared with ch01's ``generate`` (greedy, one sequence at a time).
"""

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from ch01.generate import generate
from ch01.model import GPT, GPTConfig
from ch01.pretrained import pretrained_char_model
from ch08.engine import Engine, PagedEngine, TorchBackend
from ch08.serve_thread import ServerThread
from ch08.server import build_state, load_model

MODEL = "tiny-test"
MAX_BATCH = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """ch01's tiny char model, re-saved with a longer context (RoPE has no position weights) as a GPT.save dir."""
    model, tok, _ = pretrained_char_model("tiny", 200, verbose=False)
    long = GPT(GPTConfig.from_dict({**model.config.to_dict(), "block_size": 512})).eval()
    long.load_state_dict(model.state_dict())
    d = tmp_path_factory.mktemp("ckpt") / MODEL
    long.save(d)
    tok.save(d)
    return d


@pytest.fixture(scope="module")
def server(checkpoint):
    model, tok, name = load_model(str(checkpoint))
    assert name == MODEL
    state = build_state(model, tok, name, max_batch=MAX_BATCH, shutdown_timeout=2.0)
    with ServerThread(state) as url:
        yield {"url": url, "model": model, "tok": tok, "state": state}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(server, prompt: str, n: int) -> str:
    tok, model = server["tok"], server["model"]
    return tok.decode(generate(model, [tok.encode(prompt)], n, temperature=0.0)[0])


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def serve_schedule(engine, prompts: list[list[int]], arrivals: list[int], n_new: int) -> list[list[int]]:
    """A minimal continuous-batching loop (greedy): before step t the prompts arriving at t are prefilled (-> their
    first token); each step decodes every running sequence once; a sequence leaves after n_new tokens."""
    outs: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    running: dict[int, int] = {}  # prompt index -> slot
    t = 0
    while any(len(o) < n_new for o in outs.values()):
        if running:
            ids = list(running)
            nxt = engine.decode([running[i] for i in ids], [outs[i][-1] for i in ids]).argmax(-1).tolist()
            for i, tok in zip(ids, nxt):
                outs[i].append(tok)
        for i in [i for i in running if len(outs[i]) == n_new]:
            engine.release(running.pop(i))
        for i in (i for i, a in enumerate(arrivals) if a == t):
            running[i] = engine.alloc()
            outs[i].append(int(engine.prefill(running[i], prompts[i]).argmax()))
        t += 1
    return [outs[i] for i in range(len(prompts))]


SCHEDULES = {
    "together": [0, 0, 0, 0, 0],
    "staggered": [0, 6, 6, 25, 27],  # alone (fast path) -> joined by two -> alone again -> joined
    "one_at_a_time": [0, 25, 50, 75, 100],
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("kind", ["slots", "paged", "paged-model"])
def test_engine_serves_exactly_the_tokens_of_generate(kind, schedule):
    """Sequences of different lengths, decoded together, staggered or one at a time, give token for token what ch01's
    ``generate`` gives each alone (greedy). slots: the ONNX decode graph's engine (eager torch), one call per length;
    paged: ch07's paged cache + FusedDecoder (with the single-sequence fast path); paged-model: ch01's forward."""
    model, tok, _ = pretrained_char_model("tiny", 200, verbose=False)
    prompts = ["ROMEO:", "First Citizen:\nBefore", "O", "KING RICHARD III:\nNow is", "ROMEO:"]  # repeat: prefix cache
    ids = [tok.encode(p) for p in prompts]
    if kind == "slots":
        engine = Engine(model, TorchBackend(model), max_slots=5)
    else:
        engine = PagedEngine(model, max_slots=5, block_size=4, fused=kind == "paged")
    outs = serve_schedule(engine, ids, SCHEDULES[schedule], 20)
    assert outs == [generate(model, [p], 20, temperature=0.0)[0] for p in ids]
    assert len(engine.free) == 5
    if kind.startswith("paged"):
        assert engine.cache.num_free_blocks == engine.cache.num_blocks  # every block went back to the pool
        assert (engine.solo_steps > 0) == (schedule != "together")  # a lone sequence took the contiguous fast path
    if kind == "paged" and schedule == "together":
        assert engine.prefix_hit_tokens == 4  # the repeated prompt reused the first one's full 4-token block


def test_models_health_and_completion_matches_reference(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server["url"] + "/health").json()
    assert health["status"] == "ok" and health["free_slots"] == MAX_BATCH
    r = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=24, temperature=0)
    assert r.choices[0].text == reference(server, "ROMEO:", 24)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (6, 24, 30)
    assert server["state"].scheduler.engine.solo_steps > 0  # served alone: FusedDecoder's single-sequence fast path


def test_streaming_equals_non_streaming(server, client):
    kw = dict(model=MODEL, prompt="JULIET:\n", max_tokens=20, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20
    msgs = [{"role": "system", "content": "Speak."}, {"role": "user", "content": "Who goes there?"}]
    chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=30, temperature=0, stop=["zzz"])
    stream = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=30, temperature=0, stop=["zzz"], stream=True
    )
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content
    assert chat.choices[0].message.content == reference(
        server, "SYSTEM:\nSpeak.\n\nUSER:\nWho goes there?\n\nASSISTANT:\n", 30
    )


def test_stop_and_seeded_sampling(server, client):
    text = reference(server, "ROMEO:", 30)
    stop = text[10:13]
    cut = text.find(stop)
    r = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=30, temperature=0, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text[:cut], "stop")
    kw = dict(model=MODEL, prompt="The ", max_tokens=40, temperature=1.0, top_p=0.9)
    a, b = (client.completions.create(**kw, seed=7).choices[0].text for _ in range(2))
    assert a == b and len(a) == 40
    others = {client.completions.create(**kw, seed=s).choices[0].text for s in range(8, 12)}
    assert len(others | {a}) > 1  # different seeds do sample


def test_malformed_requests_get_openai_errors_and_server_keeps_serving(server):
    url = server["url"]
    ok = {"model": MODEL, "prompt": "Hi", "max_tokens": 4}
    cases = [
        ("post", "/v1/completions", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
        ("post", "/v1/completions", {"json": {**ok, "max_tokens": "four"}}, 400),
        ("post", "/v1/completions", {"json": {**ok, "max_tokens": -3}}, 400),
        ("post", "/v1/completions", {"json": {**ok, "max_tokens": 10**9}}, 400),
        ("post", "/v1/completions", {"json": {**ok, "max_tokens": 511}}, 400),  # prompt + max_tokens > context
        ("post", "/v1/completions", {"json": {**ok, "prompt": "x" * 600}}, 400),  # prompt > context
        ("post", "/v1/completions", {"json": {**ok, "model": "gpt-17"}}, 404),
        ("post", "/v1/completions", {"json": {**ok, "temperature": 9}}, 400),
        ("post", "/v1/completions", {"json": {**ok, "n": MAX_BATCH + 1}}, 400),  # more choices than the batch
        ("post", "/v1/completions", {"json": {"model": MODEL}}, 400),  # missing prompt
        ("post", "/v1/completions", {"json": {**ok, "prompt": "emoji \U0001f600"}}, 400),  # not in the vocabulary
        ("post", "/v1/chat/completions", {"json": {"model": MODEL, "messages": []}}, 400),
        (
            "post",
            "/v1/chat/completions",
            {"json": {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}},
            400,
        ),
        ("post", "/v1/completions", {"json": [1, 2, 3]}, 400),
        ("get", "/v1/completions", {}, 405),
        ("get", "/v1/nothing-here", {}, 404),
    ]
    for method, path, kw, status in cases:
        r = getattr(httpx, method)(url + path, **kw)
        assert r.status_code == status, (path, kw, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"], r.text
        assert httpx.get(url + "/health").json()["status"] == "ok"
    r = httpx.post(url + "/v1/completions", json={**ok, "max_tokens": 511})
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.post(url + "/v1/completions", json=ok).status_code == 200


def test_concurrent_requests_are_batched_and_independent(server):
    prompts = [
        f"{name}:\n"
        for name in [
            "ROMEO",
            "JULIET",
            "HAMLET",
            "First Citizen",
            "MENENIUS",
            "KING",
            "QUEEN",
            "LEAR",
            "BRUTUS",
            "CAESAR",
            "All",
            "Nurse",
            "Second Citizen",
            "CORIOLANUS",
            "GLOUCESTER",
            "PROSPERO",
        ]
    ]
    lengths = [12 + 3 * (i % 5) for i in range(len(prompts))]
    steps_before = metric(server["url"], "llm_batch_size_count")
    seqs_before = metric(server["url"], "llm_batch_size_sum")

    async def run():
        async with httpx.AsyncClient(base_url=server["url"], timeout=60) as c:
            rs = await asyncio.gather(
                *(
                    c.post("/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": n, "temperature": 0})
                    for p, n in zip(prompts, lengths)
                )
            )
        return [r.json() for r in rs]

    results = asyncio.run(run())
    for p, n, r in zip(prompts, lengths, results):
        assert r["choices"][0]["text"] == reference(server, p, n), p
    steps = metric(server["url"], "llm_batch_size_count") - steps_before
    seqs = metric(server["url"], "llm_batch_size_sum") - seqs_before
    assert seqs / steps > 2  # decode steps really ran several sequences together


def test_disconnect_mid_stream_frees_the_slot_and_metrics_move(server):
    url = server["url"]
    cancelled_before = metric(url, "llm_requests_cancelled_total")
    ok_before = metric(url, 'llm_requests_total{endpoint="/v1/completions",status="200"}')
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 500, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        first = []
        for line in r.iter_lines():
            if line.startswith("data: {"):
                first.append(json.loads(line[6:]))
            if len(first) == 3:
                break
    assert all(c["object"] == "text_completion" for c in first)
    for _ in range(200):  # the scheduler notices the cancellation at its next step
        h = httpx.get(url + "/health").json()
        if h["running"] == 0 and h["free_slots"] == MAX_BATCH:
            break
        time.sleep(0.05)
    assert (h["running"], h["free_slots"]) == (0, MAX_BATCH)
    assert metric(url, "llm_requests_cancelled_total") == cancelled_before + 1
    httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "A", "max_tokens": 2})
    assert metric(url, 'llm_requests_total{endpoint="/v1/completions",status="200"}') == ok_before + 1
    assert (
        metric(url, "llm_generation_tokens_total") > 0
        and "llm_time_to_first_token_seconds_count" in httpx.get(url + "/metrics").text
    )


def test_api_key_required_when_configured(checkpoint):
    model, tok, name = load_model(str(checkpoint))
    with ServerThread(build_state(model, tok, name, max_batch=2, api_key="s3cret", shutdown_timeout=1.0)) as url:
        r = httpx.post(url + "/v1/completions", json={"model": name, "prompt": "A", "max_tokens": 2})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        c = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert len(c.completions.create(model=name, prompt="A", max_tokens=3).choices[0].text) == 3
        assert httpx.get(url + "/health").status_code == 200  # health stays open for load balancers


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_server_process_graceful_shutdown_finishes_in_flight_requests(checkpoint):
    """``python 08_deployment/server.py --checkpoint DIR``; SIGINT while a request runs: it still completes, exit 0."""
    import signal
    import threading

    from ch08.serve_thread import ServerProcess

    server = ServerProcess(["--checkpoint", str(checkpoint), "--max-batch", "4", "--shutdown-timeout", "60"])
    with server as url:
        result = {}

        def long_request():
            body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 300, "temperature": 0}
            result["r"] = httpx.post(url + "/v1/completions", json=body, timeout=120)

        t = threading.Thread(target=long_request)
        t.start()
        for _ in range(200):  # wait until the request is running
            if httpx.get(url + "/health").json()["running"]:
                break
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGINT)
        t.join(timeout=120)
        assert server.proc.wait(timeout=60) == 0
    assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 300
