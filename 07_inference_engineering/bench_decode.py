"""Decode speed side by side: no cache vs static KV cache vs the same with fused weights vs Hugging Face ``generate``
(same weights) vs speculative decoding (k = 2, 4, 6) vs MLX — greedy, one prompt, tokens/s.

    python 07_inference_engineering/bench_decode.py                      # 64-token prompt, 512 new tokens (minutes)
    python 07_inference_engineering/bench_decode.py --new-tokens 128 256 512 --threads 1

Every row decodes the same prompt greedily with the chapter's target model (6 layers × 256, block 640; trained and
cached on first use by ch07.models) and reports whether its tokens equal the static-cache output. The first three rows
are the same loop (``ch01.generate`` via ``ch07.kv_cache.generate``) with a different model or cache: ch01's model
re-run on the whole prefix (``Uncached``), ch01's model with its ``KVCache``, and ``FusedDecoder`` with it. Speculative rows run
both models through ``FusedDecoder`` and are compared with fused greedy decoding ("x fused greedy"): same engine, so the
ratio is what speculation itself buys. Timing is round-robin (every method once, then again, ``--repeats`` times) and
reports medians, so a load change on a shared machine hits all methods alike. The plot shows tokens/s against the
number of generated tokens: without a cache the per-token cost grows with the sequence.
``--llama-cpp`` instead compares our fused decoder with llama.cpp (llama-cpp-python) on the SAME GGUF files, batch 1,
greedy: F32, Q8_0 and Q4_0 files written by chapter 06's exporter, and SmolLM2's shipped Q4_1 file, at each
``--thread-counts`` (ours: ``FusedDecoder`` / ``FusedDecoder.from_gguf``, quantized blocks straight from the file):

    python 07_inference_engineering/bench_decode.py --llama-cpp                       # SmolLM2-135M + the char model
    python 07_inference_engineering/bench_decode.py --llama-cpp --llama-models char --llama-quants f32 q8_0

It reports decode tokens/s (tokens 2..n), the ratio to llama.cpp, MBU (weight bytes read per token x tokens/s /
the measured read bandwidth, as gpt-fast reports it) and whether the greedy tokens agree.
References: Pope et al. 2022; Leviathan et al. 2023; gpt-fast; MLX; llama.cpp (ggml-cpu quants).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from ch07.fused_decode import FusedDecoder, _timed
from ch07.kv_cache import generate
from ch07.models import decode_models
from ch07.speculative import speculative_generate
from common.bench import hardware_info, markdown_table, read_bandwidth_gbs
from common.cli import base_parser
from common.plot import assets_dir, line_plot

SHIPPED = "q4_1"  # SmolLM2's own GGUF (Q4_1 blocks, Q8_0 embedding): compared as shipped, not re-exported


def round_robin(fns: dict, repeats: int):
    """{name: (median seconds, last output)}: each repeat runs every fn once, in turn."""
    times, outs = {name: [] for name in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(times[name]), outs[name]) for name in fns}


def methods(target, draft, prompt, args):
    """name -> fn(n_new) returning (new ids (1, n) as a list, extra info dict)."""
    fused_target, fused_draft = FusedDecoder(target), FusedDecoder(draft)
    out = {
        "no cache": lambda n: (generate(target, prompt, n, use_cache=False)[0].tolist(), {}),
        "static cache": lambda n: (generate(target, prompt, n)[0].tolist(), {}),
        "static cache, fused weights": lambda n: (generate(fused_target, prompt, n)[0].tolist(), {}),
    }
    if args.hf:
        from ch01.hf_interop import to_hf

        hf = to_hf(target)
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0

        def hf_generate(n):
            with torch.no_grad():
                # an explicit mask: HF would otherwise treat every pad_token_id (0 = newline here) as padding
                ids = hf.generate(
                    prompt.view(1, -1),
                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                )
            return ids[0, len(prompt) :].tolist(), {}

        out["HF LlamaForCausalLM.generate"] = hf_generate
    for k in args.k:

        def spec(n, k=k):
            ids, st = speculative_generate(fused_target, fused_draft, prompt, n, k=k)
            return ids[0].tolist(), {"acceptance": f"{st.acceptance_rate:.2f}"}

        out[f"speculative k={k} (fused)"] = spec
    if args.mlx:
        try:
            import mlx.core as mx

            from ch07.mlx_minigpt import MLXGPT
        except ImportError:
            print("MLX is not installed: skipping the MLX row (pip install mlx[cpu] on Linux, mlx on a Mac)")
        else:
            with tempfile.TemporaryDirectory() as d:
                mlx_model = MLXGPT.load(target.save(d))
            mx_prompt = mx.array(prompt.view(1, -1).numpy())
            out["MLX (KV cache)"] = lambda n: (mlx_model.generate(mx_prompt, n).tolist()[0], {})
    return out


def _llama_model(name: str, prompt_len: int, untrained: bool = False):
    """(GPT, tokenizer, prompt ids, shipped GGUF or None) for ``smollm2`` (a chat prompt) or ``char`` (the chapter's
    target, a validation prompt; random weights of its shape if ``untrained``)."""
    if name == "char" and untrained:
        from ch01.model import GPT, GPTConfig
        from ch01.train import prepare_data
        from ch07.models import TARGET

        tok, _, val_ids = prepare_data("char")
        target = GPT(GPTConfig.preset(TARGET["preset"], vocab_size=tok.vocab_size, **TARGET["overrides"])).eval()
        return target, tok, val_ids[:prompt_len].tolist(), None
    if name == "char":
        target, _, tok, val_ids = decode_models(verbose=False, distill=False)
        return target, tok, val_ids[:prompt_len].tolist(), None
    from ch01.chat_template import apply_chat_template
    from ch01.pretrained import load_pretrained, smollm2_gguf_path
    from ch07.fused_decode import CHAT_QUESTION

    model, tok = load_pretrained("smollm2-135m-instruct")
    return model, tok, apply_chat_template(tok, [{"role": "user", "content": CHAT_QUESTION}]), smollm2_gguf_path()


def llama_cpp_rows(name: str, args, out_dir) -> list[dict]:
    """Ours vs llama.cpp on the same GGUF per weight type and thread count (round-robin, medians)."""
    from ch06.gguf_export import export_gguf, llama_cpp_greedy, load_llama_cpp

    model, tok, prompt, shipped = _llama_model(name, args.prompt_len, args.untrained)
    n, rows, bandwidth = args.llama_new_tokens, [], read_bandwidth_gbs()
    for quant in args.llama_quants:
        if quant == SHIPPED and shipped is None:
            continue  # only SmolLM2 ships a Q4_1 file
        path = shipped if quant == SHIPPED else export_gguf(model, tok, out_dir / f"{name}-{quant}.gguf", quant)
        ours = FusedDecoder(model) if quant == "f32" else FusedDecoder.from_gguf(path)
        per_token = ours.weight_bytes_per_token()  # the same weights for both engines
        for threads in args.thread_counts:
            torch.set_num_threads(threads)
            llm = load_llama_cpp(path, len(prompt) + n + 16, n_threads=threads, f32_kv_cache=False)
            runs = {
                "ours": ((lambda k, ours=ours: generate(ours, prompt, k)[0].tolist()), per_token),
                "llama.cpp": ((lambda k, llm=llm: llama_cpp_greedy(llm, prompt, k)), per_token),
            }
            first, total, outs = _timed(runs, n, args.repeats)
            # decode steps: tokens 2..n (separate medians; if noise makes the difference meaningless, all n tokens)
            tps = {k: (n - 1) / dt if (dt := total[k] - first[k]) > 0.1 * total[k] else n / total[k] for k in runs}
            agree = next((i for i, (a, b) in enumerate(zip(outs["ours"], outs["llama.cpp"])) if a != b), n)
            label = f"{quant.upper()}{' (shipped file)' if path == shipped else ''}"
            rows.append(
                {
                    "model": name, "weights": label, "threads": threads, "MB/token": per_token / 1e6,
                    "ours tok/s": tps["ours"], "llama.cpp tok/s": tps["llama.cpp"],
                    "ours / llama.cpp": tps["ours"] / tps["llama.cpp"],
                    "ours MBU": per_token * tps["ours"] / 1e9 / bandwidth,
                    "llama.cpp MBU": per_token * tps["llama.cpp"] / 1e9 / bandwidth,
                    "same tokens": f"{agree}/{n}",
                }
            )  # fmt: skip
            print(f"  {name} {label} x{threads}: ours {tps['ours']:.1f}, llama.cpp {tps['llama.cpp']:.1f} tok/s")
            del llm
    return rows


def llama_cpp_main(args) -> list[dict]:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed (requirements-extra.txt): no llama.cpp comparison")
        return []
    rows = []
    with tempfile.TemporaryDirectory() as d:
        from pathlib import Path

        for name in args.llama_models:
            rows += llama_cpp_rows(name, args, Path(d))
    torch.set_num_threads(args.threads)
    print(f"\n{hardware_info()}")  # ends with the calibration: sgemm GFLOP/s and memory read GB/s
    print(
        f"greedy, prompt {args.prompt_len} (char) / chat prompt (SmolLM2), {args.llama_new_tokens} new tokens; "
        f"decode tokens/s over tokens 2..n, medians of {args.repeats}; same tokens: agreeing prefix with llama.cpp"
    )
    print(markdown_table(rows, floatfmt=".2f"))
    if rows and not args.no_plot:
        print(f"plot: {plot_vs_llama_cpp(rows, assets_dir(__file__) / 'decode_vs_llama_cpp.png')}")
    return rows


def plot_vs_llama_cpp(rows: list[dict], path):
    """Grouped bars: one group per model and weight format, one bar per thread count, a line at parity."""
    import matplotlib.pyplot as plt

    from common.plot import save_fig

    groups = list(dict.fromkeys(f"{r['model']}\n{r['weights'].split()[0]}" for r in rows))
    threads = sorted({r["threads"] for r in rows})
    width = 0.8 / len(threads)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(groups) + 1.5), 4.2))
    for i, t in enumerate(threads):
        pts = [(groups.index(f"{r['model']}\n{r['weights'].split()[0]}"), r["ours / llama.cpp"])
               for r in rows if r["threads"] == t]  # fmt: skip
        xs, ys = zip(*pts)
        ax.bar([x + (i - (len(threads) - 1) / 2) * width for x in xs], ys, width, label=f"{t} thread{'s' * (t > 1)}")
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(groups)), groups, fontsize="small")
    ax.set(ylabel="ours / llama.cpp decode tokens/s", title="decode speed vs llama.cpp (same GGUF weights, batch 1)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return save_fig(fig, path)


def main(argv=None):
    p = base_parser(__doc__.split("\n")[0], seed=True)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, nargs="+", default=[64, 512])
    p.add_argument("--k", type=int, nargs="+", default=[2, 4, 6], help="draft lengths for speculative decoding")
    p.add_argument("--repeats", type=int, default=5, help="round-robin repeats; medians are reported")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is steadiest on a shared CPU)")
    p.add_argument("--no-hf", dest="hf", action="store_false")
    p.add_argument("--no-mlx", dest="mlx", action="store_false")
    p.add_argument("--untrained", action="store_true", help="random weights (smoke run, no training)")
    p.add_argument("--skip-no-cache-above", type=int, default=10**9, help="skip the slow no-cache row above this")
    p.add_argument("--llama-cpp", action="store_true", help="instead: ours vs llama.cpp on the same GGUF files")
    p.add_argument("--llama-models", nargs="+", default=["smollm2", "char"], choices=["smollm2", "char"])
    p.add_argument("--llama-quants", nargs="+", default=["f32", "q8_0", "q4_0", SHIPPED])
    p.add_argument("--thread-counts", type=int, nargs="+", default=[1, 2], help="threads for the --llama-cpp table")
    p.add_argument("--llama-new-tokens", type=int, default=64)
    p.add_argument("--no-plot", action="store_true", help="do not write the plot into assets/")
    args = p.parse_args(argv)
    bad = set(args.llama_quants) - {"f32", "q8_0", "q4_0", SHIPPED}
    if bad:
        raise ValueError(f"--llama-quants {sorted(bad)}: choose from f32, q8_0, q4_0 (our exports), q4_1 (shipped)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.llama_cpp:
        return llama_cpp_main(args)
    if args.untrained:  # same shapes, random weights: a quick smoke run (speeds only; acceptance is meaningless)
        from ch01.model import GPT, GPTConfig
        from ch07.models import DRAFT, TARGET

        target, draft = (
            GPT(GPTConfig.preset(m["preset"], vocab_size=65, **m["overrides"])).eval() for m in (TARGET, DRAFT)
        )
        prompt = torch.randint(0, 65, (args.prompt_len,))
    else:
        target, draft, _, val_ids = decode_models()
        prompt = val_ids[: args.prompt_len]
    fns = methods(target, draft, prompt, args)
    for name, fn in fns.items():  # warm-up outside the timings
        if name != "no cache":
            fn(8)
    rows, series = [], {name: ([], []) for name in fns}
    for n in args.new_tokens:
        todo = {
            name: (lambda fn=fn, n=n: fn(n))
            for name, fn in fns.items()
            if not (name == "no cache" and n > args.skip_no_cache_above)
        }
        results = round_robin(todo, args.repeats)
        tps = {name: n / sec for name, (sec, _) in results.items()}
        for name, (_, (ids, info)) in results.items():
            series[name][0].append(n)
            series[name][1].append(tps[name])
            row = {"new tokens": n, "method": name, "tokens/s": tps[name], "acceptance": info.get("acceptance", "")}
            row["identical to cache"] = ids == results["static cache"][1][0]
            row["x static cache"] = tps[name] / tps["static cache"]
            for base, col in (("no cache", "x no cache"), ("HF LlamaForCausalLM.generate", "x HF generate")):
                if base in tps:
                    row[col] = tps[name] / tps[base]
            if name.startswith("speculative"):
                row["x fused greedy"] = tps[name] / tps["static cache, fused weights"]
            rows.append(row)
            print(f"  {n:4d} {name:32s} {tps[name]:8.1f} tok/s", flush=True)
    cfg = target.config
    print(
        f"\n{hardware_info()} (intra-op threads {args.threads}); target {target.num_params() / 1e6:.1f}M params "
        f"({cfg.n_layer} layers × {cfg.n_embd}), draft {draft.num_params() / 1e6:.2f}M; prompt {args.prompt_len}"
    )
    cols = [
        "new tokens",
        "method",
        "tokens/s",
        "x no cache",
        "x static cache",
        "x HF generate",
        "x fused greedy",
        "acceptance",
        "identical to cache",
    ]
    print(markdown_table(rows, cols, floatfmt=".2f"))
    if args.no_plot:
        return rows
    path = line_plot(
        {k: v for k, v in series.items() if v[0]},
        assets_dir(__file__) / "decode_tokens_per_s.png",
        title=f"greedy decoding, prompt {args.prompt_len} (CPU, {args.threads} thread)",
        xlabel="new tokens",
        ylabel="tokens/s",
        logy=True,
        legend_outside=True,
    )
    print(f"plot: {path}")
    return rows


if __name__ == "__main__":
    main()
