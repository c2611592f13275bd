"""Training-step speed of the mini-GPT against a nanoGPT-style GPT-2 reference, side by side in one process, at
nanoGPT's CPU "baby GPT" config (4 layers, 128 wide, 4 heads, block 64, batch 12, char vocabulary).

    python 01_transformer_from_scratch/bench_train_step.py                         # 1 and 2 threads (~1 min)
    python 01_transformer_from_scratch/bench_train_step.py --nanogpt ~/nanoGPT     # also time a nanoGPT checkout
    python 01_transformer_from_scratch/bench_train_step.py --profile               # where our step's time goes

A step is what the training loop does: forward, cross-entropy, backward, grad clipping, AdamW step, zero_grad. Each
variant's step is timed in interleaved rounds (A B C A B C ...) so load on a shared machine hits all alike; the table
gives medians and each variant's ratio to the reference (> 1 = faster). ``NanoGPTRef`` is nanoGPT's ``model.py``
architecture written out (learned positions, LayerNorm, GELU MLP, one fused c_attn projection, no biases as in its
``train.py`` default); ``--nanogpt PATH`` imports the real ``model.py`` from a checkout instead of trusting the copy.
Our variants: the model as trained by train.py (eager), ``torch.compile`` of it, and AdamW with ``foreach``.
References: Karpathy's nanoGPT (model.py, README's CPU baby GPT); Radford et al. 2019.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ch01.model import GPT, GPTConfig
from ch01.train import default_loss
from common.bench import hardware_info, markdown_table
from common.cli import base_parser
from common.seed import seed_everything

BABY = dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)


class RefBlock(nn.Module):
    def __init__(self, C: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(C, bias=False), nn.LayerNorm(C, bias=False)
        self.c_attn, self.c_proj = nn.Linear(C, 3 * C, bias=False), nn.Linear(C, C, bias=False)
        self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C, bias=False), nn.Linear(4 * C, C, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPTRef(nn.Module):
    """nanoGPT's GPT (bias=False, dropout 0): token + learned position embeddings, pre-LN blocks, tied head."""

    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(RefBlock(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def load_nanogpt(path: str) -> nn.Module:
    """A real nanoGPT checkout's GPT at the baby config (its model.py, imported by path)."""
    file = Path(path).expanduser() / "model.py"
    if not file.exists():
        raise FileNotFoundError(f"--nanogpt {path}: no model.py there (expected a nanoGPT checkout)")
    spec = importlib.util.spec_from_file_location("nanogpt_model", file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["nanogpt_model"] = mod
    spec.loader.exec_module(mod)
    return mod.GPT(mod.GPTConfig(**BABY, dropout=0.0, bias=False))


def adamw(model: nn.Module, foreach: bool | None = None) -> torch.optim.Optimizer:
    """nanoGPT's / train.py's AdamW groups: decay on matrices, none on vectors."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), foreach=foreach)


def default_loss_ce(model, x, y):
    return default_loss(model, x, y)["loss"]


def make_step(model: nn.Module, loss_fn, opt: torch.optim.Optimizer):
    def step(x, y):
        loss = loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def variants(args) -> dict:
    """name -> step function; each with its own model and optimizer."""
    seed_everything(args.seed)
    ref = NanoGPTRef(**BABY)
    ours_cfg = GPTConfig(**BABY)
    out = {"nanoGPT-style reference": make_step(ref, lambda m, x, y: m(x, y)[1], adamw(ref))}
    if args.nanogpt:
        real = load_nanogpt(args.nanogpt)
        out["nanoGPT model.py"] = make_step(real, lambda m, x, y: m(x, y)[1], adamw(real))
    ours = GPT(ours_cfg)
    out["ours (train.py)"] = make_step(ours, default_loss_ce, adamw(ours))
    ours_fe = GPT(ours_cfg)
    out["ours, foreach AdamW"] = make_step(ours_fe, default_loss_ce, adamw(ours_fe, foreach=True))
    if args.compile:
        ref_c = NanoGPTRef(**BABY)
        compiled_ref = torch.compile(ref_c)
        out["reference, compiled"] = make_step(compiled_ref, lambda m, x, y: m(x, y)[1], adamw(ref_c, foreach=True))
        ours_c = GPT(ours_cfg)  # as train.py --compile does it: torch.compile(loss_fn)
        out["ours, compiled (train.py --compile)"] = make_step(ours_c, torch.compile(default_loss_ce), adamw(ours_c))
    return out


def time_steps(steps: dict, rounds: int, per_round: int, warmup: int) -> dict[str, list[float]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, BABY["vocab_size"], (12, BABY["block_size"]), generator=gen)  # (B, T)
    y = torch.randint(0, BABY["vocab_size"], (12, BABY["block_size"]), generator=gen)
    for fn in steps.values():
        for _ in range(warmup):
            fn(x, y)
    times = {name: {"wall": [], "cpu": []} for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():  # interleaved: a load spike slows every variant of the round alike
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(per_round):
                fn(x, y)
            times[name]["wall"].append(1e3 * (time.perf_counter() - t0) / per_round)
            times[name]["cpu"].append(1e3 * (time.process_time() - c0) / per_round)  # less disturbed by other jobs
    return times


def profile_ours(n: int = 20) -> str:
    seed_everything(0)
    model = GPT(GPTConfig(**BABY))
    step = make_step(model, default_loss_ce, adamw(model))
    x = torch.randint(0, 65, (12, 64))
    for _ in range(3):
        step(x, x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step(x, x)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def main(argv=None) -> dict:
    p = base_parser(__doc__, seed=True)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to measure")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (medians over them)")
    p.add_argument("--per-round", type=int, default=5, help="steps per variant per round")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models (slow first call)")
    p.add_argument("--nanogpt", help="path to a nanoGPT checkout: also time its real model.py")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's table of our step and exit")
    args = p.parse_args(argv)
    if args.profile:
        table = profile_ours()
        print(table)
        return {"profile": table}
    rows, results = [], {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        times = time_steps(variants(args), args.rounds, args.per_round, warmup=3)
        ref = {k: statistics.median(v) for k, v in times["nanoGPT-style reference"].items()}
        for name, ts in times.items():
            wall, cpu = statistics.median(ts["wall"]), statistics.median(ts["cpu"])
            rows.append({"threads": threads, "variant": name, "ms/step": wall, "speed vs ref (wall)": ref["wall"] / wall,
                         "CPU ms/step": cpu, "speed vs ref (CPU)": ref["cpu"] / cpu})  # fmt: skip
        results[threads] = times
    table = markdown_table(rows, floatfmt=".2f")
    print(f"\n{hardware_info('cpu')}\nbaby config (4 layers, 128 wide, block 64, batch 12), {args.rounds} interleaved "
          f"rounds × {args.per_round} steps, medians; speed > 1 = faster than the reference:\n{table}")  # fmt: skip
    return {"rows": rows, "times": results}


if __name__ == "__main__":
    main()
