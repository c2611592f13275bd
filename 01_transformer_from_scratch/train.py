"""Train the mini-GPT on tiny-shakespeare: AdamW, warm-up + cosine LR, grad clipping and accumulation, mixed precision
where it helps, periodic val loss, resumable checkpoints (bit-exact), a loss-curve PNG and a final sample.

    python 01_transformer_from_scratch/train.py                       # quick CPU demo (~1 min)
    python 01_transformer_from_scratch/train.py --max-iters 2000      # nanoGPT's "baby GPT" budget (README table)
    python 01_transformer_from_scratch/train.py --resume              # continue from out_dir/ckpt.safetensors
    python 01_transformer_from_scratch/train.py --compile --optimizer muon   # torch.compile'd step; Muon (muon.py)

References: Radford et al. 2019 (GPT-2), Karpathy's nanoGPT, Loshchilov & Hutter 2019 (AdamW).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ch01.char_tokenizer import CharTokenizer
from ch01.evaluate import evaluate_loss
from ch01.functional import cosine_lr
from ch01.model import GPT, GPTConfig
from common.checkpoint import load_checkpoint, save_checkpoint
from common.cli import base_parser
from common.data import SHAKESPEARE_PATH, cache_dir, get_batch, load_shakespeare, train_val_split
from common.device import autocast_dtype, pick_device
from common.seed import seed_everything


@dataclass
class TrainConfig:
    max_iters: int = 2000
    batch_size: int = 12
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    optimizer: str = "adamw"  # "adamw" | "muon" (Newton–Schulz-orthogonalised momentum for hidden matrices: muon.py)
    muon_lr_scale: float = 1.0  # Muon's lr = lr · this (its update is already scaled to AdamW's RMS)
    compile: bool = False  # torch.compile the loss (forward + backward fused into fewer kernels; slow first step)
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 50  # batches per evaluation; 0 = never evaluate
    eval_at_start: bool = False  # also evaluate before the first step
    ckpt_interval: int = 500
    log_interval: int = 50
    seed: int = 1337
    batch_seed: int | None = None  # draw batches from their own generator (same batches whatever else uses the RNG)
    device: str = "auto"
    out_dir: str | None = field(default_factory=lambda: str(cache_dir("runs", "ch01")))  # None: write nothing
    progress: bool = True


@dataclass
class TrainState:
    """What a callback sees after each optimizer step."""

    it: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    history: dict
    loss: torch.Tensor  # this step's loss (a 0-d tensor: reading it syncs the device)


def default_loss(model, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy; plus the model's auxiliary loss (an MoE's load balancing) when it has ``aux_loss()``."""
    ce = model.loss(x, y)
    if not hasattr(model, "aux_loss"):
        return {"loss": ce}
    aux = model.aux_loss()
    return {"loss": ce + aux, "ce": ce, "aux": aux}


def prepare_data(tokenizer: str = "char", vocab_size: int = 512):
    """(tokenizer, train_ids, val_ids) for tiny-shakespeare; ids are int64 tensors."""
    text = load_shakespeare()
    if tokenizer == "char":
        tok = CharTokenizer.from_text(text)
        ids = tok.encode_array(text)
    elif tokenizer == "bpe":
        from ch01.bpe import Tokenizer, train_bpe  # written from scratch in bpe.py

        path = cache_dir("tokenizers") / f"shakespeare_bpe{vocab_size}"
        if (path / "vocab.json").exists():
            tok = Tokenizer.load(path)
        else:
            vocab, merges = train_bpe(str(SHAKESPEARE_PATH), vocab_size, [])
            tok = Tokenizer(vocab, merges, [])
            tok.save(path)
        ids = np.asarray(tok.to_tiktoken().encode_ordinary(text), dtype=np.int64)
    else:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose char or bpe")
    train_ids, val_ids = train_val_split(torch.from_numpy(np.asarray(ids, dtype=np.int64)))
    return tok, train_ids, val_ids


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not norms/embeddings' gains), as in nanoGPT; ``tc.optimizer="muon"``:
    Muon for the blocks' 2-D matrices and AdamW for the rest, in one optimizer (muon.py)."""
    if tc.optimizer == "muon":
        from ch01.muon import Muon, muon_param_groups

        groups = muon_param_groups(model, tc.weight_decay, tc.muon_lr_scale)
        return Muon(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2))
    if tc.optimizer != "adamw":
        raise ValueError(f"optimizer={tc.optimizer!r}; choose 'adamw' or 'muon'")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2))


