"""Time and peak memory of attention vs sequence length: naive (materialises N x N) vs tiled vs torch SDPA.

What it shows: naive attention's memory grows as N^2 (the score and probability matrices), while the tiled online-softmax
version (flash_pytorch.py) only ever holds one (block, block) tile, so its extra memory stays flat. Time is the same
O(N^2 D) arithmetic for all three; on a CPU the tiled Python loop pays interpreter overhead per tile, which torch's fused
C++ SDPA kernel does not.

Run:  python 04_efficient_attention/bench_attention.py                   (CPU, N = 512 ... 8192, forward, causal)
      python 04_efficient_attention/bench_attention.py --max-n 2048      (quicker)
      python 04_efficient_attention/flash_triton.py                     (on a CUDA GPU: Triton kernel TFLOP/s, via
                                                                          gpu_flash_benchmark below)
Peak memory on CPU is the process RSS above its starting point, sampled while the call runs (common.bench.peak_memory),
after handing freed heap pages back to the OS (release_free_memory) so reused pages do not hide allocations.
References: Dao et al. 2022 (FlashAttention), Rabe & Staats 2021 (self-attention does not need O(n^2) memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ch01.model import naive_attention
from ch04.flash_pytorch import flash_attention_pytorch
from common.bench import hardware_info, markdown_table, peak_memory, release_free_memory, timeit
from common.cli import base_parser
from common.device import parse_dtype, pick_device
from common.plot import assets_dir, line_plot
from common.seed import seed_everything


def attention_flops(B: int, H: int, N: int, D: int, causal: bool, backward: bool = False) -> float:
    """2 matmuls of 2*N*N*D flops each per head (halved when causal); backward does 2.5x the forward's matmuls."""
    f = 4.0 * B * H * N * N * D * (0.5 if causal else 1.0)
    return f * 3.5 if backward else f


def cpu_benchmark(ns, B=1, H=2, D=64, causal=True, block=256, dtype=torch.float32, device="cpu", repeats=3) -> list:
    rows = []
    for N in ns:
        qkv = [torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3)]
        impls = {
            "naive": lambda qkv=qkv: naive_attention(*qkv, causal=causal),
            "tiled": lambda qkv=qkv: flash_attention_pytorch(*qkv, causal, block, block),
            "sdpa": lambda qkv=qkv: F.scaled_dot_product_attention(*qkv, is_causal=causal),
        }
        row = {"N": N}
        for name, fn in impls.items():
            release_free_memory()
            row[f"{name}_MiB"] = peak_memory(fn, device=device) / 2**20
            row[f"{name}_ms"] = timeit(fn, warmup=1, repeats=repeats, device=device).median * 1e3
        row["mem_ratio_naive/tiled"] = row["naive_MiB"] / max(row["tiled_MiB"], 1.0)  # floor: RSS noise is ~1 MiB
        rows.append(row)
        print(
            f"N={N}: naive {row['naive_MiB']:.0f} MiB {row['naive_ms']:.0f} ms | tiled {row['tiled_MiB']:.0f} MiB "
            f"{row['tiled_ms']:.0f} ms | sdpa {row['sdpa_MiB']:.0f} MiB {row['sdpa_ms']:.0f} ms",
            flush=True,
        )
    return rows


def gpu_flash_benchmark(
    flash_fn, dtype=torch.float16, ns=(512, 1024, 2048, 4096, 8192, 16384), B=2, H=16, D=64, causal=True
) -> list:
    """CUDA only: forward and forward+backward TFLOP/s of ``flash_fn(q, k, v, causal)`` vs SDPA and naive; plots."""
    import triton.testing

    rows = []
    for N in ns:
        qkv = [torch.randn(B, H, N, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]
        impls = {
            "flash_triton": lambda qkv=qkv: flash_fn(*qkv, causal),
            "sdpa": lambda qkv=qkv: F.scaled_dot_product_attention(*qkv, is_causal=causal),
            "naive": lambda qkv=qkv: naive_attention(*qkv, causal=causal),
        }
        row = {"N": N}
        for name, fn in impls.items():
            for mode in ("fwd", "fwd+bwd"):
                try:
                    run = fn if mode == "fwd" else (lambda fn=fn, g=torch.ones_like(qkv[0]): fn().backward(g))
                    ms = triton.testing.do_bench(run)
                    row[f"{name}_{mode}_TFLOPs"] = attention_flops(B, H, N, D, causal, mode != "fwd") / ms * 1e-9
                except torch.OutOfMemoryError:
                    row[f"{name}_{mode}_TFLOPs"] = float("nan")  # naive's N x N matrices no longer fit
                torch.cuda.empty_cache()
        rows.append(row)
    print(f"\nGPU: {hardware_info('cuda')}; B={B} H={H} D={D} causal={causal} {dtype}")
    print(markdown_table(rows, floatfmt=".1f"))
    series = {
        f"{n} {m}": ([r["N"] for r in rows], [r[f"{n}_{m}_TFLOPs"] for r in rows])
        for n in ("flash_triton", "sdpa", "naive")
        for m in ("fwd", "fwd+bwd")
    }
    line_plot(
        series,
        assets_dir(__file__) / "flash_triton_gpu_tflops.png",
        title="Attention throughput (GPU)",
        xlabel="sequence length N",
        ylabel="TFLOP/s",
        logx=True,
    )
    return rows


def main(argv=None) -> dict:
    p = base_parser(__doc__, device=True, seed=True, dtype=True)
    p.add_argument("--max-n", type=int, default=8192, help="largest sequence length (powers of two from 512)")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=256, help="tile size of the tiled implementation")
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.max_n < 512:
        raise SystemExit(f"--max-n must be at least 512; got {args.max_n}")
    device, dtype = pick_device(args.device), parse_dtype(args.dtype)
    seed_everything(args.seed)
    torch.set_grad_enabled(False)  # inference: naive autograd would keep its N x N tensors alive even longer
    ns = [n for n in (512, 1024, 2048, 4096, 8192, 16384, 32768) if n <= args.max_n]
    causal = not args.non_causal
    print(
        f"{hardware_info(device)}\nforward, B=1 H={args.heads} D={args.head_dim} causal={causal} {args.dtype}, "
        f"tile {args.block}; peak = extra memory while the call runs"
    )
    rows = cpu_benchmark(
        ns,
        H=args.heads,
        D=args.head_dim,
        causal=causal,
        block=args.block,
        dtype=dtype,
        device=device,
        repeats=args.repeats,
    )
    torch.set_grad_enabled(True)
    print(markdown_table(rows, floatfmt=".1f"))
    last = rows[-1]
    print(
        f"N={last['N']}: tiled peak memory is 1/{last['mem_ratio_naive/tiled']:.0f} of naive "
        "(naive grows as N², tiled as N)"
    )
    if not args.no_plot:
        xs = [r["N"] for r in rows]
        for unit, what, file, logy in (
            ("MiB", "extra peak memory", "attention_peak_memory_cpu.png", True),  # log: naive's N² dwarfs the rest
            ("ms", "time", "attention_time_cpu.png", True),
        ):
            line_plot(
                {n: (xs, [r[f"{n}_{unit}"] for r in rows]) for n in ("naive", "tiled", "sdpa")},
                assets_dir(__file__) / file,
                title=f"Attention forward: {what} (CPU)",
                xlabel="sequence length N",
                ylabel=unit,
                logx=True,
                logy=logy,
            )
    return {"rows": rows, "hardware": hardware_info(device)}


if __name__ == "__main__":
    main()
