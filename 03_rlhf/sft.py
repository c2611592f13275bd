"""Supervised fine-tuning (SFT) on conversations: ChatML template -> token ids with an assistant-only loss mask ->
packed rows with document boundaries -> ch01's one training loop.

    from ch03.sft import CHATML, ChatTokenizer, encode_conversation, extend_model, pack, sft
    chat_tok = ChatTokenizer(char_tok, extra_chars=alphabet())        # + <|im_start|>, <|im_end|> as single ids
    model = extend_model(model, chat_tok.vocab_size, block_size=192)   # new embedding rows, a longer RoPE context
    ids, mask = encode_conversation(chat_tok, ex.messages())           # mask 1 = an assistant token (trained on)
    result = sft(model, chat_tok, [ex.messages() for ex in train], TrainConfig(max_iters=300, out_dir=None))

The template is ChatML, the format SmolLM2 uses: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message and
``<|im_start|>assistant\\n`` as the generation prompt; its ``{% generation %}`` block marks what the assistant writes, as
transformers' ``return_assistant_tokens_mask`` (and TRL's ``assistant_only_loss``) expect. Our mini-GPT tokenizers
have no special tokens, so ``ChatTokenizer`` adds the two markers as new ids (and, for a character vocabulary, the
characters the tasks need, e.g. digits and "+"), and ``extend_model`` adds their embedding rows. The loss is the mean
cross-entropy over assistant tokens only (the reply and its ``<|im_end|>``: the model learns to stop); prompts and
templates are context, not targets. Packing puts several conversations in one row; each keeps its own positions
(0, 1, ...) and attends only to itself (a block-diagonal mask), so packing changes nothing but speed.
Refs: Ouyang et al. 2022 (InstructGPT SFT), OpenAI ChatML (2023), Krell et al. 2021 (packing without cross-contamination).

    python 03_rlhf/sft.py          # SFT the cached char mini-GPT on the task suite for a few hundred steps
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from ch01.char_tokenizer import CharTokenizer
from ch01.chat_template import render_chat
from ch01.model import GPT
from ch01.train import TrainConfig, train

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTokenizer:
    """A tokenizer plus special tokens matched whole (new ids after the base vocabulary) and a chat template.

    For a ``CharTokenizer`` base, ``extra_chars`` missing from it are appended (old ids unchanged)."""

    def __init__(self, base, specials=(IM_START, IM_END), extra_chars: str = "", chat_template: str = CHATML):
        if isinstance(base, CharTokenizer):
            base = CharTokenizer(base.chars + "".join(sorted(set(extra_chars) - set(base.chars))))
        self.base, self.chat_template = base, chat_template
        self.special_ids = {s: base.vocab_size + i for i, s in enumerate(specials)}
        self.id_to_special = {i: s for s, i in self.special_ids.items()}
        self.eos_id, self.bos_id = self.special_ids.get(IM_END), None
        self._split = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size + len(self.special_ids)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for k, part in enumerate(self._split.split(text)):
            ids.extend([self.special_ids[part]] if k % 2 else (self.base.encode(part) if part else []))
        return ids

    def decode(self, ids) -> str:
        out, run = [], []
        for i in map(int, ids):
            if i in self.id_to_special:
                out += [self.base.decode(run), self.id_to_special[i]]
                run = []
            else:
                run.append(i)
        return "".join(out) + self.base.decode(run)

    def save(self, directory: str | Path) -> Path:
        directory = Path(self.base.save(directory))
        meta = {"specials": list(self.special_ids), "chat_template": self.chat_template}
        (directory / "chat_tokenizer.json").write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ChatTokenizer:
        from ch01.tokenizer import load_tokenizer

        meta = json.loads((Path(directory) / "chat_tokenizer.json").read_text())
        return cls(load_tokenizer(directory, chat=False), meta["specials"], chat_template=meta["chat_template"])


def extend_model(model: GPT, vocab_size: int, block_size: int | None = None) -> GPT:
    """A copy of ``model`` with ``vocab_size`` tokens (new rows = the mean of the old ones plus the model's init noise:
    a neutral start that still tells the new tokens apart) and optionally a longer ``block_size`` (RoPE has no
    position table: only the limit changes)."""
    cfg = model.config
    if vocab_size < cfg.vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the model's {cfg.vocab_size}")
    new_cfg = type(cfg).from_dict(
        {**cfg.to_dict(), "vocab_size": vocab_size, "block_size": block_size or cfg.block_size}
    )
    if new_cfg.pos_emb != "rope" and new_cfg.block_size != cfg.block_size:
        raise ValueError("a longer block_size needs RoPE (learned position embeddings have a fixed table)")
    new = GPT(new_cfg).to(next(model.parameters()).device)
    state = model.state_dict()
    for name in ("tok_emb.weight", "lm_head.weight"):
        old = state[name]  # (V_old, C)
        fresh = old.mean(0, keepdim=True) + cfg.init_std * torch.randn(vocab_size - len(old), old.shape[1])
        state[name] = torch.cat([old, fresh.to(old)])  # (V, C)
    new.load_state_dict(state)
    return new.train(model.training)


def encode_conversation(
    tok, messages: list[dict], template: str | None = None, end: str = IM_END
) -> tuple[list[int], list[int]]:
    """(ids, mask) of ``messages`` rendered with the chat template; mask 1 on what each assistant turn writes (its
    content and its ``end`` marker), 0 on prompts and template text. Raises ValueError without an assistant turn."""
    template = template or getattr(tok, "chat_template", None)
    if not template:
        raise ValueError("no chat template: pass template= or use a tokenizer with a chat_template")
    if not any(m.get("role") == "assistant" for m in messages):
        raise ValueError(f"conversation has no assistant turn, nothing to train on: {messages!r}")
    ids, mask, done = [], [], ""

    def push(text: str, trained: int) -> None:
        new = tok.encode(text)
        ids.extend(new)
        mask.extend([trained] * len(new))

    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        prefix = render_chat(template, messages[:i], add_generation_prompt=True)
        full = render_chat(template, messages[: i + 1])
        stop = full.find(end, len(prefix))
        if not (prefix.startswith(done) and full.startswith(prefix)) or stop < 0:
            raise ValueError(f"the template does not render assistant turn {i} as prompt + reply + {end!r}")
        push(prefix[len(done) :], 0)
        push(full[len(prefix) : stop + len(end)], 1)
        done = full[: stop + len(end)]
    push(render_chat(template, messages)[len(done) :], 0)
    return ids, mask


def pack(docs: list[tuple[list[int], list[int]]], block_size: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pack (ids, mask) documents greedily into rows of ``block_size`` next-token pairs.

    Returns idx, targets (-100 where not trained), positions (restart at 0 in every document) and doc (the document
    number of each slot, -1 for padding), all (N, block_size). A document never predicts across its boundary."""
    rows, row = [], []
    for n, (ids, mask) in enumerate(docs):
        if len(ids) - 1 > block_size:
            raise ValueError(f"conversation {n} has {len(ids)} tokens, more than block_size + 1 = {block_size + 1}")
        pairs = [(ids[t], ids[t + 1] if mask[t + 1] else -100, t, n) for t in range(len(ids) - 1)]
        if len(row) + len(pairs) > block_size:
            rows.append(row)
            row = []
        row += pairs
    rows.append(row)
    rows = [r + [(pad_id, -100, t, -1) for t in range(block_size - len(r))] for r in rows if r]
    idx, targets, positions, doc = torch.tensor(rows).unbind(-1)  # 4 × (N, block_size)
    return {"idx": idx, "targets": targets, "positions": positions, "doc": doc}


