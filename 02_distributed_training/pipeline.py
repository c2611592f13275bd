"""Pipeline parallelism: cut the model into p consecutive stages, one per rank, and stream m micro-batches through
them; activations go forward rank -> rank+1 and their gradients come back. While stage 0 works on micro-batch 2,
stage 1 works on micro-batch 1 — but at the start and the end some stages wait: the *bubble*, a fraction
(p-1)/(m+p-1) of the time for GPipe and 1F1B alike. 1F1B interleaves one forward with one backward so a stage holds
at most p micro-batches of activations instead of m.

    python 02_distributed_training/pipeline.py               # grads == one process (GPipe, 1F1B) + bubble plot
    python 02_distributed_training/pipeline.py --micro 1 2 4 8 16 --reps 5

Uses ``torch.distributed.pipelining`` (PipelineStage, ScheduleGPipe, Schedule1F1B) on our own 2-stage split of the
ch01 GPT. The bubble is measured as 1 - m·t_mb / t_step: t_mb is one stage's forward+backward on one micro-batch
alone, t_step the whole pipelined step (until the last stage is done), averaged over the stages.
References: Huang et al. 2019 (GPipe); Narayanan et al. 2019/2021 (PipeDream 1F1B, Megatron-LM).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from ch01.functional import rope_cache
from ch01.model import GPT, attention_mask
from ch02.ddp_from_scratch import lm_loss
from ch02.launch import add_launch_args, backend_for, is_main_process, launch, rank_device
from ch02.reference import TokenWindows, global_batch, make_model, max_abs_diff, tiny_config, train_tokens
from common.bench import hardware_info, markdown_table
from common.cli import base_parser

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class FixedCost(torch.autograd.Function):
    """Identity that sleeps ``fwd_s`` in forward and ``bwd_s`` in backward: a stage cost that CPU contention between
    the ranks (2 ranks sharing 2 busy cores) cannot distort, so the measured bubble shows the *schedule*."""

    @staticmethod
    def forward(ctx, x, fwd_s: float, bwd_s: float):
        ctx.bwd_s = bwd_s
        time.sleep(fwd_s)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.bwd_s)
        return grad, None, None


class GPTStage(nn.Module):
    """Layers ``layers`` of a GPT (plus the embedding on the first stage, final norm + head on the last)."""

    def __init__(self, model: GPT, layers: range, first: bool, last: bool):
        super().__init__()
        self.cfg, self.layer_ids = model.config, list(layers)
        self.tok_emb = model.tok_emb if first else None
        self.blocks = nn.ModuleList(model.blocks[i] for i in layers)
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.cost_s = (0.0, 0.0)  # (forward, backward) seconds of simulated compute, for the bubble measurement

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tok_emb is not None:
            x = self.tok_emb(x)  # (b, T) ids -> (b, T, C)
        if self.cost_s[0] or self.cost_s[1]:
            x = FixedCost.apply(x, *self.cost_s)
        T = x.shape[1]
        pos = torch.arange(T, device=x.device)
        rope_cs = rope_cache(self.cfg.head_dim, pos, self.cfg.rope_theta)  # 2 × (T, D), as GPT.forward builds them
        mask = attention_mask(pos, T, None, None)  # plain causal: no cache, no extra mask
        for block in self.blocks:
            x = block(x, rope_cs, None, None, mask)  # (b, T, C)
        if self.lm_head is not None:
            x = self.lm_head(self.norm(x))  # (b, T, V)
        return x

    def global_names(self) -> dict[str, nn.Parameter]:
        """Parameters under the full model's names (blocks.j -> blocks.<layer id>)."""
        out = {}
        for name, p in self.named_parameters():
            if name.startswith("blocks."):
                j, rest = name.split(".", 2)[1:]
                name = f"blocks.{self.layer_ids[int(j)]}.{rest}"
            out[name] = p
        return out


def split_model(model: GPT, rank: int, world: int) -> GPTStage:
    n = model.config.n_layer
    if n % world:
        raise ValueError(f"{n} layers do not split evenly into {world} stages")
    per = n // world
    return GPTStage(model, range(rank * per, (rank + 1) * per), first=rank == 0, last=rank == world - 1)


