"""Train the mini-GPT on tiny-shakespeare: AdamW, warm-up + cosine LR, grad clipping and accumulation, mixed precision
where it helps, periodic val loss, resumable checkpoints (bit-exact), a loss-curve PNG and a final sample.

    python 01_transformer_from_scratch/train.py                       # quick CPU demo (~1 min)
    python 01_transformer_from_scratch/train.py --max-iters 2000      # nanoGPT's "baby GPT" budget (README table)
    python 01_transformer_from_scratch/train.py --resume              # continue from out_dir/ckpt.safetensors

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
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 50
    ckpt_interval: int = 500
    log_interval: int = 50
    seed: int = 1337
    device: str = "auto"
    out_dir: str = field(default_factory=lambda: str(cache_dir("runs", "ch01")))
    progress: bool = True


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


@torch.no_grad()
def estimate_loss(model: GPT, data: torch.Tensor, batch_size: int, eval_iters: int, device, seed: int = 0) -> float:
    """Mean loss over ``eval_iters`` random batches drawn with a fixed seed, so evaluations are comparable."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    losses = torch.zeros(eval_iters)
    for i in range(eval_iters):
        x, y = get_batch(data, batch_size, model.config.block_size, device, generator=gen)
        losses[i] = model.loss(x, y)
    model.train(was_training)
    return losses.mean().item()


