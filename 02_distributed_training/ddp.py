"""The same data parallelism with PyTorch's ``DistributedDataParallel`` and a ``DistributedSampler`` over the token
stream — and, in the same ranks, our from-scratch version (ddp_from_scratch.py), so the three runs can be compared
step for step: torch DDP == scratch DDP == one process on the whole batch.

    python 02_distributed_training/ddp.py                     # 2 gloo ranks on CPU
    torchrun --standalone --nproc_per_node=8 02_distributed_training/ddp.py --steps 100   # 8 GPUs, NCCL

``DistributedSampler(shuffle=True, seed=s)`` shuffles all windows with the same seed on every rank and gives rank r
every W-th index starting at r, so the ranks' batches never overlap and together form the global batch
(reference.py builds that global batch directly for the single-process run). Call ``sampler.set_epoch(e)`` each
epoch or every epoch repeats the same order.
Reference: Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training" (VLDB).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from ch02.ddp_from_scratch import (
    ScratchDDP,
    compare,
    data_parallel_parser,
    parse_data_parallel_args,
    scratch_batches,
    train_data_parallel,
)
from ch02.launch import backend_for, is_main_process, launch, rank_device
from ch02.reference import TokenWindows, make_model, tiny_config, train_single, train_tokens
from common.bench import markdown_table


def sampler_batches(rank, world, steps, batch_size, block_size, data_seed, device):
    """This rank's (x, y) per step from a DataLoader over a DistributedSampler (one epoch)."""
    data = TokenWindows(train_tokens(), block_size)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=data_seed, drop_last=True)
    sampler.set_epoch(0)
    loader = DataLoader(data, batch_size=batch_size // world, sampler=sampler)
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        yield x.to(device), y.to(device)  # (B/W, T)


def worker(rank, world, steps, batch_size, accum, lr, seed, data_seed, bucket_cap_mb, with_scratch) -> dict:
    cfg = tiny_config()
    device = rank_device(dist.get_backend())
    model = make_model(cfg, seed).to(device)  # DDP broadcasts rank 0's weights in its constructor
    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb, device_ids=[device.index] if device.type == "cuda" else None)
    out = {
        "torch": train_data_parallel(
            ddp, model, sampler_batches(rank, world, steps, batch_size, cfg.block_size, data_seed, device), accum, lr
        )
    }
    # the sampler's shard of step 0 must be exactly our rank_rows() of the global batch
    out["sampler_x0"] = next(sampler_batches(rank, world, 1, batch_size, cfg.block_size, data_seed, "cpu"))[0]
    out["scratch_x0"] = next(scratch_batches(rank, world, 1, batch_size, cfg.block_size, data_seed, "cpu"))[0]
    del ddp, model
    if with_scratch:
        model = make_model(cfg, seed + 1000 * rank).to(device)
        sddp = ScratchDDP(model, bucket_cap_mb)
        out["scratch"] = train_data_parallel(
            sddp, model, scratch_batches(rank, world, steps, batch_size, cfg.block_size, data_seed, device), accum, lr
        )
        out["scratch"]["grads_pending_at_launch"] = sddp.overlap  # > 0: all-reduce overlapped backward
        del sddp, model
    return out


def main(argv=None) -> dict:
    p = data_parallel_parser(__doc__)
    p.add_argument("--no-scratch", action="store_true", help="skip the from-scratch DDP run")
    args = parse_data_parallel_args(p, argv)
    results = launch(
        worker,
        args.nproc,
        (args.steps, args.batch_size, args.accum, args.lr, args.seed, 1234, args.bucket_cap_mb, not args.no_scratch),
        backend=backend_for(args.backend, args.device),
    )
    if not is_main_process():  # under torchrun every rank runs main(); rank 0 reports
        return {"results": results}
    ref = train_single(tiny_config(), args.steps, args.batch_size, args.lr, seed=args.seed)
    rows = [compare(f"torch DDP rank {r}", res["torch"], ref) for r, res in enumerate(results)]
    if not args.no_scratch:
        rows += [compare(f"scratch DDP rank {r}", res["scratch"], ref) for r, res in enumerate(results)]
        rows.append(compare("scratch vs torch DDP (rank 0)", results[0]["scratch"], results[0]["torch"]))
    same_data = all(torch.equal(res["sampler_x0"], res["scratch_x0"]) for res in results)
    print(f"DistributedSampler shards == global batch[rank::world]: {same_data}")
    print(markdown_table(rows, floatfmt=".2e"))
    return {"results": results, "reference": ref, "rows": rows, "same_data": same_data}


if __name__ == "__main__":
    main()
