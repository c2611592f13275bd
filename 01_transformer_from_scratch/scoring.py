"""Scoring an LM the way lm-evaluation-harness does: log-likelihoods, multiple choice, greedy exact match.

    from ch01.scoring import loglikelihood, loglikelihood_rolling, multiple_choice, exact_match
    loglikelihood(model, tok, [("The cat sat on the", " mat")])    # [(log p(" mat" | context), is_greedy)]
    loglikelihood_rolling(model, tok, [long_text])                  # [sum of log p of every token] (sliding windows)
    multiple_choice(model, tok, [{"context": "2+2=", "choices": ["4", "5"], "gold": 0}])  # {"acc": …, "acc_norm": …}
    exact_match(model, tok, [{"context": "Q: 2+2?\\nA:", "answer": "4", "until": ["\\n"]}])  # {"exact_match": …}

``model`` is anything ``idx (B, T) -> logits (B, T, V)`` (a ch01 ``GPT``, a wrapper of an HF or quantized model);
``tok`` has ``encode`` / ``decode``. Pass ``block_size`` when the model has no ``config``.

Why these: a model's loss per token cannot compare two tokenizers, and free-form generation needs a judge. A
log-likelihood multiple choice asks the model which continuation it finds most probable — no sampling, no parsing,
every model scored on the same strings. ``acc`` picks the choice with the largest total log-likelihood, which favours
short choices (every extra token costs probability); ``acc_norm`` divides by the choice's length in characters first
(lm-evaluation-harness's definition: ``len(choice)`` of the choice string without the target delimiter).

The context / continuation split follows the harness's ``_encode_pair``: trailing whitespace of the context moves into
the continuation, the pair is encoded as one string and the continuation is whatever follows the context's tokens
(so a BPE merge across the seam is tokenized as the model would see it). A too-long input is cut from the left.
References: Gao et al., "A framework for few-shot language model evaluation" (lm-evaluation-harness), 2021-2024.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def model_device(model) -> torch.device:
    params = getattr(model, "parameters", None)
    first = next(params(), None) if params is not None else None
    return first.device if first is not None else torch.device("cpu")


def _block_size(model, block_size: int | None) -> int:
    if block_size is not None:
        return block_size
    if not hasattr(model, "config"):
        raise ValueError("pass block_size: the model has no config")
    return model.config.block_size


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them (see the module docstring)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = list(tok.encode(context + continuation))
    ctx = list(tok.encode(context))
    return ctx, whole[len(ctx) :]


def prefix_id(tok) -> int:
    """The token an empty context starts from: end-of-text if the tokenizer has one, else its encoding of a newline."""
    eos = getattr(tok, "eos_id", None)
    return eos if eos is not None else tok.encode("\n")[-1]


@torch.no_grad()
def score_tokens(model, pairs: Sequence[tuple[list[int], list[int]]], block_size: int, batch_size: int = 8):
    """[(sum of log p(target tokens | context tokens), all targets greedy)] for token-id pairs; targets non-empty.

    Each row is ``(context + target)[-(block_size + 1):][:-1]``: the context is cut from the left to fit; rows are
    right-padded (causal attention: padding after a row cannot change it) and batched longest first."""
    device, out = model_device(model), [None] * len(pairs)
    rows = []
    for i, (ctx, tgt) in enumerate(pairs):
        if not 0 < len(tgt) <= block_size:
            raise ValueError(f"a continuation must be 1..{block_size} tokens (block_size), got {len(tgt)}")
        if not ctx:
            raise ValueError("a context must have at least one token")
        rows.append((i, (list(ctx) + list(tgt))[-(block_size + 1) :][:-1], list(tgt)))
    rows.sort(key=lambda r: -len(r[1]))
    for b in range(0, len(rows), batch_size):
        chunk = rows[b : b + batch_size]
        T = len(chunk[0][1])
        idx = torch.zeros(len(chunk), T, dtype=torch.long)  # (B, T), right-padded with id 0
        for j, (_, inp, _) in enumerate(chunk):
            idx[j, : len(inp)] = torch.tensor(inp)
        logp = F.log_softmax(torch.as_tensor(model(idx.to(device))).float(), dim=-1).cpu()  # (B, T, V)
        for j, (i, inp, tgt) in enumerate(chunk):
            lp = logp[j, len(inp) - len(tgt) : len(inp)]  # (n, V): the positions that predict the targets
            target = torch.tensor(tgt)
            out[i] = (lp.gather(1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all()))
    return out


def loglikelihood(
    model, tok, requests: Sequence[tuple[str, str]], batch_size: int = 8, block_size: int | None = None
) -> list[tuple[float, bool]]:
    """[(log p(continuation | context) in nats, whether greedy decoding would produce exactly the continuation)]."""
    bs, pairs = _block_size(model, block_size), []
    for context, continuation in requests:
        if context:
            pairs.append(encode_pair(tok, context, continuation))
        else:  # lm-eval's convention: an empty context starts from the end-of-text token
            pairs.append(([prefix_id(tok)], list(tok.encode(continuation))))
    return score_tokens(model, pairs, bs, batch_size)


def rolling_windows(ids: Sequence[int], prefix: int, max_len: int):
    """(input, targets) windows that predict every id of ``ids`` exactly once, each from up to ``max_len`` tokens.

    lm-evaluation-harness's ``get_rolling_token_windows`` with ``context_len=1``: the first window reads ``prefix`` +
    ``ids[:max_len-1]``; each next one predicts the following ``max_len`` ids from the ``max_len`` ids before them (the
    windows share one token at each seam); the last, shorter remainder is predicted from a full ``max_len`` window."""
    ids = list(ids)
    if not ids:
        return
    first = min(max_len, len(ids))
    yield [prefix] + ids[: first - 1], ids[:first]
    done = first
    while done < len(ids):
        n = min(len(ids) - done, max_len)
        end = done + n
        yield ids[max(end - max_len - 1, 0) : end - 1], ids[end - n : end]
        done = end


def loglikelihood_rolling_ids(model, ids: Sequence[int], prefix: int, block_size: int, batch_size: int = 8) -> float:
    """Sum of log p (nats) of every id of ``ids`` given ``prefix`` and what precedes it, in sliding windows."""
    pairs = [(inp[: len(inp) - len(tgt) + 1], tgt) for inp, tgt in rolling_windows(ids, prefix, block_size)]
    return sum(lp for lp, _ in score_tokens(model, pairs, block_size, batch_size))


def loglikelihood_rolling(
    model, tok, texts: Sequence[str], batch_size: int = 8, block_size: int | None = None
) -> list[float]:
    """[total log-likelihood (nats) of each whole text], every token scored, the first from the end-of-text token
    (or a newline when the tokenizer has none). bits per byte = -total / ln 2 / UTF-8 bytes."""
    bs = _block_size(model, block_size)
    return [loglikelihood_rolling_ids(model, tok.encode(t), prefix_id(tok), bs, batch_size) for t in texts]


def check_items(items: Sequence[dict]) -> None:
    """Raise a ValueError naming the first malformed multiple-choice item."""
    for n, item in enumerate(items):
        if not isinstance(item, dict) or not {"context", "choices", "gold"} <= item.keys():
            raise ValueError(f"item {n}: needs the keys 'context', 'choices' and 'gold', got {item!r:.200}")
        choices, gold = item["choices"], item["gold"]
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"item {n}: 'choices' must be a non-empty list of strings, got {choices!r:.200}")
        if not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"item {n}: every choice must be a non-empty string, got {choices!r:.200}")
        if not isinstance(item["context"], str):
            raise ValueError(f"item {n}: 'context' must be a string")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise ValueError(f"item {n}: 'gold' must be an index into its {len(choices)} choices, got {gold!r}")


def mc_metrics(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """lm-evaluation-harness's multiple-choice ``acc`` / ``acc_norm`` of one item (ties go to the first choice)."""
    lls = np.array(lls, dtype=float)
    completion_len = np.array([float(len(c)) for c in choices])
    return {"acc": float(np.argmax(lls) == gold), "acc_norm": float(np.argmax(lls / completion_len) == gold)}


