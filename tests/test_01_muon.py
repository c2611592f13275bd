"""ch01.muon: Newton–Schulz vs an SVD's U V^T, the update vs torch.optim.Muon / AdamW, and Muon in the training loop."""

from __future__ import annotations

import pytest
import torch

from ch01.model import GPTConfig
from ch01.muon import Muon, muon_param_groups, newton_schulz
from ch01.train import TrainConfig, prepare_data, train


@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_newton_schulz_keeps_singular_vectors_and_squashes_singular_values(shape):
    """An odd matrix polynomial maps U S V^T to U p(S) V^T: U^T X V is diagonal; Keller Jordan's quintic puts p(S) in
    about [0.7, 1.2] after 5 steps (deliberately not exactly 1: it buys speed)."""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    x = newton_schulz(g, steps=5, dtype=torch.float64)
    assert x.shape == g.shape
    core = u.T @ x @ vh.T  # (k, k): diagonal iff the singular vectors are kept
    off = core - torch.diag(torch.diagonal(core))
    assert off.abs().max() < 1e-10
    assert 0.6 < torch.diagonal(core).min() and torch.diagonal(core).max() < 1.25


def test_cubic_newton_schulz_converges_to_the_polar_factor():
    """The classic cubic iteration (a, b, c) = (1.5, -0.5, 0) converges to exactly U V^T (the polar factor)."""
    gen = torch.Generator().manual_seed(1)
    q1, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(64, 40, generator=gen, dtype=torch.float64))
    g = q2 @ torch.diag(torch.linspace(0.3, 3.0, 40, dtype=torch.float64)) @ q1.T  # (64, 40), condition number 10
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    x = newton_schulz(g, steps=60, coefficients=(1.5, -0.5, 0.0), dtype=torch.float64)
    torch.testing.assert_close(x, u @ vh, atol=1e-9, rtol=0)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon (torch >= 2.9)")
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_matrix_update_equals_torch_optim_muon(adjust):
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(32, 48, generator=gen)
    grads = [torch.randn(32, 48, generator=gen) for _ in range(3)]
    ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = Muon(
        [{"params": [ours], "use_muon": True}], lr=0.02, weight_decay=0.1, adjust_lr=adjust, ns_dtype=torch.bfloat16
    )
    opt_ref = torch.optim.Muon([ref], lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust)
    for g in grads:
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        opt_ref.step()
    assert not torch.equal(ours.detach(), w0)
    torch.testing.assert_close(ours.detach(), ref.detach(), atol=1e-6, rtol=1e-6)


def test_non_matrix_update_equals_torch_adamw():
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(10, 7, generator=gen)
    ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = Muon([{"params": [ours], "use_muon": False}], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
    opt_ref = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8)
    for _ in range(4):
        g = torch.randn(10, 7, generator=gen)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        opt_ref.step()
    torch.testing.assert_close(ours.detach(), ref.detach(), atol=1e-6, rtol=1e-6)


def test_param_groups_route_matrices_to_muon_and_bad_input_is_rejected():
    from ch01.model import GPT

    model = GPT(GPTConfig.preset("tiny", vocab_size=65, tie_weights=True))
    muon, adam_decay, adam_plain = muon_param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in adam_decay["params"]} == {"tok_emb.weight"}  # tied head = embedding: AdamW, once
    assert all(p.dim() == 2 and "blocks" in names[id(p)] for p in muon["params"])
    assert all(p.dim() == 1 for p in adam_plain["params"])
    assert sum(p.numel() for g in (muon, adam_decay, adam_plain) for p in g["params"]) == model.num_params()
    with pytest.raises(ValueError, match="2-D matrices only"):
        Muon([{"params": [torch.nn.Parameter(torch.ones(3))], "use_muon": True}])
    with pytest.raises(ValueError, match="choose 'adamw' or 'muon'"):
        from ch01.train import make_optimizer

        make_optimizer(model, TrainConfig(optimizer="sgd"))


def test_muon_in_the_training_loop_learns_and_resumes_bit_exact(tmp_path, monkeypatch):
    import ch01.train as T

    tok, tr, va = prepare_data("char")
    mcfg = GPTConfig.preset("tiny", vocab_size=65, block_size=32)

    def tc(sub):
        return TrainConfig(
            max_iters=30,
            batch_size=8,
            lr=3e-3,
            warmup_iters=3,
            eval_interval=1000,
            eval_iters=4,
            ckpt_interval=15,
            progress=False,
            out_dir=str(tmp_path / sub),
            device="cpu",
            optimizer="muon",
        )

    straight = train(mcfg, tc("a"), tr, va)
    assert straight["val"][-1][2] < 3.3  # uniform over 65 chars is 4.17
    real_save = T._Loop.save

    def save_then_die(loop, step):
        real_save(loop, step)
        if step == 15:
            raise KeyboardInterrupt  # dies right after the step-15 checkpoint (Muon's momentum buffers included)

    monkeypatch.setattr(T._Loop, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(mcfg, tc("b"), tr, va)
    monkeypatch.setattr(T._Loop, "save", real_save)
    resumed = train(mcfg, tc("b"), tr, va, resume=True)
    assert resumed["train_losses"] == straight["train_losses"]


def test_bench_optimizers_equal_time_run_uses_the_measured_step_cost_ratio():
    from ch01.bench_optimizers import main

    res = main(["--iters", "6", "--device", "cpu"])
    adam, muon, wall = (res["runs"][k][0] for k in ("adamw", "muon", "muon_wall"))
    assert wall["iters"] == max(1, round(6 * adam["cpu_ms_step"] / muon["cpu_ms_step"]))
    assert [r["run"] for r in res["rows"]] == ["AdamW", "Muon, equal steps", "Muon, equal CPU time"]