def pipeline_step(schedule, rank, world, x, y) -> list:
    """One training step's forward+backward: stage 0 feeds inputs, the last stage feeds targets and gets losses."""
    losses: list = []
    if rank == 0:
        schedule.step(x)
    elif rank == world - 1:
        schedule.step(target=y, losses=losses)
    else:
        schedule.step()
    return losses


def grads_worker(rank, world, batch_size, n_micro, seed, data_seed) -> dict:
    device = rank_device(dist.get_backend())
    cfg = tiny_config()
    stage_mod = split_model(make_model(cfg, seed), rank, world).to(device)
    x, y = global_batch(TokenWindows(train_tokens(), cfg.block_size), 0, batch_size, data_seed)  # (B, T)
    out = {}
    for name, cls in SCHEDULES.items():
        stage_mod.zero_grad(set_to_none=True)
        stage = PipelineStage(stage_mod, rank, world, device)
        schedule = cls(stage, n_microbatches=n_micro, loss_fn=lm_loss)  # scale_grads: mean over micro-batches
        losses = pipeline_step(schedule, rank, world, x.to(device), y.to(device))
        out[name] = {
            "grads": {n: p.grad.detach().cpu().clone() for n, p in stage_mod.global_names().items()},
            "loss": torch.stack(losses).mean().item() if losses else None,
        }
        del schedule, stage
    stages: list = [None] * world
    dist.all_gather_object(stages, out)  # every rank gets every stage's grads (so torchrun's rank 0 can check)
    return {"stages": stages}


def bubble_worker(rank, world, preset, micro_bs, micros, reps, seed, cost_ms) -> list[dict]:
    """Time pipelined steps for each m with a fixed micro-batch size, and one stage's solo fwd+bwd per micro-batch."""
    device = rank_device(dist.get_backend())
    cfg = tiny_config(n_layer=4, n_embd=128) if preset == "small" else tiny_config()
    stage_mod = split_model(make_model(cfg, seed), rank, world).to(device)
    stage_mod.cost_s = (cost_ms / 1e3, 2 * cost_ms / 1e3)  # backward ≈ 2× forward, as for real matmuls
    gen = torch.Generator().manual_seed(seed)
    x_mb = torch.randint(cfg.vocab_size, (micro_bs, cfg.block_size), generator=gen).to(device)  # (b, T)
    h_mb = torch.randn(micro_bs, cfg.block_size, cfg.n_embd, generator=gen).to(device)  # (b, T, C)
    solo_in = x_mb if rank == 0 else h_mb.requires_grad_()

    def solo():  # this stage alone: forward + backward of one micro-batch, no communication
        out = stage_mod(solo_in)
        (lm_loss(out, x_mb) if rank == world - 1 else out.float().square().mean()).backward()

    rows = []
    for name, cls in SCHEDULES.items():
        for m in micros:
            if name == "1f1b" and m < world:  # 1F1B needs at least one micro-batch per stage
                continue
            stage = PipelineStage(stage_mod, rank, world, device)
            schedule = cls(stage, n_microbatches=m, loss_fn=lm_loss)
            xs, ys = x_mb.repeat(m, 1), x_mb.repeat(m, 1)  # (m·b, T)
            times, solos = [], []
            for i in range(reps + 1):
                dist.barrier()
                t0 = time.perf_counter()
                pipeline_step(schedule, rank, world, xs, ys)
                if i:  # the first step includes shape inference and warm-up
                    times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                solo()
                solos.append(time.perf_counter() - t0)
                stage_mod.zero_grad(set_to_none=True)
            t_step, t_mb = statistics.median(times), statistics.median(solos[1:])
            rows.append(
                {
                    "schedule": name,
                    "m": m,
                    "rank": rank,
                    "t_step_ms": t_step * 1e3,
                    "t_mb_ms": t_mb * 1e3,
                }
            )
            del schedule, stage
    ranks: list = [None] * world
    dist.all_gather_object(ranks, rows)
    return {"ranks": ranks}


