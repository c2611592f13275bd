"""How chapter 05 trains its language models (Transformer, MoE, Mamba, KAN-FFN): with ch01's one loop,
``ch01.train.train``, which takes a ready model, adds an MoE's ``model.aux_loss()`` to the objective (logged per step
as ``aux_losses``) and logs the cross-entropy as ``train_losses``. This file only holds the chapter's settings of it.

    from ch01.train import train
    res = train(model, arch_config(max_iters=150, lr=3e-3, seed=1337), train_ids, val_ids)
    res["train_losses"], res["val"]        # CE per step; [[iter, train loss, val loss], ...] from step 0 on

A model needs ``.config.block_size``, ``.loss(x, y) -> mean CE`` and, optionally, ``.aux_loss() -> scalar``.
"""

from __future__ import annotations

from ch01.train import TrainConfig


def arch_config(**kw) -> TrainConfig:
    """ch01's ``TrainConfig(**kw)`` with the chapter's defaults: batches from a generator seeded with ``seed`` (the
    same batches for every architecture, whatever else draws from the global RNG), losses evaluated before the first
    step too (curves start at the untrained model), and no checkpoint files."""
    kw = {"batch_seed": kw.get("seed", TrainConfig.seed), "eval_at_start": True, "out_dir": None} | kw
    return TrainConfig(**kw)