def doc_mask(doc: torch.Tensor) -> torch.Tensor:
    """(B, T) document numbers -> (B, T, T) True where query and key are in the same document (causality is ANDed
    in by the model). Padding slots (-1) see each other, never a document."""
    return doc[:, :, None] == doc[:, None, :]


def masked_loss(model, idx, targets, positions=None, doc=None) -> dict[str, torch.Tensor]:
    """Mean cross-entropy over the trained (targets != -100) tokens: the assistant-only SFT loss."""
    attn_mask = doc_mask(doc) if doc is not None else None
    logits = model(idx, positions=positions, attn_mask=attn_mask)  # (B, T, V)
    return {"loss": F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)}


def sft_batches(packed: dict[str, torch.Tensor], batch_size: int, seed: int = 0, device="cpu"):
    """A ``batch_fn`` for ch01's ``train``: random rows of ``packed`` (own generator: reproducible batches)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(packed["idx"])

    def next_batch():
        rows = torch.randint(n, (min(batch_size, n),), generator=gen)
        return tuple(packed[k][rows].to(device) for k in ("idx", "targets", "positions", "doc"))

    return next_batch


def replay_batches(batch_fn, data, rows: int, block_size: int, seed: int = 0, device="cpu"):
    """Append ``rows`` windows of pretraining tokens ``data`` (every next token a target) to each SFT batch.

    Without it a small model fine-tuned on a narrow task forgets its pretraining ("catastrophic forgetting": after
    SFT on arithmetic the capstone's mini-GPT predicts ``<|im_end|>`` everywhere in Shakespeare). Mixing in pretraining
    text is the usual guard (InstructGPT's "PPO-ptx" adds the pretraining loss for the same reason)."""
    from common.data import get_batch

    gen = torch.Generator().manual_seed(seed + 1)

    def next_batch():
        idx, targets, positions, doc = batch_fn()
        x, y = get_batch(data, rows, block_size, device=device, generator=gen)  # (rows, T) each
        pos = torch.arange(block_size, device=device).expand(rows, -1)
        return (torch.cat([idx, x]), torch.cat([targets, y]), torch.cat([positions, pos]),
                torch.cat([doc, torch.zeros_like(x)]))  # fmt: skip

    return next_batch


def sft(model: GPT, tok, conversations: list[list[dict]], tc: TrainConfig, template: str | None = None,
        replay=None, replay_rows: int = 0) -> dict:  # fmt: skip
    """Fine-tune ``model`` in place on ``conversations`` through ch01's ``train`` (assistant-only loss, packed rows);
    ``replay_rows`` > 0 adds that many rows of the pretraining tokens ``replay`` to every batch (``replay_batches``).
    Returns train's result (``model``, ``train_losses`` per step, ...)."""
    docs = [encode_conversation(tok, c, template) for c in conversations]
    packed = pack(docs, model.config.block_size)
    device = next(model.parameters()).device
    batch_fn = sft_batches(packed, tc.batch_size, seed=tc.seed, device=device)
    if replay_rows:
        batch_fn = replay_batches(batch_fn, replay, replay_rows, model.config.block_size, tc.seed, device)
    tc.eval_iters = 0  # the loop's evaluation reads a token stream; we evaluate with the task checkers instead
    return train(model, tc, None, None, loss_fn=masked_loss, batch_fn=batch_fn, tokenizer=None)


def main(argv=None) -> dict:
    from ch01.pretrained import pretrained_char_model
    from ch03.tasks import alphabet, make_suite
    from common.cli import base_parser

    p = base_parser(__doc__, device=True, seed=True)
    p.add_argument("--n-train", type=int, default=300, help="training conversations per task")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=6, help="rows of 192 tokens (several conversations each)")
    args = p.parse_args(argv)
    base, char_tok, _ = pretrained_char_model("small", max_iters=2000, device="cpu")
    tok = ChatTokenizer(char_tok, extra_chars=alphabet())
    model = extend_model(base, tok.vocab_size, block_size=192)  # cloze prompts reach ~165 tokens
    train_set, _ = make_suite(args.n_train, 1, seed=args.seed)
    tc = TrainConfig(
        max_iters=args.iters,
        batch_size=args.batch_size,
        lr=1e-3,
        warmup_iters=args.iters // 10,
        seed=args.seed,
        device=args.device,
        out_dir=None,
    )
    res = sft(model, tok, [e.messages() for e in train_set], tc)
    losses = res["train_losses"]
    tail = losses[-10:]
    print(f"assistant-only loss: first step {losses[0]:.3f}, last {len(tail)} steps {sum(tail) / len(tail):.3f}")
    return res


if __name__ == "__main__":
    main()
