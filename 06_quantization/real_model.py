"""The chapter's quantizers on a real model: SmolLM2-135M-Instruct (30 layers × 576, GQA 9/3 heads, 135 M weights),
read from its GGUF file, requantized with our Q8_0 / Q4_0 (gguf_export.py), RTN int4/int3 (quantize.py), GPTQ int4/int3
(gptq.py) and 2:4-pruned (prune.py); scored by held-out bits per byte, plus the first token of a one-fact answer.

    python 06_quantization/real_model.py --threads 1            # ~4-6 min on 2 (busy) CPU cores
    python 06_quantization/real_model.py --eval-chars 40000 --n-calib 64 --calib-len 512   # tighter numbers
    python 06_quantization/real_model.py --methods f32 q8_0 rtn3 gptq3

Bits per byte (bpb) = total next-token NLL in nats / ln 2 / UTF-8 bytes of the text (``ch01.evaluate.bits_per_byte``):
unlike loss per token it does not depend on the tokenizer. Texts the model did not train on: the last 10 % of the
bundled tiny-shakespeare (``--eval-chars`` of it) and the prose paragraphs of this repository's README. GPTQ and Wanda
calibrate on random windows of the Shakespeare *training* split. The reference is the float32 model our loader
dequantizes from the shipped file, whose linear layers are themselves Q4_1 — every method here re-quantizes those.

GPTQ (gptq.py) and Wanda (prune.py) calibrate "true sequentially"; on a 30-layer model re-running the whole network
for each of the 120 layer groups would take an hour on a CPU, so ``blockwise`` feeds them one transformer block at a
time (``OneBlock``: the block as a one-layer model whose inputs are the hidden states leaving the already quantized
blocks before it), as the GPTQ reference code does. References: Frantar et al. 2022 (GPTQ); Sun et al. 2023 (Wanda);
Allal et al. 2025 (SmolLM2).
"""

from __future__ import annotations

import copy
import time
from types import SimpleNamespace

import torch
import torch.nn as nn

from ch01.functional import rope_cache
from ch01.model import attention_mask
from ch06.gguf_export import QK, gguf_roundtrip_model, q8_0_activations, tensor_qtype
from ch06.gptq import calibration_windows, gptq_quantize_model
from ch06.prune import prune_model
from ch06.quantize import QuantLinear, model_size_bytes, quantize_model, set_module

QUESTION = "What is the capital of France?"


# ------------------------------------------------------------------------------ block-by-block calibration driver


class OneBlock(nn.Module):
    """Transformer block ``i`` of ``model`` as a one-layer model mapping hidden states (B, T, C) -> (B, T, C): what
    ``gptq_quantize_model`` / ``prune_model`` see when they run "the model" on calibration inputs."""

    def __init__(self, model: nn.Module, i: int):
        super().__init__()
        cfg = model.config
        self.config = SimpleNamespace(n_layer=1, tie_weights=False)  # all gptq/prune read of a config
        self.head_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta
        self.blocks = nn.ModuleList([model.blocks[i]])  # shared, not copied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        pos = torch.arange(T, device=x.device)
        rope_cs = rope_cache(self.head_dim, pos, self.rope_theta)  # 2 × (T, D), as GPT.forward builds them
        return self.blocks[0](x, rope_cs, None, None, attention_mask(pos, T, None, None))  # (B, T, C)


@torch.no_grad()
def blockwise(model: nn.Module, calib_ids: torch.Tensor, transform, batch_size: int = 8) -> nn.Module:
    """A copy of ``model`` with ``transform(OneBlock, hidden (N, T, C)) -> OneBlock`` applied to every block in order;
    block i is calibrated on the outputs of the already transformed blocks 0..i-1 (on the CPU)."""
    out = copy.deepcopy(model).cpu().eval()
    x = out.tok_emb(calib_ids.cpu())  # (N, T, C): dropout is off in eval mode
    for i in range(len(out.blocks)):
        new = transform(OneBlock(out, i), x)
        out.blocks[i] = new.blocks[0]
        x = torch.cat([new(x[b : b + batch_size]) for b in range(0, len(x), batch_size)])  # (N, T, C)
    return out


