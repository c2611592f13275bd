"""Tensor parallelism (Megatron-LM): split every weight matrix of a block across ranks so no rank holds a whole layer.

MLP  y = W2 · (silu(W1 x) ⊙ W3 x): cut W1, W3 by *output* rows (column parallel: each rank computes its own slice of
the hidden units, no communication), cut W2 by *input* columns (row parallel: each rank's product is a partial sum) and
add the partial sums with one all-reduce. Attention the same way: each rank owns H/W heads (wq, wk, wv column
parallel), wo is row parallel. So one all-reduce in forward and one in backward per sub-layer (Shoeybi et al. 2019).

    python 02_distributed_training/tensor_parallel.py            # DTensor version + by-hand version vs one process

1. ``torch.distributed.tensor.parallel.parallelize_module`` with ``ColwiseParallel`` / ``RowwiseParallel`` on a CPU
   ``DeviceMesh`` (gloo). The attention module reshapes by ``cfg.n_head``, so each rank's attention gets a config with
   n_head/W heads (and n_embd/W, keeping head_dim) — what torchtitan does for its Llama too.
2. By hand: slice the weights ourselves and insert Megatron's two conjugate operators — ``f`` (identity forward,
   all-reduce backward) before a column-parallel pair and ``g`` (all-reduce forward, identity backward) after the
   row-parallel layer.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ch01.model import GPT, GPTConfig
from ch02.launch import add_launch_args, backend_for, is_main_process, launch, rank_device
from ch02.reference import TokenWindows, global_batch, make_model, max_abs_diff, tiny_config, train_tokens
from common.bench import markdown_table
from common.cli import base_parser

COLUMN = ("attn.wq", "attn.wk", "attn.wv", "mlp.w1", "mlp.w3")  # split output features (weight rows)
ROW = ("attn.wo", "mlp.w2")  # split input features (weight columns); outputs are partial sums


def local_config(cfg: GPTConfig, world: int) -> GPTConfig:
    """What one rank's attention sees: 1/W of the heads (head_dim unchanged)."""
    if cfg.n_head % world or cfg.n_kv_head % world:
        raise ValueError(f"n_head={cfg.n_head}, n_kv_head={cfg.n_kv_head} must be divisible by {world} ranks")
    return dataclasses.replace(
        cfg, n_embd=cfg.n_embd // world, n_head=cfg.n_head // world, n_kv_head=cfg.n_kv_head // world
    )


def apply_dtensor_tp(model: GPT, mesh) -> GPT:
    plan = {**{name: ColwiseParallel() for name in COLUMN}, **{name: RowwiseParallel() for name in ROW}}
    for block in model.blocks:
        parallelize_module(block, mesh, plan)
        block.attn.cfg = local_config(model.config, mesh.size())
    return model  # embeddings, norms and lm_head stay replicated (every rank computes them on the same input)


# ---------------------------------------------------------------------------------------------------- by hand
class CopyToParallel(torch.autograd.Function):
    """Megatron's f: the input is already on every rank (identity); each rank's grad is partial -> all-reduce."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class ReduceFromParallel(torch.autograd.Function):
    """Megatron's g: sum the row-parallel partial outputs (all-reduce); the grad is already whole (identity)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


class ParallelSublayer(nn.Module):
    """f -> (column-parallel ... row-parallel) -> g around an attention or MLP module whose weights were sliced."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x, *args):
        return ReduceFromParallel.apply(self.inner(CopyToParallel.apply(x), *args))


def apply_manual_tp(model: GPT, rank: int, world: int) -> GPT:
    with torch.no_grad():
        for block in model.blocks:
            for name in COLUMN + ROW:
                lin = block.get_submodule(name)
                dim = 0 if name in COLUMN else 1  # nn.Linear weight is (out, in)
                lin.weight = nn.Parameter(lin.weight.chunk(world, dim=dim)[rank].clone())
            block.attn.cfg = local_config(model.config, world)
            block.attn, block.mlp = ParallelSublayer(block.attn), ParallelSublayer(block.mlp)
    return model


def full_grads(model: nn.Module, rank: int, world: int, manual: bool) -> dict[str, torch.Tensor]:
    """Every gradient at full size, under the single-process names."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        name = name.replace(".inner.", ".")
        if isinstance(g, DTensor):
            g = g.full_tensor()  # all-gathers the shards
        elif manual and any(name.endswith(s + ".weight") for s in COLUMN + ROW):
            parts = [torch.empty_like(g) for _ in range(world)]
            dist.all_gather(parts, g.contiguous())
            g = torch.cat(parts, dim=0 if any(name.endswith(s + ".weight") for s in COLUMN) else 1)
        out[name] = g.detach().cpu().clone()
    return out


def worker(rank, world, batch_size, seed, data_seed) -> dict:
    device = rank_device(dist.get_backend())
    mesh = init_device_mesh(device.type, (world,))
    cfg = tiny_config()
    x, y = global_batch(TokenWindows(train_tokens(), cfg.block_size), 0, batch_size, data_seed)  # same on every rank
    x, y = x.to(device), y.to(device)
    out = {}
    for kind in ("dtensor", "manual"):
        model = make_model(cfg, seed).to(device)
        model = apply_dtensor_tp(model, mesh) if kind == "dtensor" else apply_manual_tp(model, rank, world)
        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
        logits = model(x)  # (B, T, V) — whole on every rank
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        out[kind] = {
            "loss": loss.item(),
            "logits": logits.detach().cpu(),
            "grads": full_grads(model, rank, world, kind == "manual"),
            "local_params": local,
        }
        del model, logits, loss
    return out


def main(argv=None) -> dict:
    p = base_parser(__doc__, device=True, seed=True)
    add_launch_args(p)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args(argv)
    results = launch(
        worker, args.nproc, (args.batch_size, args.seed, 1234), backend=backend_for(args.backend, args.device)
    )
    if not is_main_process():  # under torchrun every rank runs main(); rank 0 reports
        return {"results": results}
    ref_model = make_model(tiny_config(), args.seed)
    x, y = global_batch(TokenWindows(train_tokens(), 64), 0, args.batch_size, 1234)
    logits = ref_model(x)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    loss.backward()
    ref = {n: p.grad for n, p in ref_model.named_parameters()}
    rows = [
        {
            "version": kind,
            "rank": r,
            "params on this rank": res[kind]["local_params"],
            "max |Δ logits|": (res[kind]["logits"] - logits.detach()).abs().max().item(),
            "max |Δ grad|": max_abs_diff(res[kind]["grads"], ref),
        }
        for kind in ("dtensor", "manual")
        for r, res in enumerate(results)
    ]
    print(f"one process: {ref_model.num_params():,} parameters")
    print(markdown_table(rows, floatfmt=".2e"))
    return {"results": results, "rows": rows, "ref_params": ref_model.num_params()}


if __name__ == "__main__":
    main()
