"""Fully sharded data parallel (FSDP2, ZeRO-3): each rank stores only 1/W of every parameter, gradient and Adam
state. Before a block runs, its full weights are all-gathered; after backward its gradients are reduce-scattered
(each rank receives the *average* of only its own shard) and the full weights are freed again. Same math as DDP —
so the same losses as one process — at 1/W of the memory for the model state.

    python 02_distributed_training/fsdp.py                        # 2 gloo ranks: memory table, checkpoint resume
    python 02_distributed_training/fsdp.py --mixed-precision      # bf16 compute, fp32 gradient reduction
    torchrun --standalone --nproc_per_node=8 02_distributed_training/fsdp.py --preset small --cpu-offload   # GPUs

``fully_shard`` is applied per transformer block (each block = one all-gather/reduce-scatter unit, so only one
block's full weights exist at a time), then to the root (embeddings, final norm, head). Checkpoints are *sharded*:
``torch.distributed.checkpoint`` writes each rank's shards in parallel and can reload them onto a different world size.
References: Rajbhandari et al. 2020 (ZeRO); Zhao et al. 2023 (PyTorch FSDP); torchtitan's FSDP2 notes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ch02.ddp_from_scratch import lm_loss
from ch02.launch import add_launch_args, backend_for, is_main_process, launch, rank_device
from ch02.reference import (
    TokenWindows,
    global_batch,
    make_model,
    max_abs_diff,
    rank_rows,
    tiny_config,
    train_single,
    train_tokens,
)
from common.bench import markdown_table
from common.cli import base_parser
from common.data import cache_dir


def local_bytes(tensors) -> int:
    """Bytes this rank actually stores: a DTensor counts only its local shard."""
    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def state_memory(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    params = list(model.parameters())
    opt_tensors = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {
        "params": local_bytes(params),
        "grads": local_bytes(p.grad for p in params if p.grad is not None),
        "optimizer": local_bytes(opt_tensors),
    }


def shard_model(model, mesh, mixed: bool, offload: bool):
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed
        else MixedPrecisionPolicy()
    )
    off = CPUOffloadPolicy() if offload else OffloadPolicy()
    for block in model.blocks:  # one communication unit per block: only one block is ever unsharded
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=off)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=off)  # root: embeddings, final norm, lm_head
    return model


def fsdp_steps(
    model, opt, data, steps: range, batch_size, data_seed, rank, world, device, grads_out=None, mem_out=None
):
    losses = []
    for step in steps:
        x, y = global_batch(data, step, batch_size, data_seed)  # (B, T)
        x, y = rank_rows(x, rank, world).to(device), rank_rows(y, rank, world).to(device)  # (B/W, T)
        loss = lm_loss(model(x), y)
        loss.backward()
        if grads_out is not None and step == 0:  # full_tensor() all-gathers the shards: every rank gets them all
            grads_out.update({n: p.grad.full_tensor().cpu() for n, p in model.named_parameters()})
        opt.step()
        if mem_out is not None:  # after step: params, grads and Adam state all exist
            mem_out.update(state_memory(model, opt))
        opt.zero_grad(set_to_none=True)
        loss = loss.detach()
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
    return losses


def worker(rank, world, steps, batch_size, lr, seed, data_seed, ckpt_dir, mixed, offload, preset):
    device = rank_device(dist.get_backend())
    mesh = init_device_mesh(device.type, (world,))
    cfg = tiny_config() if preset == "tiny" else tiny_config(**_preset(preset))
    data = TokenWindows(train_tokens(), cfg.block_size)
    half = steps // 2
    # DDP baseline memory: a plain replica after one local step (DDP keeps exactly this on every rank)
    replica = make_model(cfg, seed).to(device)
    ropt = torch.optim.AdamW(replica.parameters(), lr=lr)
    lm_loss(
        replica(torch.zeros(1, 8, dtype=torch.long, device=device)), torch.zeros(1, 8, dtype=torch.long, device=device)
    ).backward()
    ropt.step()
    ddp_mem = state_memory(replica, ropt)  # grads still set: no zero_grad yet
    del replica, ropt

    model = shard_model(make_model(cfg, seed).to(device), mesh, mixed, offload)  # same init everywhere, then shard
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    grads, fsdp_mem = {}, {}
    losses = fsdp_steps(model, opt, data, range(half), batch_size, data_seed, rank, world, device, grads, fsdp_mem)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt_dir)  # every rank writes its own shards
    losses += fsdp_steps(model, opt, data, range(half, steps), batch_size, data_seed, rank, world, device)
    final = {n: p.full_tensor().cpu() for n, p in model.named_parameters()}

    # resume: a brand-new sharded model + optimizer, loaded from the sharded checkpoint, continues identically
    model2 = shard_model(make_model(cfg, seed + 99).to(device), mesh, mixed, offload)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=lr, weight_decay=0.1)
    model_sd2, optim_sd2 = get_state_dict(model2, opt2)
    state = {"model": model_sd2, "optim": optim_sd2}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    resumed = fsdp_steps(model2, opt2, data, range(half, steps), batch_size, data_seed, rank, world, device)
    resumed_final = {n: p.full_tensor().cpu() for n, p in model2.named_parameters()}
    del model, opt, model2, opt2, model_sd, optim_sd, model_sd2, optim_sd2, state
    return {
        "losses": losses,
        "resumed_losses": resumed,
        "grads": grads,
        "params": final,
        "resumed_params": resumed_final,
        "fsdp_mem": fsdp_mem,
        "ddp_mem": ddp_mem,
        "n_params": sum(t.numel() for t in final.values()),
    }


def _preset(name):
    from ch01.model import PRESETS

    return {k: v for k, v in PRESETS[name].items() if k != "vocab_size"}


def main(argv=None) -> dict:
    p = base_parser(__doc__, device=True, seed=True, out=True)
    add_launch_args(p)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "medium"])
    p.add_argument("--steps", type=int, default=6, help="half before the checkpoint, half after")
    p.add_argument("--batch-size", type=int, default=8, help="global batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--mixed-precision", action="store_true", help="bf16 params/compute, fp32 gradient reduction")
    p.add_argument("--cpu-offload", action="store_true", help="keep sharded params/grads/Adam state in CPU RAM (GPU)")
    args = p.parse_args(argv)
    if args.cpu_offload and not torch.cuda.is_available():
        print(
            "--cpu-offload moves GPU-resident shards to CPU RAM; on a CPU-only machine there is nothing to offload, "
            "so it is ignored."
        )
        args.cpu_offload = False
    if args.steps < 2 or args.batch_size % args.nproc:
        raise SystemExit("need --steps >= 2 and --batch-size divisible by --nproc")
    ckpt = Path(args.out) if args.out else cache_dir("ch02", "fsdp_ckpt")
    results = launch(
        worker,
        args.nproc,
        (
            args.steps,
            args.batch_size,
            args.lr,
            args.seed,
            1234,
            str(ckpt),
            args.mixed_precision,
            args.cpu_offload,
            args.preset,
        ),
        backend=backend_for(args.backend, args.device),
    )
    if not is_main_process():  # under torchrun every rank runs main(); rank 0 reports
        return {"results": results}
    r0 = results[0]
    cfg = tiny_config() if args.preset == "tiny" else tiny_config(**_preset(args.preset))
    ref = train_single(cfg, args.steps, args.batch_size, args.lr, seed=args.seed)
    checks = [
        {
            "check": "max |Δ loss| FSDP vs one process",
            "value": max(abs(a - b) for a, b in zip(r0["losses"], ref["losses"])),
        },
        {"check": "max |Δ grad| step 0 vs one process", "value": max_abs_diff(r0["grads"], ref["grads"])},
        {"check": "max |Δ weight| end vs one process", "value": max_abs_diff(r0["params"], ref["params"])},
        {
            "check": "max |Δ loss| resumed vs uninterrupted",
            "value": max(abs(a - b) for a, b in zip(r0["resumed_losses"], r0["losses"][args.steps // 2 :])),
        },
        {"check": "max |Δ weight| resumed vs uninterrupted", "value": max_abs_diff(r0["resumed_params"], r0["params"])},
    ]
    print(markdown_table(checks, floatfmt=".2e"))
    mem_rows = [
        {
            "strategy": name,
            **{k: f"{v / 1024:.1f} KiB" for k, v in mem.items()},
            "total": f"{sum(mem.values()) / 1024:.1f} KiB",
        }
        for name, mem in [("DDP (replica)", r0["ddp_mem"])]
        + [(f"FSDP2 rank {r}", res["fsdp_mem"]) for r, res in enumerate(results)]
    ]
    print(
        f"\nper-rank model-state memory, {r0['n_params']:,} parameters, {int(os.environ.get('WORLD_SIZE', args.nproc))} ranks (measured):"
    )
    print(markdown_table(mem_rows))
    return {"results": results, "reference": ref, "checks": checks, "memory": mem_rows}


if __name__ == "__main__":
    main()
