"""onnxruntime vs torch eager on CPU for the same mini-GPT: a batch forward, a decode step, greedy generation.

    python 08_deployment/bench_onnx.py                        # small char model, batch 16 x 64 tokens
    python 08_deployment/bench_onnx.py --preset tiny --iters 200 --batch 32

Both run with the same number of intra-op threads. ORT applies graph optimizations (constant folding, fused
MatMul/SkipLayerNorm-style kernels, no Python dispatch per op), which matters most for small models where eager PyTorch
is dominated by per-op overhead. The int8 row uses ORT dynamic quantization (int8 weights, activations on the fly).
References: onnxruntime performance tuning (onnxruntime.ai/docs/performance), ONNX (onnx.ai).
"""

from __future__ import annotations

import numpy as np
import torch

from ch01.generate import generate
from ch08.export_onnx import (
    DecodeGraph,
    export_decode,
    export_full,
    graphs_dir,
    ort_decode,
    ort_greedy,
    ort_session,
    quantize_int8,
)
from common.bench import hardware_info, markdown_table, timeit
from common.cli import base_parser
from common.plot import assets_dir, bar_plot


def parse_args(argv=None):
    p = base_parser(__doc__.split("\n\n")[0], seed=True)
    p.add_argument("--preset", default="small")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16, help="sequences in the batch forward")
    p.add_argument("--past", type=int, default=32, help="cached positions before the timed decode step")
    p.add_argument("--new-tokens", type=int, default=24, help="greedy tokens for the generation row")
    p.add_argument("--repeats", type=int, default=20)
    return p.parse_args(argv)


def sessions(model, name: str, threads: int):
    """ORT sessions of the full graph, the decode graph and the int8 full graph (exported once per weights)."""
    out = graphs_dir(model, name)  # shared with export_onnx.py's default run
    full_path, dec_path, q_path = out / "model.onnx", out / "decode.onnx", out / "model.int8.onnx"
    if not full_path.exists():
        export_full(model, full_path)
    if not dec_path.exists():
        export_decode(model, dec_path)
    if not q_path.exists():
        quantize_int8(full_path, q_path)
    return tuple(ort_session(p, threads) for p in (full_path, dec_path, q_path))


def table_rows(timings: dict, tokens: dict) -> list[dict]:
    """{"<workload> <engine>": Timing} -> rows with medians, tokens/s and the speedup over torch on that workload."""
    rows = []
    for name, timing in timings.items():
        kind, engine = name.split(" ", 1)
        base = timings[f"{kind} torch"].median
        rows.append(
            {
                "workload": kind,
                "engine": engine,
                "median_ms": timing.median * 1e3,
                "p90_ms": timing.p90 * 1e3,
                "tokens_per_s": tokens[kind] / timing.median,
                "speedup_vs_torch": base / timing.median,
            }
        )
    return rows


def main(argv=None) -> dict:
    from ch01.pretrained import pretrained_char_model

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model, tok, _ = pretrained_char_model(args.preset, args.iters)
    model = model.float().eval()
    cfg, threads = model.config, torch.get_num_threads()
    full, dec, q = sessions(model, f"{args.preset}-{args.iters}", threads)
    graph = DecodeGraph(model).eval()

    x = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size))  # (B, T)
    B, P = args.batch, min(args.past, cfg.block_size - 1)
    step_ids = torch.randint(0, cfg.vocab_size, (B, 1))
    mask = torch.ones(B, P + 1, dtype=torch.long)
    past = [torch.randn(B, cfg.n_kv_head, P, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    past_np = [p.numpy() for p in past]
    prompt = torch.tensor([tok.encode("ROMEO:\n")])
    n_new = min(args.new_tokens, cfg.block_size - prompt.shape[1])

    def torch_greedy():  # ch01's cached decoding loop; ort_greedy runs the ORT graph through the same loop
        return generate(model, prompt, n_new, temperature=0.0)

    kw = dict(warmup=3, repeats=args.repeats)
    with torch.inference_mode():
        t = {
            "forward torch": timeit(lambda: model(x), **kw),
            "forward ORT fp32": timeit(lambda: full.run(None, {"input_ids": x.numpy()}), **kw),
            "forward ORT int8": timeit(lambda: q.run(None, {"input_ids": x.numpy()}), **kw),
            "decode torch": timeit(lambda: graph(step_ids, mask, *past), **kw),
            "decode ORT": timeit(lambda: ort_decode(dec, step_ids.numpy(), mask.numpy(), past_np), **kw),
            "greedy torch": timeit(torch_greedy, warmup=1, repeats=max(3, args.repeats // 4)),
            "greedy ORT": timeit(
                lambda: ort_greedy(dec, model, prompt, n_new), warmup=1, repeats=max(3, args.repeats // 4)
            ),
        }
        assert torch_greedy()[0] == ort_greedy(dec, model, prompt, n_new)[0, prompt.shape[1] :].tolist()
        diff = float(np.abs(full.run(None, {"input_ids": x.numpy()})[0] - model(x).numpy()).max())
    rows = table_rows(t, {"forward": args.batch * cfg.block_size, "decode": B, "greedy": n_new})
    print(
        f"{hardware_info()}; ORT threads {threads}; {args.preset} model; forward = {args.batch} x {cfg.block_size} "
        f"tokens; decode = 1 token x {B} sequences after {P} cached; greedy = {n_new} tokens, batch 1, "
        "ch01's decoding loop\n"
    )
    print(markdown_table(rows, floatfmt=".2f"))
    print(f"\nmax |logits ORT - torch| = {diff:.2e}")
    plot = bar_plot(
        {f"{r['workload']}\n{r['engine']}": r["speedup_vs_torch"] for r in rows},
        assets_dir(__file__) / "bench_onnx.png",
        title="onnxruntime speedup over torch eager (CPU)",
        ylabel="speedup (× torch eager, higher is better)",
    )
    return {"rows": rows, "max_diff": diff, "plot": str(plot)}


if __name__ == "__main__":
    main()
