"""The capstone's server with a real pretrained LLM: ``minigpt.py serve --model smollm2-135m-instruct`` answers the
official openai client's chat.completions (streaming and not) through the model's own chat template, token for token
what ch01's chat gives."""

from __future__ import annotations

import openai
import pytest

from ch01.chat import reply
from ch01.chat_template import apply_chat_template
from ch08.serve_thread import ServerThread
from ch10.config import load_config
from ch10.minigpt import server_state
from ch10.stages import Run

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served(smollm2, tmp_path_factory):
    import ch01.pretrained

    patch = pytest.MonkeyPatch()
    patch.setattr(ch01.pretrained, "load_pretrained", lambda name: smollm2)  # the session's model, not a reload
    run = Run(load_config("tiny"), str(tmp_path_factory.mktemp("runs")), progress=False)
    state = server_state(run, "smollm2-135m-instruct")
    patch.undo()
    with ServerThread(state) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_completion_uses_the_models_template_and_stops_at_im_end(served, smollm2):
    model, tok = smollm2
    expected = reply(model, tok, QUESTION, 24, temperature=0)
    r = served.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == expected == "The capital of France is Paris."
    assert r.choices[0].finish_reason == "stop"  # <|im_end|>, well before 24 tokens
    assert r.usage.prompt_tokens == len(apply_chat_template(tok, QUESTION))


def test_streaming_equals_non_streaming(served):
    kw = dict(model="smollm2-135m-instruct", messages=QUESTION, max_tokens=24, temperature=0)
    full = served.chat.completions.create(**kw).choices[0].message.content
    chunks = served.chat.completions.create(stream=True, **kw)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full


def test_bad_requests_get_errors_and_the_server_keeps_serving(served):
    with pytest.raises(openai.APIStatusError) as e:
        served.chat.completions.create(model="other-model", messages=QUESTION, max_tokens=4)
    assert e.value.status_code // 100 == 4
    with pytest.raises(openai.BadRequestError):  # prompt + max_tokens beyond the served context
        served.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, max_tokens=100_000)
    r = served.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length"
