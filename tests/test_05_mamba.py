"""ch05.scan / ch05.mamba: parallel scan == sequential scan (forward and gradients), recurrent generation == parallel."""

import pytest
import torch

from ch05 import compiledscan
from ch05.logscan import BOUND, LogSpaceSelectiveScan, choose_chunk, logspace_selective_scan
from ch05.mamba import MambaConfig, MambaLM
from ch05.scan import chunked_scan, parallel_scan, selective_scan, sequential_scan


@pytest.mark.parametrize("inner", ["stepped", "hillis-steele"])
@pytest.mark.parametrize("L,chunk", [(1, None), (37, None), (64, 8), (300, None), (300, 7)])
def test_chunked_scan_equals_loop(L, chunk, inner):
    g = torch.Generator().manual_seed(L)
    a = torch.rand(2, L, 3, 4, generator=g, dtype=torch.float64)
    b = torch.randn(2, L, 3, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(chunked_scan(a, b, chunk, inner), sequential_scan(a, b), rtol=1e-12, atol=1e-12)


def _ssm_inputs(L, E=8, N=4, seed=0, delta_shift=0.0, A_shift=0.0):
    """delta_shift / A_shift move log Δ·|A|: negative = tiny decay per step, positive = strong decay."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(2, L, E, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(2, L, E, generator=g) + delta_shift)
    A = -torch.exp(torch.randn(E, N, generator=g) + A_shift)
    B, C = torch.randn(2, L, N, generator=g), torch.randn(2, L, N, generator=g)
    D = torch.randn(E, generator=g)
    return [t.requires_grad_() for t in (u, delta, A, B, C, D)]


def _assert_fwd_and_grads_equal(inputs, scan_a, scan_b):
    y_a = selective_scan(*inputs, scan=scan_a)
    y_b = selective_scan(*inputs, scan=scan_b)
    # 1e-5 absolute for |y| ≤ 1, relative beyond (|y| reaches ~40 here, where one float32 ulp is already 4e-6)
    assert (y_b - y_a).abs().max() / y_a.abs().max().clamp_min(1.0) < 1e-5
    w = torch.randn_like(y_a)
    g_a = torch.autograd.grad((y_a * w).sum(), inputs)
    g_b = torch.autograd.grad((y_b * w).sum(), inputs)
    for name, ga, gb in zip("u delta A B C D".split(), g_a, g_b):
        scale = ga.abs().max().clamp_min(1.0)  # A's gradient sums over B·L terms: compare relative to its size
        assert (gb - ga).abs().max() / scale < 1e-5, name


# (L, Δ shift, A shift, path the fast scan must take: "full" = 32-step chunks, "shrunk" = shorter chunks to keep the
# exponents in range, "fallback" = a step decays by more than e^-BOUND, so the associative scan runs instead)
CASES = [
    (5, 0.0, 0.0, "full"),  # shorter than one chunk
    (200, 0.0, 0.0, "shrunk"),  # Δ·|A| up to ~50 in one step: 2-step chunks
    (300, -3.0, 0.0, "full"),  # Mamba-like Δ ≈ 0.05
    (2048, -8.0, -3.0, "full"),  # tiny decay (a_t ≈ 1 − 1e-5), long sequence
    (257, 2.0, 1.0, "fallback"),  # strong decay: a_t down to e^-200
    (64, 0.0, -1.0, "shrunk"),
]


@pytest.mark.parametrize("L,delta_shift,A_shift,path", CASES)
def test_selective_scan_parallel_equals_sequential_fwd_and_grads(L, delta_shift, A_shift, path):
    inputs = _ssm_inputs(L, delta_shift=delta_shift, A_shift=A_shift, seed=L)
    T = choose_chunk(inputs[1], inputs[2], max_chunk=32)
    assert path == ("fallback" if T is None else "full" if T == 32 else "shrunk")  # the case covers its path
    _assert_fwd_and_grads_equal(inputs, "sequential", "parallel")


def test_compiled_scan_equals_sequential_fwd_and_grads():
    """torch.compile'd chunked scan (compiledscan.py) == loop on every case above, including strong decay (where the
    log-space scan has to fall back), lengths that are not a multiple of its 16-step chunk, and batch 2. One test, so
    its graphs compile once (dynamic chunk count: every length reuses them)."""
    for L, delta_shift, A_shift, _ in CASES:
        inputs = _ssm_inputs(L, delta_shift=delta_shift, A_shift=A_shift, seed=L)
        y = selective_scan(*inputs, scan="compiled")
        assert type(y.grad_fn).__name__ == "CompiledSelectiveScanBackward"  # the compiled path ran, not a fallback
        _assert_fwd_and_grads_equal(inputs, "sequential", "compiled")
        with torch.no_grad():  # inference takes the no-states path with a reused buffer for exp(ΔA)
            torch.testing.assert_close(selective_scan(*inputs, scan="compiled"), y.detach(), rtol=0, atol=0)
    assert not compiledscan._BROKEN


def test_compiled_scan_falls_back_to_eager(monkeypatch):
    """float64 (not compiled) and a failing compiler both give the eager log-space result."""
    inputs = [t.detach().double().requires_grad_() for t in _ssm_inputs(40, delta_shift=-2.0, seed=4)]
    ref = logspace_selective_scan(*inputs)
    torch.testing.assert_close(compiledscan.compiled_selective_scan(*inputs), ref, rtol=0, atol=0)

    def broken(fn):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiledscan, "_kernel", broken)
    monkeypatch.setattr(compiledscan, "_BROKEN", [])
    inputs = _ssm_inputs(40, delta_shift=-2.0, seed=4)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        y = compiledscan.compiled_selective_scan(*inputs)
    torch.testing.assert_close(y, logspace_selective_scan(*inputs), rtol=0, atol=0)


def test_associative_scan_equals_sequential_fwd_and_grads():
    _assert_fwd_and_grads_equal(_ssm_inputs(200), "sequential", "associative")


@pytest.mark.parametrize("T,block", [(2, 2), (4, 12), (8, 64), (16, 1000)])
def test_logspace_chunk_and_block_sizes(T, block):
    """Any chunk length and block size (uneven last block, L not a multiple of T) gives the same result."""
    u, delta, A, B, C, D = _ssm_inputs(101, delta_shift=-3.0, seed=T)
    assert choose_chunk(delta, A, max_chunk=T) == T  # exponents in range for this forced chunk length
    ref = selective_scan(u, delta, A, B, C, D, scan="sequential")
    torch.testing.assert_close(LogSpaceSelectiveScan.apply(u, delta, A, B, C, D, T, block), ref, rtol=0, atol=1e-5)


def test_logspace_exponents_stay_in_range():
    """The chosen chunk keeps |A|·ΣΔ inside a chunk ≤ BOUND, so P = exp(±BOUND/2) cannot overflow float32."""
    u, delta, A, B, C, D = _ssm_inputs(512, delta_shift=-1.0, seed=3)
    T = choose_chunk(delta, A)
    X = delta.detach().view(2, -1, T, delta.shape[-1])[:, :, 1:].sum(2) * A.detach().abs().amax(-1)
    assert T is not None and X.max() <= BOUND
    assert choose_chunk(delta, A, max_chunk=2 * T) in (T, None) or X.max() > BOUND / 2
    assert torch.isfinite(torch.exp(torch.tensor(BOUND / 2))) and torch.exp(torch.tensor(BOUND / 2)) < 1e15


def test_logspace_gradcheck_float64():
    inputs = [t.detach().double().requires_grad_() for t in _ssm_inputs(13, E=3, N=2, seed=1, delta_shift=-2.0)]
    assert choose_chunk(inputs[1], inputs[2], max_chunk=4) == 4  # exponents in range for the forced chunk below
    assert torch.autograd.gradcheck(lambda *x: LogSpaceSelectiveScan.apply(*x, 4, 8), inputs)
    assert torch.autograd.gradcheck(lambda *x: logspace_selective_scan(*x), inputs)


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
