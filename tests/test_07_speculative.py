"""ch07 speculative decoding: greedy == target greedy token for token; sampled output distribution == the target's."""

import itertools

import pytest
import torch
from scipy.stats import chisquare

from ch01.model import GPT, GPTConfig
from ch07.fused_decode import FusedDecoder
from ch07.kv_cache import generate
from ch07.sampling import Sampler
from ch07.speculative import speculative_generate


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared, oversubscribed CPU two spinning OpenMP threads make small ops ~100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(seed, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=24, block_size=128, init_std=0.3)
    return GPT(GPTConfig.preset("tiny", **{**cfg, **kw})).eval()


@pytest.fixture(scope="module")
def pair():
    target = make(0)
    draft = make(0)  # the target with noisy weights: agrees often, not always
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return target, draft


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_equals_target_greedy(pair, k):
    target, draft = pair
    for plen in (1, 9):
        prompt = torch.randint(0, 24, (plen,), generator=torch.Generator().manual_seed(plen))
        out, stats = speculative_generate(target, draft, prompt, 60, k=k)
        assert torch.equal(out, generate(target, prompt, 60))
        assert 0.0 < stats.acceptance_rate < 1.0  # both the accept and the reject paths ran
        assert stats.emitted >= 60 and stats.rounds < 60


@pytest.mark.parametrize("fused", [False, True], ids=["gpt", "fused"])
def test_greedy_rule_is_the_general_rule_on_one_hot_distributions(pair, fused):
    """Greedy acceptance (argmax comparisons) is Leviathan's rule on one-hot p and q: a temperature so low that every
    distribution is one-hot in float32 takes the sampled path and gives the same tokens AND statistics."""
    target, draft = pair
    if fused:
        target, draft = FusedDecoder(target), FusedDecoder(draft)
    prompt = torch.tensor([5, 3, 7])
    cold = Sampler(temperature=1e-6)
    for k in (1, 2, 4, 7):
        greedy, greedy_st = speculative_generate(target, draft, prompt, 50, k=k)
        sampled, sampled_st = speculative_generate(
            target, draft, prompt, 50, k=k, sampler=cold, generator=torch.Generator().manual_seed(k)
        )
        assert torch.equal(greedy, sampled) and greedy.shape == (1, 50)
        assert greedy_st == sampled_st and 0 < greedy_st.accepted < greedy_st.proposed
    eos = int(greedy[0, 20])  # a token that first occurs somewhere in the output: both stop right after it
    greedy, _ = speculative_generate(target, draft, prompt, 50, k=3, eos_id=eos)
    sampled, _ = speculative_generate(target, draft, prompt, 50, k=3, eos_id=eos, sampler=cold)
    assert torch.equal(greedy, sampled) and greedy[0, -1] == eos and eos not in greedy[0, :-1].tolist()
    assert torch.equal(greedy, generate(target, prompt, 50, eos_id=eos))


def test_repetition_penalty_greedy_equals_target(pair):
    target, draft = pair
    s = Sampler(temperature=0, repetition_penalty=1.5)
    prompt = torch.tensor([1, 2, 3])
    out, stats = speculative_generate(target, draft, prompt, 40, k=3, sampler=s)
    assert torch.equal(out, generate(target, prompt, 40, s))
    assert 0 < stats.accepted < stats.proposed


def test_greedy_with_an_unrelated_draft_still_exact():
    target, draft = make(0), make(1, n_layer=1, n_embd=32)
    prompt = torch.tensor([3, 1, 4, 1, 5])
    out, _ = speculative_generate(target, draft, prompt, 40, k=4)
    assert torch.equal(out, generate(target, prompt, 40))


def test_draft_equal_to_target_accepts_everything(pair):
    target, _ = pair
    _, stats = speculative_generate(target, target, torch.tensor([1, 2]), 40, k=4)
    assert stats.acceptance_rate == 1.0 and stats.tokens_per_target_forward == pytest.approx(5.0, abs=0.6)
    s = Sampler(temperature=1.0)
    _, stats = speculative_generate(
        target, target, torch.tensor([1, 2]), 40, k=4, sampler=s, generator=torch.Generator().manual_seed(0)
    )
    assert stats.acceptance_rate == 1.0  # p == q: min(1, p/q) = 1


@torch.no_grad()
def exact_distribution(model, prompt, n, sampler, V):
    """P(x_1..x_n | prompt) for every sequence, by enumeration."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=n)))  # (V^n, n)
    full = torch.cat([prompt.expand(len(seqs), -1), seqs], 1)
    logits = model(full)[:, len(prompt) - 1 : -1]  # (V^n, n, V)
    probs = torch.stack([sampler.probs(logits[:, i]) for i in range(n)], 1)  # (V^n, n, V)
    return probs.gather(-1, seqs[..., None]).squeeze(-1).prod(-1), seqs  # (V^n,)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "sampler,n,draws",
    [
        (Sampler(temperature=1.0), 2, 1500),
        pytest.param(Sampler(temperature=0.8, top_k=3), 3, 2500, marks=pytest.mark.slow),
    ],
)
def test_sampled_distribution_equals_target(sampler, n, draws):
    V = 4
    target = make(2, vocab_size=V, n_layer=1, n_embd=16, init_std=1.0)
    draft = make(3, vocab_size=V, n_layer=1, n_embd=16, init_std=1.0)
    prompt = torch.tensor([0, 1])
    expected, seqs = exact_distribution(target, prompt, n, sampler, V)
    draft_expected, _ = exact_distribution(draft, prompt, n, sampler, V)
    index = {tuple(s.tolist()): i for i, s in enumerate(seqs)}
    g = torch.Generator().manual_seed(1234)
    counts, accepted, proposed = torch.zeros(len(seqs)), 0, 0
    for _ in range(draws):
        out, st = speculative_generate(target, draft, prompt, n, k=2, sampler=sampler, generator=g)
        counts[index[tuple(out[0].tolist())]] += 1
        accepted, proposed = accepted + st.accepted, proposed + st.proposed
    assert 0.1 < accepted / proposed < 0.95  # acceptance and rejection both exercised

    def pvalue(dist):
        keep = dist * draws >= 5  # chi-square needs expected counts >= 5: pool the rest into one bin
        exp = torch.cat([dist[keep], dist[~keep].sum()[None]]) * draws
        obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
        ok = exp > 0
        return chisquare(obs[ok].numpy(), exp[ok].numpy() * obs[ok].sum().item() / exp[ok].sum().item()).pvalue

    assert pvalue(expected) > 1e-3  # the samples look like the target's exact distribution
    assert pvalue(draft_expected) < 1e-6  # and the test has power: they clearly are not the draft's


def test_errors(pair):
    target, draft = pair
    with pytest.raises(ValueError):
        speculative_generate(target, draft, torch.tensor([1]), 10, k=0)
    with pytest.raises(ValueError):
        speculative_generate(target, draft, torch.tensor([1]), 200)
    with pytest.raises(ValueError):
        speculative_generate(target, make(0, vocab_size=30), torch.tensor([1]), 5)
