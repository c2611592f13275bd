"""A short training loop for *any* language model in this chapter (Transformer, MoE, Mamba, KAN-FFN), built from the
pieces of ``ch01.train`` (``get_batch``, ``cosine_lr``, ``make_optimizer``, ``estimate_loss``) so every architecture sees
the same batches, learning-rate schedule and evaluation.

Why not ``ch01.train.train``: it builds ``GPT(model_cfg)`` itself and minimises ``model.loss`` only, so it can neither
take a ready-made model (an MoE or Mamba model) nor add the MoE auxiliary losses. A ``model=`` (or ``model_factory=``)
argument plus "add ``model.aux_loss()`` when the model has one" in ``ch01.train.train`` would make this file unnecessary.

A model here needs: ``.config.block_size``, ``.loss(x, y) -> mean CE`` and, optionally, ``.aux_loss() -> scalar``.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from ch01.functional import cosine_lr
from ch01.train import TrainConfig, estimate_loss, make_optimizer
from common.data import get_batch
from common.seed import seed_everything


def train_model(
    model: torch.nn.Module,
    train_ids: torch.Tensor,
    val_ids: torch.Tensor,
    tc: TrainConfig,
    device: str | torch.device = "cpu",
    on_step=None,
) -> dict:
    """Train ``model`` in place for ``tc.max_iters`` steps.

    Returns {'train_losses' (CE per step), 'aux_losses', 'val' [(iter, val loss)], 'tokens_per_s', 'tokens_per_cpu_s',
    'train_time_s'}.
    Evaluation time is excluded from the throughput. ``on_step(it, model)`` is called after every optimizer step.
    """
    if tc.max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {tc.max_iters}")
    seed_everything(tc.seed)
    batch_gen = torch.Generator().manual_seed(tc.seed)  # same batches for every architecture
    model.to(device).train()
    opt = make_optimizer(model, tc)
    T = model.config.block_size
    history = {"train_losses": [], "aux_losses": [], "val": []}
    train_time = cpu_time = 0.0
    bar = tqdm(range(tc.max_iters), disable=not tc.progress, desc=type(model).__name__)
    for it in bar:
        if it % tc.eval_interval == 0:
            history["val"].append((it, estimate_loss(model, val_ids, tc.batch_size, tc.eval_iters, device, seed=2)))
        t0, c0 = time.perf_counter(), time.process_time()
        for g in opt.param_groups:
            g["lr"] = cosine_lr(it, tc.lr, tc.min_lr, tc.warmup_iters, tc.max_iters)
        x, y = get_batch(train_ids, tc.batch_size, T, device, generator=batch_gen)
        ce = model.loss(x, y)
        aux = model.aux_loss() if hasattr(model, "aux_loss") else torch.zeros(())
        (ce + aux).backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_time += time.perf_counter() - t0
        cpu_time += time.process_time() - c0  # less disturbed than wall time when the machine is shared
        history["train_losses"].append(ce.item())
        history["aux_losses"].append(float(aux.detach()))
        if on_step is not None:
            on_step(it, model)
        if (it + 1) % tc.log_interval == 0:
            bar.set_postfix(loss=f"{history['train_losses'][-1]:.3f}")
    history["val"].append((tc.max_iters, estimate_loss(model, val_ids, tc.batch_size, tc.eval_iters, device, seed=2)))
    model.eval()
    tokens = tc.max_iters * tc.batch_size * T
    return {
        **history,
        "train_time_s": train_time,
        "tokens_per_s": tokens / max(train_time, 1e-9),
        "tokens_per_cpu_s": tokens / max(cpu_time, 1e-9),
    }
