"""ch08's server on a real LLM: ``server.py --model smollm2-135m-instruct`` (what ``bench_server.py --model`` starts)
builds SmolLM2's server state (2048-token context, the name clients ask for, <|im_end|> as end of turn), and the load
test's concurrent streaming clients get it to generate without failures."""

import asyncio

import pytest

from ch08.bench_server import load_test, make_prompts
from ch08.serve_thread import ServerThread
from ch08.server import PRETRAINED_MAX_CONTEXT, parse_args, state_from_args

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def served(smollm2):
    """The state ``server.py --model NAME`` builds from its command line (with the session's loaded model)."""
    import ch01.pretrained

    args = parse_args(["--model", NAME, "--max-batch", "2", "--device", "cpu"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ch01.pretrained, "load_pretrained", lambda name: smollm2)
        return state_from_args(args)


def test_server_state_for_a_pretrained_model(served, smollm2):
    _, tok = smollm2
    assert served.model_name == NAME and served.max_context == PRETRAINED_MAX_CONTEXT == 2048
    assert served.scheduler.eos_id == tok.eos_id == tok.special_ids["<|im_end|>"]


def test_load_test_against_smollm2(served):
    with ServerThread(served) as url:
        r = asyncio.run(load_test(url, NAME, make_prompts(4, seed=0), n_clients=2, n_requests=2, max_tokens=4))
        bad = asyncio.run(load_test(url, "another-model", make_prompts(1, seed=0), 1, 1, 4))
    assert r["failed"] == 0 and r["requests"] == 2 and 1 <= r["tokens_per_req"] <= 4  # usage counted per request
    assert bad["failed"] == 1 and "404" in bad["first_failure"]  # the name clients send must be the served one


def test_unknown_model_is_one_clear_line():
    with pytest.raises(SystemExit, match="neither a known model"):
        from ch08.server import main

        main(["--model", "no-such-model"])


def test_real_tokenizer_greedy_n_stop_spanning_tokens_and_logprobs(smollm2):
    """On SmolLM2's byte-level BPE: n=2 greedy choices (forked KV blocks) equal ch01's generate; a stop string that
    starts inside one token and ends inside the next cuts the text there; chat logprobs equal log_softmax of a plain
    forward over the chat prompt."""
    import httpx
    import torch

    from ch01.chat_template import apply_chat_template
    from ch01.generate import generate
    from ch08.server import build_state

    model, tok = smollm2
    state = build_state(model, tok, NAME, max_batch=2, max_context=256, shutdown_timeout=2.0)
    prompt = "The capital of France is"
    ref = generate(model, [tok.encode(prompt)], 12, temperature=0.0)[0]
    text = tok.decode(ref)
    first = len(tok.decode(ref[:1]))
    stop = text[first - 2 : first + 1]  # the last two characters of token 1 + the first of token 2
    assert first >= 2 and len(tok.decode(ref[:2])) > first and text.find(stop) == first - 2
    msgs = [{"role": "user", "content": "Say hello."}]
    with ServerThread(state) as url:
        body = {"model": NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0, "n": 2}
        r = httpx.post(url + "/v1/completions", json=body, timeout=120).json()
        cut = httpx.post(url + "/v1/completions", json={**body, "n": 1, "stop": [stop]}, timeout=120).json()
        chat = httpx.post(
            url + "/v1/chat/completions",
            json={"model": NAME, "messages": msgs, "max_tokens": 4, "temperature": 0, "logprobs": True},
            timeout=120,
        ).json()
    assert [c["text"] for c in r["choices"]] == [text, text]
    assert (cut["choices"][0]["text"], cut["choices"][0]["finish_reason"]) == (text[: first - 2], "stop")
    ids = apply_chat_template(tok, msgs)
    gen = generate(model, [ids], 4, temperature=0.0, stop_ids=[tok.eos_id])[0]
    with torch.no_grad():
        ref_lp = torch.log_softmax(model(torch.tensor([ids + gen]))[0].float(), -1)  # (T, V)
    got = [c["logprob"] for c in chat["choices"][0]["logprobs"]["content"]]
    want = [float(ref_lp[len(ids) - 1 + i, t]) for i, t in enumerate(gen) if t != tok.eos_id]
    assert got == pytest.approx(want, abs=1e-3)