def main(argv=None) -> dict:
    p = base_parser(__doc__, device=True, seed=True)
    add_launch_args(p)
    p.add_argument("--batch-size", type=int, default=8, help="global batch for the gradient check")
    p.add_argument("--n-micro", type=int, default=4, help="micro-batches for the gradient check")
    p.add_argument("--micro", type=int, nargs="+", default=[1, 2, 4, 8], help="m values for the bubble measurement")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="model for the bubble timing")
    p.add_argument(
        "--stage-cost-ms",
        type=float,
        default=50.0,
        help="simulated forward ms per stage per micro-batch (backward 2×) for the bubble timing; "
        "0 = real compute only (noisy when the ranks share busy cores)",
    )
    p.add_argument("--no-bubble", action="store_true", help="only the gradient check")
    args = p.parse_args(argv)
    if args.batch_size % args.n_micro:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by --n-micro {args.n_micro}")
    results = launch(
        grads_worker,
        args.nproc,
        (args.batch_size, args.n_micro, args.seed, 1234),
        backend=backend_for(args.backend, args.device),
    )
    per_rank = None
    if not args.no_bubble:  # every rank must take part (under torchrun all of them run main())
        per_rank = launch(
            bubble_worker,
            args.nproc,
            (args.preset, args.micro_batch_size, args.micro, args.reps, args.seed, args.stage_cost_ms),
            backend=backend_for(args.backend, args.device),
        )[0]["ranks"]
    if not is_main_process():  # rank 0 reports
        return {"results": results}
    stages = results[0]["stages"]  # per stage: {schedule: {"grads", "loss"}}
    ref_model = make_model(tiny_config(), args.seed)
    x, y = global_batch(TokenWindows(train_tokens(), ref_model.config.block_size), 0, args.batch_size, 1234)
    ref_loss = ref_model.loss(x, y)
    ref_loss.backward()
    ref = {n: p.grad for n, p in ref_model.named_parameters()}
    rows = []
    for name in SCHEDULES:
        grads = {k: v for res in stages for k, v in res[name]["grads"].items()}  # stages' grads together
        rows.append(
            {
                "schedule": name,
                "m": args.n_micro,
                "max |Δ grad| vs one process": max_abs_diff(grads, ref),
                "|Δ loss|": abs(stages[-1][name]["loss"] - ref_loss.item()),
            }
        )
    print(markdown_table(rows, floatfmt=".2e"))
    out = {"stages": stages, "rows": rows}
    if per_rank is not None:
        from common.plot import assets_dir, line_plot  # matplotlib: only the parent needs it

        bubble = []
        for i, r0 in enumerate(per_rank[0]):
            # the step ends when the LAST stage finishes (then the optimizer steps): idle = 1 - busy / that time
            t_step = max(rank_rows[i]["t_step_ms"] for rank_rows in per_rank)
            b = statistics.mean(1 - r0["m"] * rank_rows[i]["t_mb_ms"] / t_step for rank_rows in per_rank)
            theory = (args.nproc - 1) / (r0["m"] + args.nproc - 1)
            bubble.append(
                {
                    "schedule": r0["schedule"],
                    "m": r0["m"],
                    "t_step_ms": t_step,
                    "t_mb_ms (stage 0)": r0["t_mb_ms"],
                    "measured bubble": b,
                    "(p-1)/(m+p-1)": theory,
                }
            )
        print(
            f"\nbubble, p={args.nproc} stages, {args.preset} model, micro-batch {args.micro_batch_size}×64 tokens, "
            f"simulated stage cost {args.stage_cost_ms:g} ms fwd / {2 * args.stage_cost_ms:g} ms bwd "
            f"({hardware_info()}):"
        )
        print(markdown_table(bubble))
        series = {
            f"measured {s}": (
                [r["m"] for r in bubble if r["schedule"] == s],
                [r["measured bubble"] for r in bubble if r["schedule"] == s],
            )
            for s in SCHEDULES
        }
        series["theory (p-1)/(m+p-1)"] = (args.micro, [(args.nproc - 1) / (m + args.nproc - 1) for m in args.micro])
        plot = line_plot(
            series,
            assets_dir(__file__) / "pipeline_bubble.png",
            title=f"pipeline bubble, p={args.nproc}",
            xlabel="micro-batches m",
            ylabel="idle fraction",
            logx=True,
        )
        print(f"plot: {plot}")
        out["bubble"] = bubble
    return out


if __name__ == "__main__":
    main()
