"""ch07 sampling: each transform on hand-made logits, and the composition against transformers' logits processors."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ch07.sampling import GREEDY, Sampler, apply_min_p, apply_repetition_penalty, sample_rows

NEG = float("-inf")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared, oversubscribed CPU two spinning OpenMP threads make small ops ~100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_greedy_is_argmax_and_one_hot():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 0.0]])
    assert GREEDY(logits).tolist() == [1, 0]
    assert torch.equal(GREEDY.probs(logits), torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0]]))


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    out = Sampler(top_k=2).process(logits)
    assert torch.isinf(out[0, [0, 3]]).all() and torch.equal(out[0, [1, 2]], logits[0, [1, 2]])


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    p = Sampler(top_p=0.75).probs(probs.log())
    # 0.5 < 0.75, 0.5 + 0.3 >= 0.75: the first two survive, renormalised
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_min_p_threshold_is_relative_to_top_token():
    probs = torch.tensor([[0.6, 0.25, 0.1, 0.05]])
    out = apply_min_p(probs.log(), 0.2)  # threshold 0.12
    assert torch.isfinite(out[0, :2]).all() and torch.isinf(out[0, 2:]).all()


def test_repetition_penalty_lowers_seen_tokens_both_signs():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1, -1]]), 2.0)  # -1 = padding, ignored
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]


def test_temperature_scales_logits():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.allclose(Sampler(temperature=0.5).probs(logits), (logits * 2).softmax(-1))


@pytest.mark.parametrize("seed", range(4))
def test_composition_matches_transformers_processors(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 50, generator=g) * 3  # (B, V)
    context = torch.randint(0, 50, (3, 12), generator=g)
    kw = dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3)
    hf = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"]),
            TemperatureLogitsWarper(kw["temperature"]),
            TopKLogitsWarper(kw["top_k"]),
            TopPLogitsWarper(kw["top_p"]),
            MinPLogitsWarper(kw["min_p"]),
        ]
    )
    ref = hf(context, logits.clone())
    ours = Sampler(**kw).process(logits, context)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(ours[finite], ref[finite])


def test_draws_follow_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -5.0]]).repeat(20000, 1)
    s = Sampler(temperature=1.0, top_k=3)
    draws = s(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    expected = s.probs(logits[:1])[0]
    assert freq[3] == 0
    # 4 standard errors of a binomial proportion
    assert torch.all((freq - expected).abs() <= 4 * (expected * (1 - expected) / len(draws)).sqrt() + 1e-9)


def test_sample_rows_uses_each_rows_settings():
    logits = torch.tensor([[0.0, 5.0, 4.9], [0.0, 5.0, 4.9]])
    out = sample_rows(logits, [GREEDY, Sampler(top_k=1)], generated_ids=[None, torch.tensor([1])])
    # row 1 without a penalty is argmax; row 2 with top_k=1 and no penalty is also argmax
    assert out.tolist() == [1, 1]
    out = sample_rows(
        logits, [GREEDY, Sampler(temperature=0, repetition_penalty=2.0)], generated_ids=[None, torch.tensor([1])]
    )
    assert out.tolist() == [1, 2]  # the penalty halves logit 5.0 -> 2.5 < 4.9


def test_bad_settings_raise():
    for kw in (dict(temperature=-1), dict(top_p=0.0), dict(min_p=1.5), dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            Sampler(**kw)
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(4))
    assert math.isclose(Sampler().probs(torch.zeros(1, 4)).sum().item(), 1.0, rel_tol=1e-6)