def multiple_choice(
    model,
    tok,
    items: Sequence[dict],
    *,
    target_delimiter: str = " ",
    batch_size: int = 8,
    block_size: int | None = None,
    return_lls: bool = False,
) -> dict:
    """Mean ``acc`` and ``acc_norm`` over items ``{"context": str, "choices": [str, …], "gold": int}``.

    Each choice is scored as the continuation ``target_delimiter + choice`` of ``context`` (the harness's request).
    ``return_lls`` adds ``"lls"``: every item's list of choice log-likelihoods."""
    check_items(items)
    requests = [(it["context"], target_delimiter + c) for it in items for c in it["choices"]]
    flat = [lp for lp, _ in loglikelihood(model, tok, requests, batch_size, block_size)]
    lls, per_item, k = [], [], 0
    for it in items:
        lls.append(flat[k : k + len(it["choices"])])
        k += len(it["choices"])
        per_item.append(mc_metrics(lls[-1], it["choices"], it["gold"]))
    out = {m: float(np.mean([p[m] for p in per_item])) if per_item else float("nan") for m in ("acc", "acc_norm")}
    out["n"] = len(items)
    if return_lls:
        out["lls"] = lls
    return out


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop string."""
    cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
    return text[:cut]


def generate_until(model, tok, requests: Sequence[tuple[str, dict]], block_size: int | None = None) -> list[str]:
    """Greedy continuations of ``(context, {"until": [stop strings], "max_gen_toks": n})``, cut at the first stop
    string (the harness's ``generate_until``); the context is cut from the left to leave room for ``n`` tokens."""
    from ch01.generate import generate  # the course's one decode loop

    bs, out = _block_size(model, block_size), []
    for context, kwargs in requests:
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        n = int(kwargs.get("max_gen_toks", 64))
        ids = list(tok.encode(context))[-max(bs - n, 1) :] or [prefix_id(tok)]
        eos = getattr(tok, "eos_id", None)
        new = generate(model, [ids], n, temperature=0, stop_ids=[eos] if eos is not None else ())[0]
        if eos is not None and new and new[-1] == eos:
            new = new[:-1]
        out.append(cut_at_stops(tok.decode(new), until))
    return out


def exact_match(
    model,
    tok,
    items: Sequence[dict],
    checker: Callable[[str, str], bool] | None = None,
    max_gen_toks: int = 32,
    block_size: int | None = None,
) -> dict:
    """Fraction of items ``{"context", "answer", "until"?}`` whose greedy generation passes ``checker(pred, answer)``
    (default: equal after stripping whitespace). Returns ``{"exact_match", "n", "predictions"}``."""
    checker = checker or (lambda pred, answer: pred.strip() == answer.strip())
    for n, it in enumerate(items):
        if not isinstance(it, dict) or not isinstance(it.get("context"), str) or not isinstance(it.get("answer"), str):
            raise ValueError(f"item {n}: needs string 'context' and 'answer', got {it!r:.200}")
    reqs = [(it["context"], {"until": it.get("until", ["\n"]), "max_gen_toks": max_gen_toks}) for it in items]
    preds = generate_until(model, tok, reqs, block_size)
    hits = [bool(checker(p, it["answer"])) for p, it in zip(preds, items)]
    return {"exact_match": float(np.mean(hits)) if hits else float("nan"), "n": len(items), "predictions": preds}
