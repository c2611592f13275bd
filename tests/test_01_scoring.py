"""ch01.scoring (lm-eval-style log-likelihood scoring), bits_per_byte on top of it, and the Shakespeare cloze task."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ch01.char_tokenizer import CharTokenizer
from ch01.cloze import build_cloze, read_jsonl
from ch01.evaluate import bits_per_byte
from ch01.model import GPT, GPTConfig
from ch01.scoring import (
    check_items,
    exact_match,
    generate_until,
    loglikelihood,
    loglikelihood_rolling,
    multiple_choice,
    rolling_windows,
)
from common.data import load_shakespeare, train_val_split

ALPHABET = "abcx \n"  # ids 0..5 for the hand-made models below
PROBS = {"a": 0.4, "b": 0.1, "c": 0.2, "x": 0.15, " ": 0.1, "\n": 0.05}


class Unigram(torch.nn.Module):
    """p(next token) is PROBS whatever the context: every log-likelihood is a hand-checkable sum."""

    def __init__(self, block_size: int = 16):
        super().__init__()
        self.config = SimpleNamespace(block_size=block_size, n_layer=1)
        self.logp = torch.nn.Parameter(torch.log(torch.tensor([PROBS[c] for c in ALPHABET])), requires_grad=False)

    def forward(self, idx, **_):
        return self.logp.expand(*idx.shape, -1)  # (B, T, V)


class Counter(Unigram):
    """Greedy next token = (last token + 1) mod V: 'a' -> 'b' -> 'c' -> 'x' -> ' ' -> '\\n' -> 'a' …"""

    def forward(self, idx, **_):
        return F.one_hot((idx + 1) % len(ALPHABET), len(ALPHABET)).float() * 5.0  # (B, T, V)


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer(ALPHABET)


@pytest.fixture(scope="module")
def tiny(one_thread):
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", vocab_size=len(ALPHABET), block_size=16)).eval()


def test_loglikelihood_is_the_sum_of_a_plain_forward_over_the_continuation(tiny, tok):
    requests = [("abc", " xa"), ("a", "b"), ("xxab ca", "c b"), ("abcabcabcabcabcabcab", "cax")]  # last: cut left
    got = loglikelihood(tiny, tok, requests, batch_size=3)  # ragged batches, sorted and restored
    for (ctx, cont), (lp, greedy) in zip(requests, got):
        ids = tok.encode(ctx + cont)[-(tiny.config.block_size + 1) :]
        with torch.no_grad():
            logp = F.log_softmax(tiny(torch.tensor([ids[:-1]])), -1)[0]  # (T, V)
        n = len(cont)
        rows = logp[-n:]
        assert lp == pytest.approx(rows.gather(1, torch.tensor(ids[-n:])[:, None]).sum().item(), abs=1e-5)
        assert greedy == (rows.argmax(-1).tolist() == ids[-n:])


def test_greedy_flag_and_trailing_space_moves_into_the_continuation(tok):
    (lp, greedy), (lp2, greedy2) = loglikelihood(Counter(), tok, [("a", "bcx"), ("ab ", "a")])
    assert greedy and not greedy2  # after "ab" the counter says "c", not " "
    (lp3, _), (lp4, _) = loglikelihood(Unigram(), tok, [("ab ", "a"), ("ab", " a")])
    assert lp3 == lp4 == pytest.approx(math.log(0.1) + math.log(0.4))  # the space is scored in both


def test_acc_and_acc_norm_match_a_hand_computation(tok):
    items = [
        {"context": "x", "choices": ["c", "aaa"], "gold": 1},  # " c": ln.1+ln.2 = -3.91; " aaa": ln.1+3ln.4 = -5.05
        {"context": "ab", "choices": ["bb", "c"], "gold": 1},  # " bb": 3ln.1 = -6.91; " c": -3.91
    ]
    res = multiple_choice(Unigram(), tok, items, return_lls=True)
    assert res["lls"][0] == pytest.approx([math.log(0.1 * 0.2), math.log(0.1 * 0.4**3)])
    # acc takes the larger sum: item 0 -> "c" (wrong), item 1 -> "c" (right).
    # acc_norm divides by len(choice), the delimiter not counted: item 0: -3.91/1 < -5.05/3 -> "aaa" (right);
    # item 1: -6.91/2 = -3.45 > -3.91/1 -> "bb" (wrong).
    assert res["acc"] == pytest.approx(0.5) and res["acc_norm"] == pytest.approx(0.5)
    per_item = [multiple_choice(Unigram(), tok, [it]) for it in items]
    assert [(r["acc"], r["acc_norm"]) for r in per_item] == [(0.0, 1.0), (1.0, 0.0)]


def test_bits_per_byte_is_total_nll_over_bytes_ln2(tok, tiny):
    text = "abcab xa"
    nll = -sum(math.log(PROBS[c]) for c in text[1:])  # the first token is not predicted
    for block_size in (2, 3, 16):  # windows of any size: a unigram model does not care about context
        assert bits_per_byte(Unigram(), tok, text, block_size=block_size) == pytest.approx(nll / 7 / math.log(2))
    ids = tok.encode(text)
    with torch.no_grad():  # one window: bpb = mean loss * tokens / (bytes * ln 2)
        loss = F.cross_entropy(tiny(torch.tensor([ids[:-1]]))[0], torch.tensor(ids[1:])).item()
    assert bits_per_byte(tiny, tok, text, block_size=16) == pytest.approx(loss * 7 / (7 * math.log(2)), rel=1e-5)
    [total] = loglikelihood_rolling(Unigram(), tok, [text], block_size=3)  # every token, the first after "\n"
    assert total == pytest.approx(-nll + math.log(PROBS[text[0]]))


@pytest.mark.parametrize("n, max_len", [(1, 4), (4, 4), (5, 4), (13, 4), (9, 1)])
def test_rolling_windows_predict_every_token_once_with_its_own_history(n, max_len):
    ids = list(range(100, 100 + n))
    seen = []
    for inp, tgt in rolling_windows(ids, -1, max_len):
        assert len(inp) <= max_len and 1 <= len(tgt) <= len(inp)
        full = [-1] + ids
        end = full.index(tgt[0]) - 1 + len(tgt)  # inp is exactly the tokens before each target, in order
        assert inp == full[end - len(inp) : end]
        seen += tgt
    assert seen == ids


def test_generate_until_cuts_at_the_stop_string_and_exact_match_uses_the_checker(tok):
    assert generate_until(Counter(), tok, [("a", {"until": ["x"], "max_gen_toks": 10})]) == ["bc"]
    assert generate_until(Counter(), tok, [("a", {"until": [], "max_gen_toks": 3})]) == ["bcx"]
    items = [{"context": "a", "answer": "bc", "until": ["x"]}, {"context": "c", "answer": "x", "until": ["a"]}]
    res = exact_match(Counter(), tok, items)
    assert res["predictions"] == ["bc", "x \n"] and res["exact_match"] == 1.0  # default checker strips whitespace
    strict = exact_match(Counter(), tok, items, checker=lambda pred, answer: pred == answer)
    assert strict["exact_match"] == 0.5


@pytest.mark.parametrize(
    "row, message",
    [
        ({"context": "a", "choices": [], "gold": 0}, "non-empty list"),
        ({"context": "a", "choices": ["b", ""], "gold": 0}, "non-empty string"),
        ({"context": "a", "choices": ["b", "c"], "gold": 2}, "index into its 2 choices"),
        ({"context": "a", "choices": ["b"]}, "needs the keys"),
        ({"context": 3, "choices": ["b"], "gold": 0}, "'context' must be a string"),
    ],
)
def test_malformed_items_raise_a_clear_value_error(row, message, tmp_path, tok):
    with pytest.raises(ValueError, match=message):
        check_items([row])
    with pytest.raises(ValueError, match="item 0"):
        multiple_choice(Unigram(), tok, [row])
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"context": "a", "choices": ["b"], "gold": 0}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="item 1"):
        read_jsonl(path)


def test_cloze_is_deterministic_and_its_answer_is_the_real_next_line(tmp_path):
    items = build_cloze(30, seed=7)
    assert items == build_cloze(30, seed=7) and items != build_cloze(30, seed=8)
    lines = train_val_split(load_shakespeare())[1].split("\n")
    golds = set()
    for it in items:
        assert it["choices"][it["gold"]] == lines[it["line"]]  # the true next line of the validation split
        assert it["context"] == "\n".join(lines[it["line"] - 2 : it["line"]])
        assert len(set(it["choices"])) == 4
        golds.add(it["gold"])
    assert golds == {0, 1, 2, 3}  # the answer's position is shuffled
    check_items(items)


def test_smollm2_scores_a_bpe_continuation_like_a_plain_forward_and_knows_easy_facts(smollm2, one_thread):
    model, tok = smollm2
    ctx, cont = "The capital of France is", " Paris"
    [(lp, greedy)] = loglikelihood(model, tok, [(ctx, cont)])
    ids, n = tok.encode(ctx + cont), len(tok.encode(ctx + cont)) - len(tok.encode(ctx))
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]])).float(), -1)[0, -n:]  # (n, V)
    assert lp == pytest.approx(logp.gather(1, torch.tensor(ids[-n:])[:, None]).sum().item(), abs=1e-3)
    items = [
        {"context": "The capital of France is", "choices": ["Paris.", "a banana."], "gold": 0},
        {"context": "One, two, three, four,", "choices": ["seven, nine.", "five, six."], "gold": 1},
    ]
    res = multiple_choice(model, tok, items)
    assert res["acc"] == 1.0 and res["acc_norm"] == 1.0
