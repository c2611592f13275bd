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

from dataclasses import replace

import torch
import torch.nn.functional as F

from ch01.model import GPT, GPTConfig
from ch01.train import TrainConfig, prepare_data, train
from common.data import fingerprint, keyed_cache_dir

TARGET = dict(preset="medium", overrides=dict(block_size=640, n_embd=256, n_head=4), iters=400, batch_size=2)
DRAFT = dict(preset="tiny", overrides=dict(block_size=640, n_embd=128), iters=600, batch_size=4)


def cached_char_model(
    preset: str, overrides: dict, iters: int, batch_size: int, seed: int = 1337, verbose: bool = True
) -> GPT:
    """Train ``GPTConfig.preset(preset, **overrides)`` on char-level Shakespeare once; later calls load it."""
    tok, train_ids, val_ids = prepare_data("char")
    mcfg = GPTConfig.preset(preset, vocab_size=tok.vocab_size, **overrides)
    key = {"model": mcfg.to_dict(), "iters": iters, "batch": batch_size, "seed": seed}
    run_dir = keyed_cache_dir("ch07", f"{preset}-{iters}", key=key)
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


def greedy_continuations(target: GPT, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """(n, P + new_tokens): each prompt row (n, P) followed by the target's greedy continuation (ch01's generate on the
    fused decoder, 16 rows at a time: ~20-30 s for 64 × 320 tokens on one CPU core)."""
    from ch01.generate import generate
    from ch07.fused_decode import FusedDecoder

    fused = FusedDecoder(target)
    new = [torch.tensor(generate(fused, p, new_tokens, temperature=0)) for p in prompts.split(16)]
    return torch.cat([prompts, torch.cat(new)], 1)


def distilled_draft(
    target: GPT,
    draft: GPT,
    iters: int = 300,
    batch_size: int = 8,
    n_sequences: int = 64,
    new_tokens: int = 320,
    lr: float = 5e-4,
    seed: int = 0,
    verbose: bool = True,
) -> GPT:
    """Fine-tune the draft to imitate the target where it will be used: minimise KL(p_target || p_draft) on the
    target's OWN greedy continuations of training-set prompts (on-policy knowledge distillation, DistillSpec, Zhou et
    al. 2023). Acceptance is 1 - TV(p, q) on the text being decoded, so a draft that agrees with THIS target on ITS
    outputs is accepted more often than one that only fits the data. Training is ``ch01.train.train`` with the KL as
    its ``loss_fn`` (the teacher runs on each batch) over the continuations laid end to end, in windows of one
    continuation's length; constant learning rate after a short warm-up (Adam's first steps would undo the
    pretraining), no weight decay. Cached, keyed by both models' weights and the settings."""
    _, train_ids, _ = prepare_data("char")
    settings = dict(iters=iters, batch=batch_size, n=n_sequences, new=new_tokens, lr=lr, seed=seed)
    key = {"models": fingerprint(target, draft), **settings, "data": "greedy-continuations", "loop": "ch01.train"}
    model_dir = keyed_cache_dir("ch07", f"distilled-{iters}", key=key) / "model"
    if (model_dir / "model.safetensors").exists():
        return GPT.load(model_dir).eval()
    if verbose:
        print(f"distilling the draft on {n_sequences} greedy continuations of the target ({new_tokens} tokens each)")
    starts = torch.randint(0, len(train_ids) - 64, (n_sequences,), generator=torch.Generator().manual_seed(seed))
    data = greedy_continuations(target, torch.stack([train_ids[s : s + 64] for s in starts]), new_tokens)  # (n, L)
    target.eval()

    def kl_to_target(model, x, y):  # x (B, T): a window of the target's own text; y unused
        with torch.no_grad():
            p_log = target(x).log_softmax(-1)  # (B, T, V)
        q_log = model(x).log_softmax(-1)
        return {"loss": F.kl_div(q_log.flatten(0, 1), p_log.flatten(0, 1), log_target=True, reduction="batchmean")}

    student = GPT(replace(draft.config, block_size=data.shape[1] - 1))  # windows as long as one continuation
    student.load_state_dict(draft.state_dict())
    tc = TrainConfig(
        max_iters=iters,
        batch_size=batch_size,
        lr=lr,
        min_lr=lr,  # constant after the warm-up
        warmup_iters=20,
        weight_decay=0.0,
        beta2=0.999,
        eval_iters=0,
        log_interval=50,
        seed=seed,
        batch_seed=seed,
        device="cpu",
        out_dir=None,
        progress=verbose,
    )
    corpus = data.flatten()  # the continuations end to end
    res = train(student, tc, corpus, corpus, loss_fn=kl_to_target)
    if verbose:
        print(f"distilled: KL(target || draft) {res['train_losses'][0]:.4f} -> {res['train_losses'][-1]:.4f}")
    distilled = GPT(draft.config)  # back to the draft's own block_size (same weights: RoPE has no position table)
    distilled.load_state_dict(student.state_dict())
    distilled.eval().save(model_dir)
    return distilled


def data_trained_draft(verbose: bool = True) -> GPT:
    """The draft as trained on the data, before distillation (cached)."""
    return cached_char_model(DRAFT["preset"], DRAFT["overrides"], DRAFT["iters"], DRAFT["batch_size"], verbose=verbose)


def decode_models(verbose: bool = True, distill: bool = True):
    """(target, draft, CharTokenizer, val_ids) — the chapter's benchmark pair (draft distilled from the target)."""
    tok, _, val_ids = prepare_data("char")
    target = cached_char_model(
        TARGET["preset"], TARGET["overrides"], TARGET["iters"], TARGET["batch_size"], verbose=verbose
    )
    draft = data_trained_draft(verbose)
    if distill:
        draft = distilled_draft(target, draft, verbose=verbose)
    return target, draft, tok, val_ids


def greedy_agreement(target: GPT, draft: GPT, val_ids: torch.Tensor, n_prompts: int = 8, new_tokens: int = 256):
    """Fraction of the target's greedy tokens (continuing ``n_prompts`` held-out prompts) that the draft's argmax
    predicts from the same prefix — in greedy speculative decoding, the per-token acceptance probability."""
    starts = torch.linspace(0, len(val_ids) - 64 - new_tokens - 1, n_prompts).long()
    seqs = greedy_continuations(target, torch.stack([val_ids[s : s + 64] for s in starts]), new_tokens)
    with torch.no_grad():
        guess = draft(seqs[:, :-1]).argmax(-1)[:, 63:]  # (n, new_tokens)
    return (guess == seqs[:, 64:]).float().mean().item()


def main(argv=None):
    from ch01.evaluate import evaluate_loss
    from common.cli import base_parser

    p = base_parser("train/cache the chapter's target and draft, distil the draft, report val loss and agreement")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t, d, _, val = decode_models()
    report = {}
    for name, m in (("target", t), ("data-trained draft", data_trained_draft(verbose=False)), ("distilled draft", d)):
        loss = evaluate_loss(m, val, batch_size=4, max_batches=5)
        agree = None if m is t else greedy_agreement(t, m, val)
        report[name] = {"params": m.num_params(), "val_loss": loss, "greedy_agreement": agree}
        extra = "" if agree is None else f", agrees with the target's greedy tokens on held-out prompts {agree:.3f}"
        print(f"{name}: {m.num_params() / 1e6:.2f}M params, val loss {loss:.3f}{extra}")
    return report


if __name__ == "__main__":
    main()
