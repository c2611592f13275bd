"""Data parallelism by hand: every rank holds the whole model, sees a different slice of the batch, and the ranks
average their gradients with all-reduce before each optimizer step — so they all take the same step as one process
on the whole batch would.

The three tricks real DDP uses (Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel
Training"), each a few lines here:
1. broadcast rank 0's weights at start, so all replicas begin identical;
2. *bucketing + overlap*: a hook fires as soon as a parameter's gradient is final; when every gradient of a bucket
   (~``bucket_cap_mb`` of parameters, in reverse order, since backward produces the last layers' grads first) is
   ready, the bucket is flattened and its all-reduce starts asynchronously — while backward keeps computing the
   earlier layers. A callback queued on the autograd engine waits for all buckets at the end of backward;
3. ``no_sync()``: during gradient accumulation, skip the all-reduce for all but the last micro-batch.

    python 02_distributed_training/ddp_from_scratch.py                 # 2 gloo ranks vs one process
    torchrun --standalone --nproc_per_node=2 02_distributed_training/ddp_from_scratch.py
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

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


class ScratchDDP(nn.Module):
    """Wrap a model so backward() leaves the all-rank *average* gradient in every ``p.grad``."""

    def __init__(self, module: nn.Module, bucket_cap_mb: float = 25.0):
        super().__init__()
        self.module, self.world = module, dist.get_world_size()
        with torch.no_grad():  # 1. identical start: everyone takes rank 0's weights
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t, src=0)
        params = [p for p in module.parameters() if p.requires_grad]
        self.buckets: list[list[nn.Parameter]] = [[]]
        size, cap = 0, bucket_cap_mb * 2**20
        for p in reversed(params):  # 2. reverse order ≈ the order backward finishes gradients
            if size >= cap:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.bucket_of = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket}
        for p in params:
            p.register_post_accumulate_grad_hook(self._grad_ready)
        self.require_sync = True
        self._reset()

    def _reset(self):
        self.ready = [0] * len(self.buckets)
        self.in_flight: list[tuple[int, torch.Tensor, dist.Work]] = []
        self.callback_queued = False
        self.grads_pending: list[int] = []  # per launched bucket: grads backward had still to produce (overlap)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """3. Accumulate local gradients without communicating (use for all but the last micro-batch)."""
        self.require_sync = False
        try:
            yield
        finally:
            self.require_sync = True

    def _grad_ready(self, p: torch.Tensor) -> None:
        if not self.require_sync:
            return
        if not self.callback_queued:  # runs once, after the whole backward pass (as torch DDP does)
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self.callback_queued = True
        b = self.bucket_of[id(p)]
        self.ready[b] += 1
        if self.ready[b] == len(self.buckets[b]):  # bucket complete: start its all-reduce now, don't wait
            flat = torch.cat([q.grad.reshape(-1) for q in self.buckets[b]]) / self.world  # (n_bucket,)
            self.in_flight.append((b, flat, dist.all_reduce(flat, async_op=True)))
            self.grads_pending.append(sum(len(bk) for bk in self.buckets) - sum(self.ready))

    def _finish(self) -> None:
        if len(self.in_flight) != len(self.buckets):
            missing = [b for b in range(len(self.buckets)) if self.ready[b] < len(self.buckets[b])]
            raise RuntimeError(
                f"buckets {missing} never completed: some parameters got no gradient this step "
                "(unused parameters are not supported by this minimal DDP)"
            )
        self.launched = [b for b, _, _ in self.in_flight]  # the order buckets went out, for the printout
        self.overlap = list(self.grads_pending)
        for b, flat, work in self.in_flight:
            work.wait()
            offset = 0
            for q in self.buckets[b]:
                q.grad.copy_(flat[offset : offset + q.numel()].view_as(q))
                offset += q.numel()
        self._reset()


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())  # same as GPT.loss


def train_data_parallel(wrapped: nn.Module, model: nn.Module, batches, accum: int, lr: float) -> dict:
    """Shared loop for ScratchDDP and torch DDP: ``batches`` yields this rank's (x, y) for each step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    losses, first_grads = [], {}
    for step, (x, y) in enumerate(batches):
        loss_sum = torch.zeros((), device=x.device)  # NCCL only reduces GPU tensors
        chunks = list(zip(x.chunk(accum), y.chunk(accum)))
        for i, (mx, my) in enumerate(chunks):
            sync = i == len(chunks) - 1
            with contextlib.nullcontext() if sync else wrapped.no_sync():
                loss = lm_loss(wrapped(mx), my) / accum  # (B/accum, T) micro-batch
                loss.backward()
            loss_sum += loss.detach()
        if step == 0:
            first_grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.all_reduce(loss_sum)  # the global-batch loss, for the log
        losses.append(loss_sum.item() / dist.get_world_size())
    return {
        "losses": losses,
        "grads": first_grads,
        "params": {n: p.detach().cpu().clone() for n, p in model.named_parameters()},
    }