def gptq_blockwise(model, calib_ids, bits: int, group_size: int | None, batch_size: int = 8):
    """``gptq.gptq_quantize_model`` block by block: the same result, one block forward per layer group."""
    gptq = lambda blk, x: gptq_quantize_model(blk, x, bits, group_size, batch_size=batch_size)
    return blockwise(model, calib_ids, gptq, batch_size)


def wanda_2_4_blockwise(model, calib_ids, batch_size: int = 8):
    """``prune.prune_model(..., "wanda", 0.5, "2:4")`` block by block."""
    wanda = lambda blk, x: prune_model(blk, "wanda", 0.5, "2:4", calib_ids=x, batch_size=batch_size)
    return blockwise(model, calib_ids, wanda, batch_size)


# ------------------------------------------------------------------------------------------------ the variants


GGUF_BLOCK_BYTES = {"f32": 4 * QK, "f16": 2 * QK, "q8_0": 34, "q4_0": 18}  # bytes per 32 weights


def gguf_size_bytes(model: nn.Module, qtype: str, names=None) -> int:
    """Bytes of ``model``'s weights (only ``names`` if given) stored as ``export_gguf(..., qtype)`` would: norms F32,
    other tensors ``qtype``, tied weights once."""
    seen, total = set(), 0
    for name, w in model.state_dict().items():
        if w.data_ptr() not in seen and (names is None or name in names):
            seen.add(w.data_ptr())
            total += w.numel() * GGUF_BLOCK_BYTES[tensor_qtype(name, w, qtype)] // QK
    return total


def storage(m: nn.Module, key: str) -> tuple[int, float]:
    """(bytes of the whole model as stored, bits per weight of the blocks' linear layers alone)."""
    linears = {
        n: x for n, x in m.named_modules() if n.startswith("blocks.") and isinstance(x, (nn.Linear, QuantLinear))
    }
    n_weights = sum(lin.in_features * lin.out_features for lin in linears.values())
    if key in GGUF_BLOCK_BYTES:
        names = {f"{name}.weight" for name in linears}
        return gguf_size_bytes(m, key), 8 * gguf_size_bytes(m, key, names) / n_weights
    return model_size_bytes(m), 8 * sum(model_size_bytes(lin) for lin in linears.values()) / n_weights


def with_q8_activations(model: nn.Module) -> nn.Module:
    """A copy whose every linear layer first rounds its input to Q8_0 blocks — what llama.cpp's CPU kernels do with the
    shipped file: Q4_1 weights multiply Q8_1 activations (same d and codes as Q8_0, plus a sum), Q8_0 ones Q8_0."""
    out = copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_pre_hook(q8_0_activations)
    return out


# name -> (label, builder(model, ctx)); ctx: calib_ids, group_size
METHODS = {
    "f32": ("F32 (dequantized file)", lambda m, c: m),
    "act8": ("F32 + Q8 activations (≈ llama.cpp)", lambda m, c: with_q8_activations(m)),
    "q8_0": ("GGUF Q8_0 (ours)", lambda m, c: gguf_roundtrip_model(m, "q8_0")),
    "q4_0": ("GGUF Q4_0 (ours)", lambda m, c: gguf_roundtrip_model(m, "q4_0")),
    "rtn4": ("RTN int4 g{g}", lambda m, c: quantize_model(m, "rtn", 4, c.group_size)),
    "gptq4": ("GPTQ int4 g{g}", lambda m, c: gptq_blockwise(m, c.calib_ids, 4, c.group_size)),
    "rtn3": ("RTN int3 g{g}", lambda m, c: quantize_model(m, "rtn", 3, c.group_size)),
    "gptq3": ("GPTQ int3 g{g}", lambda m, c: gptq_blockwise(m, c.calib_ids, 3, c.group_size)),
    "2:4": ("2:4 magnitude", lambda m, c: prune_model(m, "magnitude", 0.5, "2:4")),
    "2:4-wanda": ("2:4 Wanda", lambda m, c: wanda_2_4_blockwise(m, c.calib_ids)),
}
NEEDS_CALIBRATION = {"gptq4", "gptq3", "2:4-wanda"}