class _Loop:
    """The state of one training run; ``train`` drives it. Split out so each piece stays short."""

    def __init__(self, model, tc: TrainConfig, train_ids, val_ids, loss_fn, callbacks, tokenizer, batch_fn=None):
        self.model, self.tc, self.train_ids, self.val_ids = model, tc, train_ids, val_ids
        self.batch_fn = batch_fn
        self.loss_fn, self.callbacks, self.tokenizer = loss_fn, callbacks, tokenizer
        if tc.compile:  # the function, not the model: the returned model stays a plain nn.Module (save, generate)
            self.loss_fn = torch.compile(loss_fn)
        self.device = next(model.parameters()).device
        self.opt = make_optimizer(model, tc)
        self.history: dict = {"train_losses": [], "val": []}
        self.pending: dict[str, list[torch.Tensor]] = {}  # per-step losses not yet moved to the host
        self.batch_gen = torch.Generator().manual_seed(tc.batch_seed) if tc.batch_seed is not None else None
        amp = autocast_dtype(self.device)
        self.ctx = torch.autocast(self.device.type, dtype=amp) if amp else contextlib.nullcontext()
        self.out = Path(tc.out_dir) if tc.out_dir else None
        self.train_time = self.cpu_time = 0.0
        self.done = 0  # optimizer steps completed (where a checkpoint taken now resumes)

    def step(self, it: int) -> torch.Tensor:
        tc, model = self.tc, self.model
        for g in self.opt.param_groups:
            g["lr"] = cosine_lr(it, tc.lr, tc.min_lr, tc.warmup_iters, tc.max_iters)
        sums: dict[str, torch.Tensor] = {}
        for _ in range(tc.grad_accum):
            if self.batch_fn is not None:  # custom batches (SFT's packed rows): loss_fn(model, *batch)
                batch = self.batch_fn()
            else:
                batch = get_batch(self.train_ids, tc.batch_size, model.config.block_size, self.device, self.batch_gen)
            with self.ctx:
                parts = self.loss_fn(model, *batch)
            (parts["loss"] / tc.grad_accum).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0) + v.detach().float() / tc.grad_accum
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        logged = {"train_losses": sums.get("ce", sums["loss"])}  # cross-entropy: comparable across models
        logged |= {f"{k}_losses": v for k, v in sums.items() if k not in ("loss", "ce")}
        for k, v in logged.items():
            self.pending.setdefault(k, []).append(v)
        return sums["loss"]

    def flush(self) -> None:
        """Move pending per-step losses to the host history (the only host sync of the loop)."""
        for k, vals in self.pending.items():
            self.history.setdefault(k, []).extend(torch.stack(vals).tolist())
        self.pending.clear()

    def evaluate(self, it: int) -> None:
        if self.tc.eval_iters <= 0:
            return
        kw = dict(batch_size=self.tc.batch_size, max_batches=self.tc.eval_iters)
        tr = evaluate_loss(self.model, self.train_ids, seed=1, **kw)
        va = evaluate_loss(self.model, self.val_ids, seed=2, **kw)
        if self.tc.progress:
            tqdm.write(f"iter {it}: train loss {tr:.4f}, val loss {va:.4f}")
        self.history["val"].append([it, tr, va])

    def save(self, step: int) -> None:
        if self.out is None:
            return
        self.flush()
        extra = {"history": self.history, "train_config": asdict(self.tc), "model_config": self.model.config.to_dict()}
        save_checkpoint(self.out / "ckpt.safetensors", self.model, self.opt, step=step, extra=extra)


def train(
    model: torch.nn.Module | GPTConfig,
    tc: TrainConfig,
    train_ids: torch.Tensor,
    val_ids: torch.Tensor,
    *,
    resume: bool = False,
    tokenizer=None,
    loss_fn=default_loss,
    callbacks=(),
    batch_fn=None,
) -> dict:
    """Train ``model`` (or a new ``GPT`` of a ``GPTConfig``, built after seeding) in place.

    ``loss_fn(model, x, y) -> {"loss": ..., optional "ce", other parts}``: what to minimise; parts other than loss/ce
    are logged per step as ``<name>_losses``. ``callbacks``: functions of a ``TrainState``, called after every step.
    ``batch_fn() -> tuple``: where batches come from instead of random windows of ``train_ids`` (the loss is then
    ``loss_fn(model, *batch)``; chapter 03's SFT passes packed conversations with their masks).
    With ``tc.out_dir`` the run checkpoints (bit-exact resume, also on Ctrl-C) and saves ``out_dir/model`` (+ the
    tokenizer). Returns {'model', 'train_losses' (per step), 'val' [[iter, train, val]], 'tokens_per_s' (training
    steps only, wall), 'tokens_per_cpu_s', 'train_time_s', 'out_dir', ...}."""
    seed_everything(tc.seed)
    if isinstance(model, GPTConfig):
        model = GPT(model)
    model.to(pick_device(tc.device)).train()
    loop = _Loop(model, tc, train_ids, val_ids, loss_fn, callbacks, tokenizer, batch_fn)
    start = 0
    if resume:
        meta = load_checkpoint(loop.out / "ckpt.safetensors", model, loop.opt)  # RNG states too: same batches
        start, loop.history = meta["step"], meta["extra"]["history"]
        print(f"resumed from {loop.out / 'ckpt.safetensors'} at iteration {start}")
    _run(loop, start)
    loop.evaluate(tc.max_iters)
    if loop.out is not None:
        loop.save(tc.max_iters)
        model.save(loop.out / "model")
        if tokenizer is not None:
            tokenizer.save(loop.out / "model")
    model.eval()
    tokens = (tc.max_iters - start) * tc.batch_size * tc.grad_accum * model.config.block_size
    return {
        "model": model,
        **loop.history,
        "train_time_s": loop.train_time,
        "tokens_per_s": tokens / max(loop.train_time, 1e-9),
        "tokens_per_cpu_s": tokens / max(loop.cpu_time, 1e-9),
        "out_dir": str(loop.out) if loop.out else None,
    }