def scratch_batches(rank: int, world: int, steps: int, batch_size: int, block_size: int, data_seed: int, device):
    data = TokenWindows(train_tokens(), block_size)
    for step in range(steps):
        x, y = global_batch(data, step, batch_size, data_seed)  # (B, T) — the batch one process would use
        yield rank_rows(x, rank, world).to(device), rank_rows(y, rank, world).to(device)  # (B/W, T) this rank's


def worker(
    rank: int,
    world: int,
    steps: int,
    batch_size: int,
    accum: int,
    lr: float,
    seed: int,
    data_seed: int,
    bucket_cap_mb: float,
) -> dict:
    cfg = tiny_config()
    device = rank_device(dist.get_backend())
    model = make_model(cfg, seed + 1000 * rank).to(device)  # deliberately different: the broadcast must fix it
    ddp = ScratchDDP(model, bucket_cap_mb)
    res = train_data_parallel(
        ddp, model, scratch_batches(rank, world, steps, batch_size, cfg.block_size, data_seed, device), accum, lr
    )
    res["buckets"] = [[n for n, p in model.named_parameters() if any(p is q for q in b)] for b in ddp.buckets]
    res["launch_order"], res["grads_pending_at_launch"] = ddp.launched, ddp.overlap
    del ddp, model
    return res


def compare(name: str, res: dict, ref: dict) -> dict:
    return {
        "run": name,
        "max |Δ grad| step 0": max_abs_diff(res["grads"], ref["grads"]),
        "max |Δ loss|": max(abs(a - b) for a, b in zip(res["losses"], ref["losses"])),
        "max |Δ weight| end": max_abs_diff(res["params"], ref["params"]),
    }


def data_parallel_parser(doc: str):
    """The flags of the data-parallel scripts (this one and ddp.py): launch, steps, global batch, accumulation, lr,
    bucket size. Parse with ``parse_data_parallel_args`` (it checks that the batch splits evenly)."""
    p = base_parser(doc, device=True, seed=True)
    add_launch_args(p)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (all ranks together)")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per rank per step (no_sync for all but last)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bucket-cap-mb", type=float, default=0.05, help="tiny on purpose: the tiny model gets 6 buckets")
    return p


def parse_data_parallel_args(p, argv=None):
    args = p.parse_args(argv)
    if args.batch_size % (args.nproc * args.accum):
        p.error(f"--batch-size {args.batch_size} must divide into {args.nproc} ranks × {args.accum} micro-batches")
    return args


def main(argv=None) -> dict:
    args = parse_data_parallel_args(data_parallel_parser(__doc__), argv)
    results = launch(
        worker,
        args.nproc,
        (args.steps, args.batch_size, args.accum, args.lr, args.seed, 1234, args.bucket_cap_mb),
        backend=backend_for(args.backend, args.device),
    )
    if not is_main_process():  # under torchrun every rank runs main(); rank 0 reports
        return {"results": results}
    ref = train_single(tiny_config(), args.steps, args.batch_size, args.lr, seed=args.seed)
    rows = [compare(f"scratch DDP rank {r}", res, ref) for r, res in enumerate(results)]
    print(
        f"\nbuckets (reverse order, cap {args.bucket_cap_mb} MB): "
        f"{[len(b) for b in results[0]['buckets']]} params each; all-reduce launch order {results[0]['launch_order']}"
        f"\nparameter grads backward still had to compute when each bucket's all-reduce started (overlap): "
        f"{results[0]['grads_pending_at_launch']} of {sum(len(b) for b in results[0]['buckets'])}"
    )
    print(markdown_table(rows, floatfmt=".2e"))
    return {"results": results, "reference": ref, "rows": rows}


if __name__ == "__main__":
    main()
