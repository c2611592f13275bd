"""What every strategy in this chapter is compared against: the ch01 tiny mini-GPT trained in ONE process on the
whole (global) batch, plus the deterministic data order all of them share.

The token stream is cut into non-overlapping windows of ``block_size + 1`` tokens (:class:`TokenWindows`). One epoch
visits them in the order ``torch.randperm(n, generator=seed + epoch)`` — exactly the order
``torch.utils.data.DistributedSampler`` uses — and step ``s`` takes the global batch ``perm[s*GB:(s+1)*GB]``.
With W ranks, ``DistributedSampler`` hands rank ``r`` the rows ``global_batch[r::W]`` (:func:`rank_rows`), so the
ranks' mini-batches together are exactly the single process's batch. Because the loss is a mean over equally many
tokens per rank, averaging the ranks' gradients gives the single-process gradient (up to float rounding).

    python 02_distributed_training/reference.py      # a few single-process steps: the numbers the others must match
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ch01.char_tokenizer import CharTokenizer
from ch01.model import GPT, GPTConfig
from common.bench import markdown_table
from common.cli import base_parser
from common.data import load_shakespeare, train_val_split

_TOKENS: dict[str, torch.Tensor] = {}


def train_tokens() -> torch.Tensor:
    """Char-level tiny-shakespeare training ids (int64), encoded once per process."""
    if "train" not in _TOKENS:  # = ch01.train.prepare_data("char")[1], without importing the trainer (and
        text = load_shakespeare()  # matplotlib) into every spawned rank
        ids = torch.from_numpy(CharTokenizer.from_text(text).encode_array(text).astype("int64"))
        _TOKENS["train"] = train_val_split(ids)[0]
    return _TOKENS["train"]


def tiny_config(**overrides) -> GPTConfig:
    return GPTConfig.preset("tiny", vocab_size=65, **overrides)  # 65 = tiny-shakespeare's character set


def make_model(cfg: GPTConfig, seed: int = 0) -> GPT:
    """Same seed -> same initial weights in every process (the DDP scripts still broadcast rank 0's, as they must)."""
    torch.manual_seed(seed)
    return GPT(cfg)


class TokenWindows(Dataset):
    """Item i = (x, y) with x = ids[i*T : i*T+T], y shifted by one: non-overlapping next-token windows."""

    def __init__(self, ids: torch.Tensor, block_size: int):
        if len(ids) <= block_size:
            raise ValueError(f"need more than block_size={block_size} tokens, got {len(ids)}")
        self.ids, self.T = ids, block_size
        self.n = (len(ids) - 1) // block_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        w = self.ids[i * self.T : i * self.T + self.T + 1]  # (T+1,)
        return w[:-1], w[1:]


def epoch_order(n: int, seed: int, epoch: int = 0) -> torch.Tensor:
    """The permutation DistributedSampler(shuffle=True, seed=seed) uses in ``epoch``."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n, generator=g)


def global_batch(data: TokenWindows, step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch of optimizer step ``step`` (one epoch is plenty for these short runs)."""
    order = epoch_order(len(data), seed)
    idx = order[step * batch_size : (step + 1) * batch_size].tolist()
    xs, ys = zip(*(data[i] for i in idx))
    return torch.stack(xs), torch.stack(ys)  # (B, T), (B, T)


def rank_rows(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s share of a global batch, laid out as DistributedSampler lays it out (interleaved)."""
    if batch.shape[0] % world:
        raise ValueError(f"global batch {batch.shape[0]} is not divisible by {world} ranks")
    return batch[rank::world]


def train_single(
    cfg: GPTConfig, steps: int, batch_size: int, lr: float = 1e-3, seed: int = 0, data_seed: int = 1234
) -> dict:
    """Plain one-process AdamW training on the global batches: losses, first-step grads and final weights."""
    model = make_model(cfg, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    data = TokenWindows(train_tokens(), cfg.block_size)
    losses, first_grads = [], {}
    for step in range(steps):
        x, y = global_batch(data, step, batch_size, data_seed)
        loss = model.loss(x, y)
        loss.backward()
        if step == 0:
            first_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {
        "losses": losses,
        "grads": first_grads,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest elementwise |a - b| over tensors with the same names (raises if the names differ)."""
    if set(a) != set(b):
        raise KeyError(f"different tensor names: {sorted(set(a) ^ set(b))[:5]}")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def main(argv=None) -> dict:
    p = base_parser(__doc__, seed=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    res = train_single(tiny_config(), args.steps, args.batch_size, seed=args.seed)
    print(markdown_table([{"step": i, "loss": v} for i, v in enumerate(res["losses"])], floatfmt=".6f"))
    return res


if __name__ == "__main__":
    main()