def _run(loop: _Loop, start: int) -> None:
    tc = loop.tc
    bar = tqdm(range(start, tc.max_iters), initial=start, total=tc.max_iters, disable=not tc.progress, desc="train")
    loop.done = start
    try:
        for it in bar:
            if it % tc.eval_interval == 0 and (it > 0 or tc.eval_at_start):
                loop.evaluate(it)
            t0, c0 = time.perf_counter(), time.process_time()
            loss = loop.step(it)
            loop.done = it + 1
            loop.train_time += time.perf_counter() - t0
            loop.cpu_time += time.process_time() - c0  # less disturbed than wall time on a shared machine
            for cb in loop.callbacks:
                cb(TrainState(it, loop.model, loop.opt, loop.history, loss))
            if (it + 1) % tc.log_interval == 0:
                loop.flush()
                bar.set_postfix(loss=f"{loop.history['train_losses'][-1]:.3f}")
            if (it + 1) % tc.ckpt_interval == 0 and it + 1 < tc.max_iters:
                loop.save(it + 1)
    except KeyboardInterrupt:
        loop.save(loop.done)
        print(f"\ninterrupted: checkpoint at iteration {loop.done} in {loop.out}; continue with --resume")
        raise
    loop.flush()


def main(argv=None) -> dict:
    p = base_parser(__doc__, device=True, seed=True, out=True)
    p.add_argument("--preset", default="small", help="model preset (tiny, small, medium, gpt2-small)")
    p.add_argument("--arch", default="llama", choices=["llama", "gpt2"], help="gpt2: learned pos + LayerNorm + GELU")
    p.add_argument("--attn", default="sdpa", help="attention implementation (naive, sdpa, ...)")
    p.add_argument("--tokenizer", default="char", choices=["char", "bpe"])
    p.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size")
    p.add_argument("--max-iters", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-interval", type=int, default=200)
    p.add_argument("--ckpt-interval", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.safetensors")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step's loss (faster steps)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"], help="muon: see muon.py")
    args = p.parse_args(argv)
    tok, train_ids, val_ids = prepare_data(args.tokenizer, args.vocab_size)
    arch = dict(pos_emb="learned", norm="layernorm", mlp="gelu") if args.arch == "gpt2" else {}
    mcfg = GPTConfig.preset(args.preset, vocab_size=tok.vocab_size, attn_impl=args.attn, **arch)
    tc = TrainConfig(
        max_iters=args.max_iters,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        eval_interval=args.eval_interval,
        ckpt_interval=args.ckpt_interval,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
        compile=args.compile,
        optimizer=args.optimizer,
        warmup_iters=min(100, args.max_iters // 10),
        **({"out_dir": args.out} if args.out else {}),
    )
    res = train(mcfg, tc, train_ids, val_ids, resume=args.resume, tokenizer=tok)
    model = res["model"]
    from common.plot import assets_dir, line_plot  # matplotlib only where a plot is drawn (spawned ranks import us)

    curve = assets_dir(__file__) / "train_loss.png"
    its = [v[0] for v in res["val"]]
    line_plot(
        {
            "train (per step)": (range(1, len(res["train_losses"]) + 1), res["train_losses"]),
            "val": (its, [v[2] for v in res["val"]]),
        },
        curve,
        title=f"mini-GPT ({args.preset}) on tiny-shakespeare",
        xlabel="iteration",
        ylabel="cross-entropy loss",
        marker="",
    )
    device = next(model.parameters()).device
    prompt = torch.tensor([tok.encode("\n")], device=device)
    sample = tok.decode(model.generate(prompt, 300, temperature=0.8, top_k=50)[0].tolist())
    final_val = res["val"][-1][2]
    print(
        f"\n| preset | params | iters | val loss | train time (s) | tokens/s |\n|---|---|---|---|---|---|\n"
        f"| {args.preset} | {model.num_params():,} | {args.max_iters} | {final_val:.4f} | {res['train_time_s']:.1f} "
        f"| {res['tokens_per_s']:,.0f} |"
    )
    print(f"\nloss curve: {curve}\nsample:\n{sample}")
    (Path(res["out_dir"]) / "metrics.json").write_text(
        json.dumps({"val_loss": final_val, "val": res["val"], "tokens_per_s": res["tokens_per_s"]})
    )
    return {**res, "val_loss": final_val, "sample": sample}


if __name__ == "__main__":
    main()
