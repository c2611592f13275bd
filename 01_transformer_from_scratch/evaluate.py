"""The course's one validation loss: mean next-token cross-entropy of a model over held-out token ids.

    from ch01.evaluate import evaluate_loss
    evaluate_loss(model, val_ids)                        # consecutive, non-overlapping windows: deterministic
    evaluate_loss(model, val_ids, seed=2, max_batches=50)  # random windows drawn with a fixed seed (nanoGPT's estimate)

``model`` is a ch01 ``GPT`` (anything with ``loss(x, y)``) or any callable ``idx (B, T) -> logits (B, T, V)`` (an onnxruntime session wrapper, a
quantized copy); pass ``block_size`` when it has no ``config``. Loss in nats per token; perplexity is ``exp`` of it.

Loss per token cannot compare models with different tokenizers (a char model predicts ~1 byte per token, SmolLM2's
BPE ~4). ``bits_per_byte`` can: the total information the model needs to encode a text, divided by its UTF-8 bytes.

    bits_per_byte(model, tokenizer, text)                # 1.0 bpb = one bit per byte; uniform over 256 bytes is 8
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ch01.scoring import loglikelihood_rolling_ids, model_device
from common.data import get_batch


def _windows(data: torch.Tensor, batch_size: int, block_size: int, max_batches: int | None, seed: int | None):
    """Batches of (B, T+1) windows: consecutive from the start, or ``max_batches`` random batches when seeded."""
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(max_batches or 1):
            x, y = get_batch(data, batch_size, block_size, generator=gen)
            yield torch.cat([x, y[:, -1:]], 1)
        return
    starts = torch.arange((len(data) - 1) // block_size) * block_size
    if max_batches is not None:
        starts = starts[: max_batches * batch_size]
    if len(starts) == 0:
        raise ValueError(f"need more than block_size={block_size} tokens, got {len(data)}")
    for i in range(0, len(starts), batch_size):
        yield torch.as_tensor(data)[starts[i : i + batch_size, None] + torch.arange(block_size + 1)].long()


@torch.no_grad()
def evaluate_loss(
    model,
    data: torch.Tensor,
    batch_size: int = 32,
    max_batches: int | None = 20,
    *,
    seed: int | None = None,
    block_size: int | None = None,
) -> float:
    """Mean next-token loss (nats) over windows of ``data``, each window weighted by its size."""
    block_size = block_size or model.config.block_size
    device = _model_device(model)
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    total, count = 0.0, 0
    for w in _windows(data, batch_size, block_size, max_batches, seed):
        w = w.to(device)  # (B, T+1)
        if hasattr(model, "loss"):  # a model that knows its loss (ch01 GPT, wrappers of HF / quantized models)
            loss = model.loss(w[:, :-1], w[:, 1:])
        else:
            logits = torch.as_tensor(model(w[:, :-1]))  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten())
        total, count = total + loss.item() * len(w), count + len(w)
    if was_training:
        model.train()
    return total / count


def _model_device(model) -> torch.device:
    return model_device(model)


@torch.no_grad()
def bits_per_byte(model, tokenizer, text: str, block_size: int | None = None, batch_size: int = 8) -> float:
    """Held-out bits per UTF-8 byte: sum of next-token NLL (nats) / ln 2 / bytes of the predicted text.

    Every token after the first is predicted exactly once, in windows of ``block_size`` tokens that share one token at
    each seam (context restarts at each window, as in ``evaluate_loss``); the shorter remainder at the end is predicted
    from a full window. The windows are ``ch01.scoring``'s rolling log-likelihood (lm-evaluation-harness's)."""
    ids = list(tokenizer.encode(text))  # (N,)
    if len(ids) < 2:
        raise ValueError("bits_per_byte needs a text of at least two tokens")
    block_size = min(block_size or 1024, model.config.block_size) if hasattr(model, "config") else block_size or 1024
    n_bytes = len(text.encode("utf-8")) - len(tokenizer.decode(ids[:1]).encode("utf-8"))
    total = -loglikelihood_rolling_ids(model, ids[1:], ids[0], block_size, batch_size)
    return total / math.log(2) / max(n_bytes, 1)