@torch.no_grad()
def materialize(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear by an nn.Linear holding its dequantized weight, in place: the same outputs (QuantLinear
    computes F.linear(x, dequantized weight)) without unpacking the codes again at every decoding step."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=False, device=m.scale.device)
            lin.weight.copy_(m.dequantized_weight())
            set_module(model, name, lin)
    return model


@torch.no_grad()
def first_token_and_answer(model, tok, prompt_ids: list[int], max_new: int) -> dict:
    """Top-2 first tokens (with logits) of the reply to ``prompt_ids`` and the greedy reply itself."""
    from ch01.generate import generate

    device = next(model.parameters()).device
    logits = model(torch.tensor([prompt_ids], device=device))[0, -1].float()  # (V,)
    top = logits.topk(2)
    (l1, l2), (t1, t2) = top.values.tolist(), top.indices.tolist()
    eos = getattr(tok, "eos_id", None)
    reply = generate(model, [prompt_ids], max_new, temperature=0.0, stop_ids=[eos] if eos is not None else [])[0]
    reply = [t for t in reply if t != eos]
    return {"1st": tok.decode([t1]), "logit_1": l1, "2nd": tok.decode([t2]), "logit_2": l2, "margin": l1 - l2,
            "greedy reply": tok.decode(reply).strip()}  # fmt: skip


def readme_prose(min_chars: int = 200) -> str:
    """The prose paragraphs (>= ``min_chars``; no headings, code, tables or lists) of the repository README, joined."""
    from common.plot import REPO_ROOT

    paras = [p.strip() for p in (REPO_ROOT / "README.md").read_text(encoding="utf-8").split("\n\n")]
    prose = [p for p in paras if len(p) >= min_chars and not p.startswith(("#", "```", "|", "-"))]
    if not prose:
        raise ValueError("no prose paragraph found in README.md")
    return "\n\n".join(prose)


def held_out_texts(n_chars: int) -> dict[str, str]:
    """Texts SmolLM2 did not train on: the start of Shakespeare's validation split, this repository's README prose."""
    from common.data import load_shakespeare, train_val_split

    return {"shakespeare": train_val_split(load_shakespeare())[1][:n_chars], "readme": readme_prose()[:n_chars]}


def calibration_ids(model, tok, n: int, length: int, seed: int, source: str = "shakespeare") -> torch.Tensor:
    """(n, length) calibration tokens for GPTQ and Wanda: random windows of Shakespeare's training split, or text the
    model samples itself from <|endoftext|> ("generated": data-free calibration that covers what the model knows)."""
    if source == "generated":
        from ch01.generate import generate

        start = [tok.special_ids.get("<|endoftext|>", 0)]
        g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        rows = generate(model, [start] * n, length - 1, temperature=1.0, generator=g)  # no stop ids: full length
        return torch.tensor([start + r for r in rows], dtype=torch.long)
    from common.data import load_shakespeare, train_val_split

    train = train_val_split(load_shakespeare())[0][: max(200_000, 8 * n * length)]  # ~3 chars per token
    return calibration_windows(torch.tensor(tok.encode(train), dtype=torch.long), n, length, seed)


def measure(key, model, tok, ctx, held_out, prompt_ids, args, device) -> dict:
    from ch01.evaluate import bits_per_byte

    label, build = METHODS[key]
    t0 = time.perf_counter()
    m = build(model, ctx).eval()  # built from the CPU model (our GGUF quantizers return numpy bytes)
    seconds = time.perf_counter() - t0
    n_bytes, linear_bits = storage(m, key)
    row = {"method": label.format(g=args.group_size or "row"), "key": key, "MB": n_bytes / 1e6}
    row["bits/weight"] = 8 * n_bytes / sum(p.numel() for p in model.parameters())
    row["linears b/w"] = linear_bits
    m = materialize(m).to(device)
    for name, text in held_out.items():
        row[f"bpb {name}"] = bits_per_byte(m, tok, text, block_size=args.block_size)
    row["quantize s"] = seconds
    row.update(first_token_and_answer(m, tok, prompt_ids, args.max_new))
    model.cpu()  # the F32 row moved the reference itself
    return row


# -------------------------------------------------------------------------------------------------- the script


def plot(rows, path):
    """Bits-per-byte increase over F32 per method, both held-out texts."""
    import matplotlib.pyplot as plt

    from common.plot import save_fig

    rows = [r for r in rows if r["key"] != "f32"]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.5))
    ys = torch.arange(len(rows), dtype=torch.float32)
    for k, (col, color) in enumerate((("Δ% shakespeare", "tab:blue"), ("Δ% readme", "tab:orange"))):
        vals = [r.get(col, 0.0) for r in rows]
        ax.barh(ys + 0.4 * k - 0.2, vals, height=0.4, color=color, label=col.replace("Δ% ", ""))
    ax.set_yticks(ys.tolist(), [f"{r['method']} ({r['linears b/w']:.2f} b/w)" for r in rows])
    ax.set_xscale("symlog", linthresh=1.0)
    lowest = min(min(r["Δ% shakespeare"], r["Δ% readme"]) for r in rows)
    ax.set_xlim(left=min(-0.2, 1.5 * lowest))
    ax.set_xlabel("bits-per-byte increase over F32 (%, symlog axis)")
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    ax.legend()
    ax.set_title("SmolLM2-135M: held-out bits per byte (b/w: bits per linear-layer weight)", fontsize=10)
    return save_fig(fig, path)