def make_optimizer(model: GPT, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not norms/embeddings' gains), as in nanoGPT."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2))


def train(model_cfg: GPTConfig, tc: TrainConfig, train_ids: torch.Tensor, val_ids: torch.Tensor,
          resume: bool = False, tokenizer=None) -> dict:
    """Train and return {'model', 'train_losses' (per step), 'val' [(iter, train, val)], 'tokens_per_s', ...}."""
    device = pick_device(tc.device)
    out = Path(tc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.safetensors"
    seed_everything(tc.seed)
    model = GPT(model_cfg).to(device)
    opt = make_optimizer(model, tc)
    start, history = 0, {"train_losses": [], "val": []}
    if resume:
        meta = load_checkpoint(ckpt_path, model, opt)  # restores RNG states too: batches continue exactly
        start, history = meta["step"], meta["extra"]["history"]
        print(f"resumed from {ckpt_path} at iteration {start}")
    amp = autocast_dtype(device)
    ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
    tokens_per_iter = tc.batch_size * tc.grad_accum * model_cfg.block_size
    step_losses: list[torch.Tensor] = []
    t0, timed_iters = time.perf_counter(), 0
    bar = tqdm(range(start, tc.max_iters), initial=start, total=tc.max_iters, disable=not tc.progress, desc="train")
    try:
        for it in bar:
            if it % tc.eval_interval == 0 and it > 0:
                history["val"].append(_evaluate(model, tc, train_ids, val_ids, device, it))
            for g in opt.param_groups:
                g["lr"] = cosine_lr(it, tc.lr, tc.min_lr, tc.warmup_iters, tc.max_iters)
            loss_sum = torch.zeros((), device=device)
            for _ in range(tc.grad_accum):
                x, y = get_batch(train_ids, tc.batch_size, model_cfg.block_size, device)
                with ctx:
                    loss = model.loss(x, y) / tc.grad_accum
                loss.backward()
                loss_sum += loss.detach()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step_losses.append(loss_sum)
            timed_iters += 1
            if (it + 1) % tc.log_interval == 0:  # the only host sync in the loop
                history["train_losses"] += torch.stack(step_losses).tolist()
                step_losses.clear()
                bar.set_postfix(loss=f"{history['train_losses'][-1]:.3f}")
            if (it + 1) % tc.ckpt_interval == 0 and it + 1 < tc.max_iters:
                history["train_losses"] += torch.stack(step_losses).tolist() if step_losses else []
                step_losses.clear()
                _save(ckpt_path, model, opt, it + 1, history, tc, tokenizer)
    except KeyboardInterrupt:
        it_done = start + timed_iters
        history["train_losses"] += torch.stack(step_losses).tolist() if step_losses else []
        _save(ckpt_path, model, opt, it_done, history, tc, tokenizer)
        print(f"\ninterrupted: checkpoint at iteration {it_done} in {ckpt_path}; continue with --resume")
        raise
    elapsed = time.perf_counter() - t0
    if step_losses:
        history["train_losses"] += torch.stack(step_losses).tolist()
    history["val"].append(_evaluate(model, tc, train_ids, val_ids, device, tc.max_iters))
    _save(ckpt_path, model, opt, tc.max_iters, history, tc, tokenizer)
    model.save(out / "model")
    if tokenizer is not None and hasattr(tokenizer, "save") and isinstance(tokenizer, CharTokenizer):
        tokenizer.save(out / "model" / "tokenizer.json")
    return {"model": model, **history, "train_time_s": elapsed,
            "tokens_per_s": timed_iters * tokens_per_iter / max(elapsed, 1e-9), "out_dir": str(out)}


def _evaluate(model, tc, train_ids, val_ids, device, it):
    tr = estimate_loss(model, train_ids, tc.batch_size, tc.eval_iters, device, seed=1)
    va = estimate_loss(model, val_ids, tc.batch_size, tc.eval_iters, device, seed=2)
    tqdm.write(f"iter {it}: train loss {tr:.4f}, val loss {va:.4f}")
    return [it, tr, va]


def _save(path, model, opt, step, history, tc, tokenizer):
    extra = {"history": history, "train_config": asdict(tc), "model_config": model.config.to_dict()}
    save_checkpoint(path, model, opt, step=step, extra=extra)


def main(argv=None) -> dict:
    p = base_parser(__doc__)
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
    args = p.parse_args(argv)
    tok, train_ids, val_ids = prepare_data(args.tokenizer, args.vocab_size)
    arch = dict(pos_emb="learned", norm="layernorm", mlp="gelu") if args.arch == "gpt2" else {}
    mcfg = GPTConfig.preset(args.preset, vocab_size=tok.vocab_size if hasattr(tok, "vocab_size") else len(tok.vocab),
                            attn_impl=args.attn, **arch)
    tc = TrainConfig(max_iters=args.max_iters, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                     eval_interval=args.eval_interval, ckpt_interval=args.ckpt_interval, seed=args.seed,
                     device=args.device, progress=not args.no_progress, warmup_iters=min(100, args.max_iters // 10),
                     **({"out_dir": args.out} if args.out else {}))
    res = train(mcfg, tc, train_ids, val_ids, resume=args.resume, tokenizer=tok)
    model = res["model"]
    from common.plot import assets_dir, line_plot  # matplotlib only where a plot is drawn (spawned ranks import us)

    curve = assets_dir(__file__) / "train_loss.png"
    its = [v[0] for v in res["val"]]
    line_plot({"train (per step)": (range(1, len(res["train_losses"]) + 1), res["train_losses"]),
               "val": (its, [v[2] for v in res["val"]])}, curve, title=f"mini-GPT ({args.preset}) on tiny-shakespeare",
              xlabel="iteration", ylabel="cross-entropy loss", marker="")
    device = next(model.parameters()).device
    prompt = torch.tensor([tok.encode("\n")], device=device)
    sample = tok.decode(model.generate(prompt, 300, temperature=0.8, top_k=50)[0].tolist())
    final_val = res["val"][-1][2]
    print(f"\n| preset | params | iters | val loss | train time (s) | tokens/s |\n|---|---|---|---|---|---|\n"
          f"| {args.preset} | {model.num_params():,} | {args.max_iters} | {final_val:.4f} | {res['train_time_s']:.1f} "
          f"| {res['tokens_per_s']:,.0f} |")
    print(f"\nloss curve: {curve}\nsample:\n{sample}")
    (Path(res["out_dir"]) / "metrics.json").write_text(json.dumps({"val_loss": final_val, "val": res["val"],
                                                                   "tokens_per_s": res["tokens_per_s"]}))
    return {**res, "val_loss": final_val, "sample": sample}


if __name__ == "__main__":
    main()
