"""The target/draft pair of char-level Shakespeare models that chapter 07's benchmarks decode with, trained once and
cached under ``.cache/ch07/`` (gitignored).

    from ch07.models import decode_models
    target, draft, tok, val_ids = decode_models()

Both have ``block_size=640`` so a 64-token prompt plus 512 new tokens fits (the ``small`` preset's 64 would not).
They are trained with ``ch01.train.train`` like every chapter-01 model, but with a smaller batch than
``ch01.pretrained.pretrained_char_model``'s default of 12 so that training 640-token windows stays CPU-cheap:
the target is 6 layers × 256 wide (4.8M parameters: big enough that a decode step's cost is mostly its weights,
the regime speculative decoding helps in), the draft 2 layers × 128 wide (0.4M), roughly 10× cheaper per token.
"""

from __future__ import annotations

import hashlib
import json

import torch

from ch01.model import GPT, GPTConfig
from ch01.train import TrainConfig, prepare_data, train
from common.data import cache_dir, get_batch

TARGET = dict(preset="medium", overrides=dict(block_size=640, n_embd=256, n_head=4), iters=400, batch_size=2)
DRAFT = dict(preset="tiny", overrides=dict(block_size=640, n_embd=128), iters=600, batch_size=4)


def cached_char_model(
    preset: str, overrides: dict, iters: int, batch_size: int, seed: int = 1337, verbose: bool = True
) -> GPT:
    """Train ``GPTConfig.preset(preset, **overrides)`` on char-level Shakespeare once; later calls load it."""
    tok, train_ids, val_ids = prepare_data("char")
    mcfg = GPTConfig.preset(preset, vocab_size=tok.vocab_size, **overrides)
    key = json.dumps({"model": mcfg.to_dict(), "iters": iters, "batch": batch_size, "seed": seed}, sort_keys=True)
    run_dir = cache_dir("ch07", f"{preset}-{iters}-{hashlib.sha256(key.encode()).hexdigest()[:10]}")
    model_dir = run_dir / "model"
    if (model_dir / "model.safetensors").exists():
        return GPT.load(model_dir).eval()
    if verbose:
        print(f"training {preset} {overrides} for {iters} iterations (batch {batch_size}); cached in {run_dir} ...")
    tc = TrainConfig(
        max_iters=iters,
        batch_size=batch_size,
        seed=seed,
        device="cpu",
        out_dir=str(run_dir),
        progress=verbose,
        warmup_iters=min(100, iters // 10),
        eval_interval=iters,
        eval_iters=10,
        ckpt_interval=iters + 1,
    )
    model = train(mcfg, tc, train_ids, val_ids, tokenizer=tok)["model"].cpu().eval()
    model.save(model_dir)
    return model


def distilled_draft(
    target: GPT,
    draft: GPT,
    iters: int = 150,
    batch_size: int = 4,
    seq_len: int = 256,
    lr: float = 5e-4,
    seed: int = 0,
    verbose: bool = True,
) -> GPT:
    """Fine-tune the draft to imitate the target: minimise KL(p_target || p_draft) on training windows (knowledge
    distillation, as in DistillSpec, Zhou et al. 2023). Acceptance = 1 - TV(p, q), so a draft that agrees with THIS
    target, not just with the data, is accepted more often. Cached like the models themselves."""
    _, train_ids, _ = prepare_data("char")
    fingerprint = {
        m: [round(v.double().sum().item(), 6) for v in model.state_dict().values()][:4]
        for m, model in (("target", target), ("draft", draft))
    }
    key = json.dumps(
        {**fingerprint, "iters": iters, "batch": batch_size, "T": seq_len, "lr": lr, "seed": seed}, sort_keys=True
    )
    model_dir = cache_dir("ch07", f"distilled-{iters}-{hashlib.sha256(key.encode()).hexdigest()[:10]}") / "model"
    if (model_dir / "model.safetensors").exists():
        return GPT.load(model_dir).eval()
    student = GPT(draft.config)
    student.load_state_dict(draft.state_dict())
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for it in range(iters):
        x, _ = get_batch(train_ids, batch_size, seq_len, "cpu", g)  # (B, T)
        with torch.no_grad():
            p_log = target(x).log_softmax(-1)  # (B, T, V)
        q_log = student(x).log_softmax(-1)  # (B, T, V)
        loss = torch.nn.functional.kl_div(
            q_log.flatten(0, 1), p_log.flatten(0, 1), log_target=True, reduction="batchmean"
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if verbose and (it % 25 == 0 or it == iters - 1):
            print(f"distill {it}/{iters}: KL(target || draft) = {loss.item():.4f}", flush=True)
    student.eval().save(model_dir)
    return student


def decode_models(verbose: bool = True, distill: bool = True):
    """(target, draft, CharTokenizer, val_ids) — the chapter's benchmark pair (draft distilled from the target)."""
    tok, _, val_ids = prepare_data("char")
    target = cached_char_model(
        TARGET["preset"], TARGET["overrides"], TARGET["iters"], TARGET["batch_size"], verbose=verbose
    )
    draft = cached_char_model(DRAFT["preset"], DRAFT["overrides"], DRAFT["iters"], DRAFT["batch_size"], verbose=verbose)
    if distill:
        draft = distilled_draft(target, draft, verbose=verbose)
    return target, draft, tok, val_ids


if __name__ == "__main__":
    torch.set_num_threads(1)
    t, d, tok, val = decode_models()
    from ch01.pretrained import val_loss

    print(f"target {t.num_params() / 1e6:.2f}M params, val loss {val_loss(t, val, batch_size=4, max_batches=5):.3f}")
    print(f"draft  {d.num_params() / 1e6:.2f}M params, val loss {val_loss(d, val, batch_size=4, max_batches=5):.3f}")