def print_tables(rows, hw: str, extra: str) -> None:
    from common.bench import markdown_table

    cols = [
        "method",
        "linears b/w",
        "bits/weight",
        "MB",
        "bpb shakespeare",
        "Δ% shakespeare",
        "bpb readme",
        "Δ% readme",
        "quantize s",
    ]
    print(f"\n{hw}\n{extra}\n")
    print(markdown_table(rows, cols, floatfmt=".4g", formats={"Δ% shakespeare": "+.2f", "Δ% readme": "+.2f"}))
    print(f"\nFirst token of the reply to {QUESTION!r} (ChatML template), top-2 logits, and the greedy reply:\n")
    cols = ["method", "1st", "logit_1", "2nd", "logit_2", "margin", "greedy reply"]
    print(markdown_table(rows, cols, floatfmt=".3f"))


def parse_args(argv):
    from common.cli import base_parser

    p = base_parser(__doc__, device=True, seed=True)
    p.add_argument("--model", default="smollm2-135m-instruct", help="a load_pretrained name or a llama .gguf path")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--eval-chars", type=int, default=6000, help="characters of each held-out text (at most)")
    p.add_argument("--block-size", type=int, default=1024, help="evaluation window in tokens")
    p.add_argument("--group-size", type=int, default=128, help="RTN/GPTQ group size (0 = one group per row)")
    p.add_argument("--n-calib", type=int, default=8, help="GPTQ/Wanda calibration windows (training split)")
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--calib", default="shakespeare", choices=["shakespeare", "generated"], help="calibration text")
    p.add_argument("--max-new", type=int, default=12, help="tokens of the greedy reply")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def main(argv=None, loaded=None):
    """Returns one row per method. ``loaded``: an already loaded (model, tokenizer) to use instead of ``--model``."""
    from ch01.pretrained import load_pretrained
    from common.bench import hardware_info
    from common.device import pick_device
    from common.plot import assets_dir
    from common.seed import seed_everything

    args = parse_args(argv)
    args.group_size = args.group_size or None
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model, tok = loaded or load_pretrained(args.model)
    model = model.cpu().eval()  # variants are built on the CPU, then evaluated on ``device``
    held_out = held_out_texts(args.eval_chars)
    calib = None
    if NEEDS_CALIBRATION & set(args.methods):
        calib = calibration_ids(model, tok, args.n_calib, args.calib_len, args.seed, args.calib)
    ctx = SimpleNamespace(calib_ids=calib, group_size=args.group_size)
    prompt_ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}])
    keys = ["f32"] + [k for k in args.methods if k != "f32"]  # the reference first, always
    rows = [measure(k, model, tok, ctx, held_out, prompt_ids, args, device) for k in keys]
    for r in rows:
        for name in held_out:
            r[f"Δ% {name}"] = 100 * (r[f"bpb {name}"] / rows[0][f"bpb {name}"] - 1)
    n_tok = {k: len(tok.encode(v)) for k, v in held_out.items()}
    extra = (
        f"held out: Shakespeare val {len(held_out['shakespeare'])} chars = {n_tok['shakespeare']} tokens, README "
        f"prose {len(held_out['readme'])} chars = {n_tok['readme']} tokens; calibration: "
        + (f"{calib.shape[0]} windows × {calib.shape[1]} tokens ({args.calib})" if calib is not None else "-")
    )
    print_tables(rows, hardware_info(device), extra)
    if not args.no_plot and len(rows) > 1:
        print("plot:", plot(rows, assets_dir(__file__) / "real_model_bpb.png"))
    return rows


if __name__ == "__main__":
    main()
