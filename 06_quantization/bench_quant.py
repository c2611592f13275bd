"""One table for every method in the chapter: bits, size, val loss and tokens/s — fp32, int8, int4/int3 RTN vs GPTQ,
GGUF Q8_0/Q4_0 (and llama.cpp speed where llama-cpp-python is installed), bitsandbytes int8/NF4, pruned models.

    python 06_quantization/bench_quant.py                     # small model (~2-4 min on 2 CPU cores)
    python 06_quantization/bench_quant.py --preset tiny --iters 200 --skip-bnb

Val loss is ch01's deterministic ``val_loss`` (20 × 32 windows of 64 chars of the held-out split). tokens/s is the
forward throughput of a (8, 64) batch through the same torch code path (dequantize-on-the-fly for our QuantLinear, so
it measures overhead, not the speed a fused kernel would give); llama.cpp tok/s is prompt processing of 64 tokens
with 2 threads. Writes assets/quant_tradeoff.png.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ch01.evaluate import evaluate_loss
from ch06.gguf_export import export_gguf, gguf_roundtrip_model, llama_cpp_logits, load_llama_cpp
from ch06.gptq import calibration_windows
from ch06.prune import prune_model, sparsity_of
from ch06.quantize import model_size_bytes, pretrained, quantize_model, script_parser
from common.bench import hardware_info, markdown_table, timeit
from common.plot import assets_dir, save_fig
from common.seed import seed_everything


@torch.no_grad()
def torch_tokens_per_s(model, vocab: int, T: int, B: int = 8) -> float:
    idx = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0))
    t = timeit(lambda: model(idx), warmup=2, repeats=10, min_time=1.0)
    return B * T / t.median


def llama_cpp_tokens_per_s(path: Path, ids: list[int], n_ctx: int) -> float | None:
    llm = load_llama_cpp(path, n_ctx, n_threads=2)
    if llm is None:
        return None
    t = timeit(lambda: llama_cpp_logits(llm, ids), warmup=2, repeats=10, min_time=1.0)
    return len(ids) / t.median


def plot(rows, path):
    """Horizontal bars: val-loss increase per method, annotated with the stored size."""
    import matplotlib.pyplot as plt

    rows = sorted(rows[1:], key=lambda r: r["delta_%"])
    fig, ax = plt.subplots(figsize=(8, 0.38 * len(rows) + 1.2))
    colors = ["tab:red" if "%" in r["method"] else "tab:blue" for r in rows]
    ax.barh([r["method"] for r in rows], [max(r["delta_%"], 0.0) for r in rows], color=colors)
    for i, r in enumerate(rows):
        ax.annotate(
            f"{r['delta_%']:+.2f} %, {r['MB']:.2f} MB",
            (max(r["delta_%"], 0.0), i),
            xytext=(4, -3),
            textcoords="offset points",
            fontsize=8,
        )
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("val loss increase over fp32 (%, symlog axis) — label: increase, stored size")
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Quantization (blue) and pruning (red) on the char-level mini-GPT")
    return save_fig(fig, path)


def main(argv=None):
    p = script_parser(__doc__, seed=True)
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--skip-bnb", action="store_true", help="leave out the bitsandbytes rows")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    seed_everything(args.seed)
    model, tok, (train_ids, val_ids) = pretrained(args)
    cfg = model.config
    calib = calibration_windows(train_ids, args.n_calib, cfg.block_size, args.seed)
    base = evaluate_loss(model, val_ids)
    rows = []

    def add(method, bits, mb, m, extra=None):
        loss = base if m is model else evaluate_loss(m, val_ids)
        rows.append(
            {
                "method": method,
                "bits": bits,
                "MB": mb,
                "val_loss": loss,
                "delta_%": 100 * (loss / base - 1),
                "tok/s": torch_tokens_per_s(m, cfg.vocab_size, cfg.block_size),
                **(extra or {}),
            }
        )

    add("fp32", 32, model_size_bytes(model) / 1e6, model)
    add("int8 RTN (per-row)", 8, *_q(model, "rtn", 8, None))
    for bits, gs in ((4, 128), (4, 32), (3, 32)):
        add(f"int{bits} RTN g{gs}", bits, *_q(model, "rtn", bits, gs))
        add(f"int{bits} GPTQ g{gs}", bits, *_q(model, "gptq", bits, gs, calib_ids=calib))
    ids = tok.encode(tok.decode(val_ids[: cfg.block_size].tolist()))
    with tempfile.TemporaryDirectory() as tmp:
        for qt in ("f16", "q8_0", "q4_0"):
            path = export_gguf(model, tok, Path(tmp) / f"{qt}.gguf", qt)
            bits = {"f16": 16, "q8_0": 8.5, "q4_0": 4.5}[qt]
            add(
                f"GGUF {qt.upper()}",
                bits,
                path.stat().st_size / 1e6,
                gguf_roundtrip_model(model, qt),
                {"llama.cpp tok/s": llama_cpp_tokens_per_s(path, ids, cfg.block_size) or "-"},
            )
    if not args.skip_bnb:
        try:
            from ch06.bnb import HFCausalLM, load_bnb

            for mode in ("int8", "nf4"):
                hf = load_bnb(model, mode)
                add(
                    f"bitsandbytes {mode}",
                    8 if mode == "int8" else 4,
                    hf.get_memory_footprint() / 1e6,
                    HFCausalLM(hf, cfg),
                )
        except (ImportError, SystemExit) as e:
            print(f"skipping bitsandbytes rows: {e}")
    for method, pattern, s in (
        ("magnitude", "unstructured", 0.5),
        ("wanda", "unstructured", 0.5),
        ("wanda", "2:4", 0.5),
    ):
        pm = prune_model(model, method, s, pattern, calib_ids=calib)
        add(f"{method} {pattern} {sparsity_of(pm):.0%}", 32, model_size_bytes(pm) / 1e6, pm)
    print(f"\n{args.preset} model, {cfg.n_layer} layers × {cfg.n_embd} dims; {hardware_info()}\n")
    for r in rows:
        r.setdefault("llama.cpp tok/s", "-")
    print(markdown_table(rows, floatfmt=".4g"))
    if not args.no_plot:
        print("plot:", plot(rows, assets_dir(__file__) / "quant_tradeoff.png"))
    return rows


def _q(model, method, bits, gs, **kw):
    q = quantize_model(model, method, bits, gs, **kw)
    return model_size_bytes(q) / 1e6, q


if __name__ == "__main__":
    main()
