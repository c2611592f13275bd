"""ch05.scan / ch05.mamba: parallel scan == sequential scan (forward and gradients), recurrent generation == parallel."""

import pytest
import torch

from ch05.mamba import MambaConfig, MambaLM
from ch05.scan import chunked_scan, parallel_scan, selective_scan, sequential_scan


@pytest.mark.parametrize("inner", ["stepped", "hillis-steele"])
@pytest.mark.parametrize("L,chunk", [(1, None), (37, None), (64, 8), (300, None), (300, 7)])
def test_chunked_scan_equals_loop(L, chunk, inner):
    g = torch.Generator().manual_seed(L)
    a = torch.rand(2, L, 3, 4, generator=g, dtype=torch.float64)
    b = torch.randn(2, L, 3, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(chunked_scan(a, b, chunk, inner), sequential_scan(a, b), rtol=1e-12, atol=1e-12)


def _ssm_inputs(L, E=8, N=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(2, L, E, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(2, L, E, generator=g))
    A = -torch.exp(torch.randn(E, N, generator=g))
    B, C = torch.randn(2, L, N, generator=g), torch.randn(2, L, N, generator=g)
    D = torch.randn(E, generator=g)
    return [t.requires_grad_() for t in (u, delta, A, B, C, D)]


@pytest.mark.parametrize("L", [5, 200])
def test_selective_scan_parallel_equals_sequential_fwd_and_grads(L):
    inputs = _ssm_inputs(L)
    y_seq = selective_scan(*inputs, scan="sequential")
    y_par = selective_scan(*inputs, scan="parallel")
    torch.testing.assert_close(y_par, y_seq, rtol=0, atol=1e-5)
    w = torch.randn_like(y_seq)
    g_seq = torch.autograd.grad((y_seq * w).sum(), inputs)
    g_par = torch.autograd.grad((y_par * w).sum(), inputs)
    for name, gs, gp in zip("u delta A B C D".split(), g_seq, g_par):
        scale = gs.abs().max().clamp_min(1.0)  # A's gradient sums over B·L terms: compare relative to its size
        assert (gp - gs).abs().max() / scale < 1e-5, name


def test_parallel_scan_gradcheck_float64():
    a = torch.rand(1, 11, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 11, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: parallel_scan(a, b, 4), (a, b))


def _tiny_mamba(**kw):
    torch.manual_seed(0)
    return MambaLM(MambaConfig(vocab_size=65, block_size=32, n_layer=2, d_model=32, **kw)).eval()


def test_recurrent_step_equals_parallel_forward():
    model = _tiny_mamba()
    idx = torch.randint(0, 65, (3, 20))
    with torch.no_grad():
        full = model(idx)  # (B, L, V) parallel scan
        states = model.init_state(3)
        steps = []
        for t in range(idx.shape[1]):
            logits, states = model.step(idx[:, t], states)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=0, atol=1e-5)


def test_prompt_state_then_steps_equals_parallel():
    model = _tiny_mamba()
    idx = torch.randint(0, 65, (2, 24))
    with torch.no_grad():
        full = model(idx)
        for split in (1, 2, 10):  # shorter and longer than the conv window
            _, states = model(idx[:, :split], return_state=True)
            for t in range(split, idx.shape[1]):
                logits, states = model.step(idx[:, t], states)
                torch.testing.assert_close(logits, full[:, t], rtol=0, atol=1e-5)
        greedy = model.generate(idx[:, :5], 10, temperature=0)
        for t in range(5, 15):  # each greedy token is the argmax of the parallel forward over its prefix
            assert greedy[:, t].tolist() == model(greedy[:, :t])[:, -1].argmax(-1).tolist()


def test_sequential_and_parallel_models_agree():
    model = _tiny_mamba()
    idx = torch.randint(0, 65, (2, 16))
    par = model(idx)
    model.config.scan = "sequential"
    torch.testing.assert_close(model(idx), par, rtol=0, atol=1e-5)
