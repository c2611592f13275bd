"""How much memory each device needs under each parallelism strategy — the back-of-the-envelope formulas of the ZeRO
paper (model states) and of Korthikanti et al. (activations), as a table.

    python 02_distributed_training/memory_calculator.py                          # the tiny model, 2 devices
    python 02_distributed_training/memory_calculator.py --params 7e9 --layers 32 --hidden 4096 --heads 32 \
        --world 8 --batch 1 --seq 4096 --precision mixed                          # a 7B model on one 8-GPU node

Model states, Ψ parameters, N devices (Rajbhandari et al. 2020, §3 and §5):
    bytes per parameter: fp32 training   P=4 (weights) G=4 (grads) O=8 (Adam m, v)
                         mixed precision P=2 (bf16)   G=2          O=12 (fp32 master copy, m, v)  -> "16Ψ"
    DDP      (P+G+O)·Ψ                 ZeRO-1 (optimizer sharded)        (P+G)·Ψ + O·Ψ/N
    ZeRO-2   P·Ψ + (G+O)·Ψ/N           ZeRO-3 / FSDP (everything sharded) (P+G+O)·Ψ/N
    TP (t)   (P+G+O)·(Ψ_matrices/t + Ψ_replicated)     PP (p)   (P+G+O)·Ψ_stage
Activations per layer, 16-bit, no recomputation (Korthikanti et al. 2022, eq. 1-2): s·b·h·(34 + 5·a·s/h) bytes;
with flash attention the s² term (5·a·s/h) disappears; with TP degree t: s·b·h·(10 + 24/t + 5·a·s/(h·t));
with full activation checkpointing only each layer's input survives: 2·s·b·h per layer (+ one layer recomputed).
GPipe keeps m micro-batches of activations in flight per stage, 1F1B at most p.
These are estimates for a GPT-style block (4h MLP); the exact numbers for *model states* of our tiny runs are
cross-checked against the per-rank bytes measured in fsdp.py and tensor_parallel.py (see tests/test_02_*.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ch01.model import GPT, GPTConfig
from common.bench import markdown_table
from common.cli import base_parser

BYTES = {"fp32": {"P": 4, "G": 4, "O": 8}, "mixed": {"P": 2, "G": 2, "O": 12}}


def model_state_bytes(
    strategy: str,
    n_params: float,
    world: int,
    precision: str = "fp32",
    n_tp_sharded: float | None = None,
    n_stage: float | None = None,
) -> dict[str, float]:
    """Per-device bytes of parameters / gradients / optimizer state under ``strategy``."""
    if precision not in BYTES:
        raise ValueError(f"precision must be one of {list(BYTES)}, got {precision!r}")
    b, n, w = BYTES[precision], n_params, world
    if strategy == "ddp":
        per = {"params": n, "grads": n, "optimizer": n}
    elif strategy == "zero1":
        per = {"params": n, "grads": n, "optimizer": n / w}
    elif strategy == "zero2":
        per = {"params": n, "grads": n / w, "optimizer": n / w}
    elif strategy in ("zero3", "fsdp"):
        per = {"params": n / w, "grads": n / w, "optimizer": n / w}
    elif strategy == "tp":
        if n_tp_sharded is None:
            raise ValueError("tp needs n_tp_sharded (parameters in the split matrices)")
        local = n_tp_sharded / w + (n - n_tp_sharded)
        per = {"params": local, "grads": local, "optimizer": local}
    elif strategy == "pp":
        if n_stage is None:
            raise ValueError("pp needs n_stage (parameters of the largest stage)")
        per = {"params": n_stage, "grads": n_stage, "optimizer": n_stage}
    else:
        raise ValueError(f"unknown strategy {strategy!r}; choose ddp, zero1, zero2, zero3, tp, pp")
    return {"params": per["params"] * b["P"], "grads": per["grads"] * b["G"], "optimizer": per["optimizer"] * b["O"]}


def activation_bytes(
    layers: int,
    hidden: int,
    heads: int,
    batch: int,
    seq: int,
    tp: int = 1,
    flash: bool = False,
    checkpointing: bool = False,
    in_flight: int = 1,
) -> float:
    """Activation memory of ``layers`` layers (16-bit), per device; ``in_flight`` micro-batches (pipeline)."""
    sbh = seq * batch * hidden
    attn_sq = 0 if flash else 5 * heads * seq / (hidden * tp)
    one_layer = sbh * (10 + 24 / tp + attn_sq)  # tp=1: the paper's 34 + 5as/h
    if checkpointing:  # layer inputs kept for every micro-batch in flight, one layer rebuilt at a time
        return 2 * sbh * layers * in_flight + one_layer
    return layers * one_layer * in_flight


@dataclass
class GPTCounts:
    total: int  # all parameters
    tp_sharded: int  # in attention / MLP matrices (what Megatron TP splits)
    stages: list[int]  # parameters per pipeline stage (even split of the blocks)


def gpt_counts(cfg: GPTConfig, pp: int = 2) -> GPTCounts:
    """Exact parameter counts of the ch01 GPT for the formulas above (builds the model on the meta device)."""
    import torch

    with torch.device("meta"):
        model = GPT(cfg)
    total = model.num_params()
    sharded = sum(
        p.numel() for n, p in model.named_parameters() if n.startswith("blocks.") and (".attn.w" in n or ".mlp.w" in n)
    )
    per = cfg.n_layer // pp
    block = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    stages = [sum(block[i * per : (i + 1) * per]) for i in range(pp)]
    stages[0] += model.tok_emb.weight.numel()
    stages[-1] += sum(p.numel() for p in model.norm.parameters()) + model.lm_head.weight.numel()
    return GPTCounts(total, sharded, stages)


def table(n_params: float, world: int, precision: str, n_tp_sharded: float, n_stage: float, act: dict) -> list[dict]:
    rows = []
    for strat, label in [
        ("ddp", "DDP"),
        ("zero1", "ZeRO-1"),
        ("zero2", "ZeRO-2"),
        ("zero3", "ZeRO-3 / FSDP"),
        ("tp", f"TP={world}"),
        ("pp", f"PP={world}"),
    ]:
        m = model_state_bytes(strat, n_params, world, precision, n_tp_sharded, n_stage)
        a = act["tp"] if strat == "tp" else act["pp"] if strat == "pp" else act["dp"]
        rows.append(
            {
                "strategy": label,
                **{k: _fmt(v) for k, v in m.items()},
                "activations": _fmt(a),
                "activations (ckpt)": _fmt(act["ckpt_" + ("tp" if strat == "tp" else "pp" if strat == "pp" else "dp")]),
                "total": _fmt(sum(m.values()) + a),
            }
        )
    return rows


def _fmt(b: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{b:.0f} B"


def main(argv=None) -> dict:
    p = base_parser(__doc__)
    p.add_argument("--preset", default="tiny", help="ch01 preset to count exactly (ignored with --params)")
    p.add_argument("--params", type=float, default=None, help="parameter count of a model to estimate instead")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--world", type=int, default=2, help="devices (DP size, or TP / PP degree)")
    p.add_argument("--batch", type=int, default=8, help="micro-batch per device")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--precision", default="fp32", choices=list(BYTES))
    p.add_argument("--flash", action="store_true", help="no s² attention scores stored")
    args = p.parse_args(argv)
    if args.params is not None:
        n, L, h, a = args.params, args.layers, args.hidden, args.heads
        sharded = 12 * L * h * h  # Megatron's count: 4h² attention + 8h² MLP per layer
        stage = n / args.world
        name = f"{n / 1e9:.1f}B-parameter model"
    else:
        cfg = GPTConfig.preset(args.preset, vocab_size=65)
        counts = gpt_counts(cfg, args.world) if cfg.n_layer % args.world == 0 else gpt_counts(cfg, 1)
        n, L, h, a = counts.total, cfg.n_layer, cfg.n_embd, cfg.n_head
        sharded, stage = counts.tp_sharded, max(counts.stages)
        name = f"ch01 {args.preset} ({n:,} parameters)"
    kw = dict(hidden=h, heads=a, batch=args.batch, seq=args.seq, flash=args.flash)
    act = {
        "dp": activation_bytes(L, **kw),
        "tp": activation_bytes(L, tp=args.world, **kw),
        "pp": activation_bytes(L // args.world, in_flight=args.world, **kw),  # 1F1B: ≤ p micro-batches in flight
        "ckpt_dp": activation_bytes(L, checkpointing=True, **kw),
        "ckpt_tp": activation_bytes(L, tp=args.world, checkpointing=True, **kw),
        "ckpt_pp": activation_bytes(L // args.world, in_flight=args.world, checkpointing=True, **kw),
    }
    rows = table(n, args.world, args.precision, sharded, stage, act)
    print(f"{name}, {args.world} devices, {args.precision}, micro-batch {args.batch} × {args.seq} tokens:")
    print(markdown_table(rows))
    return {"rows": rows, "n_params": n}


if __name__ == "__main__":
    main()
