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
