"""The capstone's one evaluation table: each column is exactly what the chapter that teaches it computes, a saved
model directory evaluates like the model in memory, and the JSON holds the printed numbers."""

from __future__ import annotations

import json

import pytest
import torch

from ch01.bench_bpb import held_out_text
from ch01.char_tokenizer import CharTokenizer
from ch01.cloze import TARGET_DELIMITER, build_cloze
from ch01.evaluate import bits_per_byte
from ch01.model import GPT, GPTConfig
from ch01.scoring import multiple_choice
from ch10 import eval_suite
from common.data import load_shakespeare


@pytest.fixture(scope="module")
def saved(one_thread, tmp_path_factory):
    tok = CharTokenizer.from_text(load_shakespeare())
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=tok.vocab_size)).eval()
    d = tmp_path_factory.mktemp("tiny")
    model.save(d)
    tok.save(d)
    return model, tok, d


def test_row_is_each_chapters_own_numbers(saved, tmp_path):
    model, tok, d = saved
    out = tmp_path / "eval.json"
    argv = ["--models", "", "--extra", f"tiny={d}", "--chars", "600", "--cloze", "8", "--tasks", "2",
            "--humaneval", "2", "--out", str(out)]  # fmt: skip
    res = eval_suite.main(argv)
    (row,) = res["rows"]
    assert row["model"] == "tiny" and row["context"] == 64
    assert row["bpb shakespeare"] == pytest.approx(bits_per_byte(model, tok, held_out_text(600), block_size=64))
    mc = multiple_choice(model, tok, build_cloze(8), target_delimiter=TARGET_DELIMITER)
    assert (row["cloze acc"], row["cloze acc_norm"]) == (mc["acc"], mc["acc_norm"])
    assert row["HumanEval pass@1"] is None  # 64 tokens of context cannot hold a HumanEval prompt
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(res["rows"]))


def test_text_a_vocabulary_cannot_encode_gives_no_number(saved):
    model, tok, _ = saved
    args = eval_suite.parse_args(["--models", "", "--cloze", "4", "--tasks", "0", "--humaneval", "0"])
    row = eval_suite.evaluate_model(model, tok, args, {"odd": "digits 0123456789"}, build_cloze(4))
    assert row["bpb odd"] is None  # Shakespeare's 65 characters hold no digit but 3: no made-up bpb
    assert row["tasks EM"] is None and row["HumanEval pass@1"] is None


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="label=path"):
        eval_suite.load_extra("no-equals-sign", "cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        eval_suite.load_extra(f"x={tmp_path / 'missing'}", "cpu")
    with pytest.raises(SystemExit):
        eval_suite.parse_args(["--models", "gpt-5"])
