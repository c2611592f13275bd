"""lm-evaluation-harness over our models: CourseLM (ch01.scoring inside the harness) and the harness's own hf backend on
our HF export give ch01.scoring's multiple-choice scores on the Shakespeare cloze, choice by choice."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval tests need lm-evaluation-harness: pip install lm-eval")

from ch01.char_tokenizer import CharTokenizer  # noqa: E402
from ch01.cloze import TARGET_DELIMITER, build_cloze, write_jsonl  # noqa: E402
from ch01.model import GPT, GPTConfig  # noqa: E402
from ch01.scoring import loglikelihood, loglikelihood_rolling, multiple_choice  # noqa: E402
from ch10.lm_eval_adapter import CourseLM, hf_scores, lm_eval_scores  # noqa: E402
from common.data import load_shakespeare  # noqa: E402


def _flat(lls):
    return [x for row in lls for x in row]


@pytest.fixture(scope="module")
def setup(one_thread, tmp_path_factory):
    tok = CharTokenizer.from_text(load_shakespeare())
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=tok.vocab_size)).eval()
    items = build_cloze(12, seed=3)
    jsonl = write_jsonl(items, tmp_path_factory.mktemp("cloze") / "cloze.jsonl")
    ours = multiple_choice(model, tok, items, target_delimiter=TARGET_DELIMITER, return_lls=True)
    return model, tok, jsonl, ours


def test_lm_eval_with_course_lm_gives_our_scores(setup):
    model, tok, jsonl, ours = setup
    theirs = lm_eval_scores(CourseLM(model, tok, batch_size=5), jsonl, lls=True)
    assert _flat(theirs["lls"]) == pytest.approx(_flat(ours["lls"]), abs=1e-6)  # the harness built the same requests
    assert (theirs["acc"], theirs["acc_norm"]) == (ours["acc"], ours["acc_norm"])


@pytest.mark.timeout(300)
def test_lm_eval_hf_backend_on_our_export_gives_our_scores(setup):
    model, tok, jsonl, ours = setup
    theirs = hf_scores(model, tok, jsonl, lls=True)  # transformers' LlamaForCausalLM, the harness's own batching
    assert _flat(theirs["lls"]) == pytest.approx(_flat(ours["lls"]), abs=1e-3)
    assert (theirs["acc"], theirs["acc_norm"]) == (ours["acc"], ours["acc_norm"])


def test_course_lm_answers_all_three_request_types(setup):
    from lm_eval.api.instance import Instance

    model, tok, _, _ = setup
    lm = CourseLM(model, tok)

    def req(kind, args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    pairs = [("ROMEO:\nBut soft", ", what light"), ("", "To be")]
    assert lm.loglikelihood([req("loglikelihood", p) for p in pairs]) == loglikelihood(model, tok, pairs)
    text = "O Romeo, Romeo! wherefore art thou Romeo? " * 3  # longer than block_size: several windows
    [rolled] = lm.loglikelihood_rolling([req("loglikelihood_rolling", (text,))])
    assert rolled == loglikelihood_rolling(model, tok, [text])[0] < 0
    [out] = lm.generate_until([req("generate_until", ("ROMEO:", {"until": ["\n"], "max_gen_toks": 20}))])
    assert isinstance(out, str) and "\n" not in out and len(out) <= 20


@pytest.mark.parametrize("n, max_len", [(1, 4), (4, 4), (5, 4), (13, 4), (9, 1), (100, 7)])
def test_rolling_windows_are_the_harness_windows(n, max_len):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from ch01.scoring import rolling_windows

    ids = list(range(100, 100 + n))
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, -1, max_len, context_len=1)]
    ours = [(inp[: len(inp) - len(tgt) + 1], tgt) for inp, tgt in rolling_windows(ids, -1, max_len)]
    assert ours == theirs
