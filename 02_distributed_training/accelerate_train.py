"""The ch01 training loop (AdamW with decay on matrices only, warm-up + cosine LR, gradient clipping) under Hugging Face
``accelerate``: the same loop runs on 1 CPU, N CPU processes or N GPUs; ``accelerator.prepare`` wraps the model in
DDP and shards the data loader, ``accelerator.backward`` / ``clip_grad_norm_`` do the rest.

    python 02_distributed_training/accelerate_train.py                         # 2 spawned gloo ranks vs plain torch
    accelerate launch --multi_gpu --num_processes 2 02_distributed_training/accelerate_train.py
    accelerate launch --num_processes 8 02_distributed_training/accelerate_train.py --steps 200   # a GPU node

On a CPU-only machine ``accelerate launch --multi_gpu --num_processes 2`` still works: it starts 2 processes the way
torchrun does (RANK, WORLD_SIZE, MASTER_ADDR/PORT), and ``Accelerator(cpu=True)`` then sees WORLD_SIZE > 1, picks
``DistributedType.MULTI_CPU`` and the gloo backend — real DDP over gloo, no GPU involved (accelerate reuses the process
group if one exists, which is how our own spawner and torchrun hand it over). The loader uses ``split_batches=True``:
each global batch is cut into W contiguous slices, so the N-process run sees exactly the single-process batches.
Reference: Hugging Face Accelerate docs ("Launching your distributed code", "Quick tour").
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from ch01.functional import cosine_lr
from ch01.train import TrainConfig, make_optimizer
from ch02.ddp_from_scratch import lm_loss
from ch02.launch import add_launch_args, backend_for, is_main_process, launch
from ch02.reference import TokenWindows, epoch_order, make_model, max_abs_diff, tiny_config, train_tokens
from common.bench import markdown_table
from common.cli import base_parser


def make_loader(block_size: int, steps: int, batch_size: int, data_seed: int) -> DataLoader:
    """Global batches in the fixed DistributedSampler-style order (no sampler RNG to keep in sync across ranks)."""
    data = TokenWindows(train_tokens(), block_size)
    order = epoch_order(len(data), data_seed)[: steps * batch_size].tolist()
    return DataLoader(Subset(data, order), batch_size=batch_size, shuffle=False)


def train_loop(model, opt, loader, tc: TrainConfig, backward, clip, global_mean) -> list[float]:
    """ch01's step, with the three calls that differ between plain torch and accelerate passed in."""
    losses = []
    for it, (x, y) in enumerate(loader):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(it, tc.lr, tc.min_lr, tc.warmup_iters, tc.max_iters)
        loss = lm_loss(model(x), y)  # (B_local, T) -> mean CE
        backward(loss)
        clip(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(global_mean(loss.detach()))
    return losses


def train_config(steps: int, batch_size: int, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(
        max_iters=steps, batch_size=batch_size, lr=lr, warmup_iters=max(1, steps // 5), seed=seed, progress=False
    )


def train_plain(steps, batch_size, lr, seed, data_seed) -> dict:
    """One process, no accelerate: the reference."""
    cfg, tc = tiny_config(), train_config(steps, batch_size, lr, seed)
    model = make_model(cfg, seed)
    opt = make_optimizer(model, tc)
    losses = train_loop(
        model,
        opt,
        make_loader(cfg.block_size, steps, batch_size, data_seed),
        tc,
        lambda loss: loss.backward(),
        torch.nn.utils.clip_grad_norm_,
        lambda t: t.item(),
    )
    return {"losses": losses, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def worker(rank, world, steps, batch_size, lr, seed, data_seed) -> dict:
    from accelerate import Accelerator, DataLoaderConfiguration

    accelerator = Accelerator(  # cpu=True with gloo: accelerate reuses our process group as MULTI_CPU
        cpu=dist.get_backend() == "gloo", dataloader_config=DataLoaderConfiguration(split_batches=True)
    )
    cfg, tc = tiny_config(), train_config(steps, batch_size, lr, seed)
    model = make_model(cfg, seed)
    opt = make_optimizer(model, tc)
    model, opt, loader = accelerator.prepare(model, opt, make_loader(cfg.block_size, steps, batch_size, data_seed))
    losses = train_loop(
        model,
        opt,
        loader,
        tc,
        accelerator.backward,
        accelerator.clip_grad_norm_,
        lambda t: accelerator.gather(t[None]).mean().item(),
    )
    params = {n: p.detach().cpu().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
    info = {
        "distributed_type": str(accelerator.distributed_type),
        "num_processes": accelerator.num_processes,
        "backend": accelerator.state.backend,
        "wrapped": type(model).__name__,
    }
    accelerator.wait_for_everyone()
    del model, opt, loader
    return {"losses": losses, "params": params, "info": info}


def main(argv=None) -> dict:
    p = base_parser(__doc__, device=True, seed=True)
    add_launch_args(p)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8, help="global batch, split across the processes")
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    if args.batch_size % args.nproc:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by --nproc {args.nproc}")
    results = launch(
        worker,
        args.nproc,
        (args.steps, args.batch_size, args.lr, args.seed, 1234),
        backend=backend_for(args.backend, args.device),
    )
    if not is_main_process():  # under torchrun every rank runs main(); rank 0 reports
        return {"results": results}
    ref = train_plain(args.steps, args.batch_size, args.lr, args.seed, 1234)
    r0 = results[0]
    print(f"accelerate: {r0['info']}")
    rows = [
        {"step": i, "accelerate loss": a, "one process loss": b, "|Δ|": abs(a - b)}
        for i, (a, b) in enumerate(zip(r0["losses"], ref["losses"]))
    ]
    print(markdown_table(rows, floatfmt=".6f", formats={"|Δ|": ".1e"}))
    diff = max_abs_diff(r0["params"], ref["params"])
    print(f"max |Δ weight| after {args.steps} steps: {diff:.2e}")
    return {"results": results, "reference": ref, "rows": rows, "weight_diff": diff}


if __name__ == "__main__":
    main()
