"""ch07 MLX port: loads our safetensors, logits == torch (fp32), cached generation == torch greedy, training learns."""

import numpy as np
import pytest
import torch

from ch01.model import GPT, GPTConfig

mx = pytest.importorskip("mlx.core", reason="MLX is not installed (pip install mlx[cpu] on Linux)")
pytestmark = [pytest.mark.mlx, pytest.mark.usefixtures("one_thread")]


def torch_and_mlx(tmp_path, **kw):
    from ch07.mlx_minigpt import MLXGPT

    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=48, init_std=0.3, **kw)).eval()
    return model, MLXGPT.load(model.save(tmp_path / "m"))


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}, {"tie_weights": True}])
def test_logits_match_torch(tmp_path, kw):
    model, mlx_model = torch_and_mlx(tmp_path, **kw)
    ids = torch.randint(0, 48, (3, 40))
    with torch.no_grad():
        ref = model(ids).numpy()
    ours = np.array(mlx_model(mx.array(ids.numpy())))
    assert np.abs(ours - ref).max() <= 1e-4


def test_cached_generation_matches_torch_greedy(tmp_path):
    model, mlx_model = torch_and_mlx(tmp_path, n_kv_head=2)
    prompt = torch.randint(0, 48, (1, 7), generator=torch.Generator().manual_seed(1))
    ref = model.generate(prompt, 40, temperature=0)[:, 7:].numpy()
    cached = np.array(mlx_model.generate(mx.array(prompt.numpy()), 40))
    uncached = np.array(mlx_model.generate(mx.array(prompt.numpy()), 40, use_cache=False))
    assert (cached == ref).all() and (uncached == ref).all()
    assert len(set(ref[0].tolist())) > 3


def test_chunked_cache_forward_matches_full(tmp_path):
    _, mlx_model = torch_and_mlx(tmp_path)
    ids = mx.array(np.random.default_rng(0).integers(0, 48, (2, 30)))
    cache = mlx_model.new_cache()
    a = mlx_model(ids[:, :17], cache, 0)
    b = mlx_model(ids[:, 17:], cache, 17)
    full = np.array(mlx_model(ids))
    assert np.abs(np.concatenate([np.array(a), np.array(b)], 1) - full).max() <= 1e-5


def test_training_steps_reduce_loss():
    import mlx.nn as nn
    import mlx.optimizers as optim

    from ch07.mlx_minigpt import MLXGPT

    mx.random.seed(0)
    model = MLXGPT(GPTConfig.preset("tiny", vocab_size=16, n_layer=1))
    data = np.tile(np.arange(16), 40)  # a pattern the model can learn in a few steps
    x, y = mx.array(data[None, :32].repeat(4, 0)), mx.array(data[None, 1:33].repeat(4, 0))
    opt = optim.AdamW(learning_rate=1e-2)
    step = nn.value_and_grad(model, lambda m, a, b: m.loss(a, b))
    losses = []
    for _ in range(15):
        loss, grads = step(model, x, y)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_rejects_unsupported_config():
    from ch07.mlx_minigpt import MLXGPT

    with pytest.raises(ValueError):
        MLXGPT(GPTConfig.preset("tiny", norm="layernorm"))
