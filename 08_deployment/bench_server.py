"""Load-test the server: N concurrent streaming clients (asyncio + httpx) against continuous batching vs one-at-a-time.

    python 08_deployment/bench_server.py                              # 1 and 16 clients, 64 requests each, small model
    python 08_deployment/bench_server.py --clients 1,4,16,32 --requests 128
    python 08_deployment/bench_server.py --stress 1000 --stress-clients 32   # + failure count over 1,000 requests
    python 08_deployment/bench_server.py --model smollm2-135m-instruct --clients 1,4 --requests 8 --max-batch 4

Both modes run the same server (server.py in a subprocess on 127.0.0.1, loopback only, so the load-generating clients
do not share its GIL); "sequential" is ``--max-batch 1``, so a
request waits until the one before it has finished. Each client sends a request, reads the SSE stream to the end, and
sends the next (a closed loop, bounded by ``--requests``). Every request generates exactly ``--max-tokens`` tokens
(sampling at temperature 0.8, no stop strings), so the two modes do the same work (a real model's end-of-turn token can end one early: ``tokens_per_req``). Reported: generated tokens/s, request
latency p50/p95/p99, time to first token (TTFT) p50/p95, failed requests. ``--model`` serves a real pretrained model
(anything ``ch01.pretrained.load_pretrained`` takes) with a 2048-token context instead of a checkpoint.
References: Orca (Yu et al., OSDI 2022) and vLLM (Kwon et al., SOSP 2023) for continuous batching.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import httpx

from ch08.serve_thread import ServerProcess
from ch08.server import load_model
from common.bench import hardware_info, markdown_table
from common.cli import base_parser
from common.data import load_shakespeare
from common.plot import assets_dir, line_plot


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("choices") and chunk["choices"][0]["text"] and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - t0, "ttft": ttft if ttft is not None else float("nan"), "tokens": tokens}


async def load_test(
    url: str, model: str, prompts: list[str], n_clients: int, n_requests: int, max_tokens: int, timeout: float = 300.0
) -> dict:
    results, failures, next_id = [], [], iter(range(n_requests))

    async def client_loop(client):
        for i in next_id:  # shared iterator: clients take requests until all n_requests are sent
            body = {
                "model": model,
                "prompt": prompts[i % len(prompts)],
                "max_tokens": max_tokens,
                "temperature": 0.8,
                "seed": i,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            try:
                results.append(await one_request(client, body))
            except Exception as e:  # counted, reported, never retried
                failures.append(repr(e))

    limits = httpx.Limits(max_connections=n_clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(n_clients)))
        wall = time.perf_counter() - t0
    lat, ttft = [r["latency"] for r in results], [r["ttft"] for r in results]
    return {
        "clients": n_clients,
        "requests": n_requests,
        "failed": len(failures),
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "tokens_per_req": sum(r["tokens"] for r in results) / max(len(results), 1),
        "req_per_s": len(results) / wall,
        "p50_ms": pct(lat, 50) * 1e3,
        "p95_ms": pct(lat, 95) * 1e3,
        "p99_ms": pct(lat, 99) * 1e3,
        "ttft_p50_ms": pct(ttft, 50) * 1e3,
        "ttft_p95_ms": pct(ttft, 95) * 1e3,
        "wall_s": wall,
        "first_failure": failures[0] if failures else "",
    }


def make_prompts(n: int, seed: int) -> list[str]:
    text, rng = load_shakespeare(), random.Random(seed)
    starts = [rng.randrange(len(text) - 64) for _ in range(n)]
    return [text[s : s + rng.randint(8, 24)] for s in starts]


def parse_args(argv=None):
    p = base_parser(__doc__.split("\n\n")[0], seed=True)
    p.add_argument("--checkpoint", default=None, help="GPT.save directory (default: ch01's cached small char model)")
    p.add_argument("--model", default=None, help="a pretrained model instead: smollm2-135m-instruct, a GGUF, a HF dir")
    p.add_argument("--preset", default="small")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--clients", default="1,16", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=64, help="requests per (mode, concurrency) run")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=32, help="batch size of the continuous-batching server")
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"])
    p.add_argument(
        "--decoder", default="fused", choices=["fused", "model"], help="torch paged engine: ch07 FusedDecoder or ch01"
    )
    p.add_argument("--modes", default="continuous,sequential")
    p.add_argument("--stress", type=int, default=0, help="also send this many requests to the continuous server")
    p.add_argument("--stress-clients", type=int, default=32)
    return p.parse_args(argv)


COLUMNS = [
    "mode",
    "clients",
    "requests",
    "failed",
    "tokens_per_s",
    "speedup",
    "tokens_per_req",
    "req_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "ttft_p50_ms",
    "ttft_p95_ms",
]


def run_mode(args, mode: str, source: list[str], name: str, prompts: list[str]) -> tuple[list[dict], dict | None]:
    """One server subprocess for ``mode``; a load test per concurrency level (+ the stress run): (rows, stress)."""
    batch = 1 if mode == "sequential" else args.max_batch
    server_args = [*source, "--backend", args.backend, "--max-batch", str(batch), "--device", "cpu"]
    server_args += ["--max-queue", str(max(1024, args.stress)), "--decoder", args.decoder]
    rows, stress = [], None
    with ServerProcess(server_args) as url:
        asyncio.run(load_test(url, name, prompts, 2, 4, 4))  # warm-up
        for n in [int(c) for c in args.clients.split(",")]:
            rows.append({"mode": mode, **asyncio.run(load_test(url, name, prompts, n, args.requests, args.max_tokens))})
            print(f"{mode:>10} x{n:<3} {rows[-1]['tokens_per_s']:8.1f} tok/s  failed {rows[-1]['failed']}")
        if args.stress and mode == "continuous":
            stress = asyncio.run(load_test(url, name, prompts, args.stress_clients, args.stress, args.max_tokens))
    return rows, stress


def plot_rows(rows: list[dict], model: str | None = None):
    series = {
        mode: (
            [r["clients"] for r in rows if r["mode"] == mode],
            [r["tokens_per_s"] for r in rows if r["mode"] == mode],
        )
        for mode in dict.fromkeys(r["mode"] for r in rows)
    }
    return line_plot(
        series,
        assets_dir(__file__) / f"bench_server{'_' + Path(model).stem if model else ''}.png",
        title=f"server throughput vs concurrency{', ' + Path(model).stem if model else ''}",
        xlabel="concurrent clients",
        ylabel="generated tokens / s",
        logx=True,
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    name = args.model or load_model(args.checkpoint, args.preset, args.iters)[2]  # trains + caches the default once
    if args.model:  # server.py loads it (its context capped at 2048 tokens)
        source = ["--model", args.model]
    elif args.checkpoint:
        source = ["--checkpoint", args.checkpoint]
    else:
        source = ["--preset", args.preset, "--iters", str(args.iters)]
    prompts = make_prompts(256, args.seed)
    rows, stress = [], None
    for mode in args.modes.split(","):
        mode_rows, mode_stress = run_mode(args, mode, source, name, prompts)
        rows, stress = rows + mode_rows, stress or mode_stress
    for r in rows:
        seq = next((s for s in rows if s["mode"] == "sequential" and s["clients"] == r["clients"]), None)
        r["speedup"] = r["tokens_per_s"] / seq["tokens_per_s"] if seq else float("nan")
    print(
        f"\n{hardware_info()}; backend {args.backend}, decoder {args.decoder}; model {name}; "
        f"{args.max_tokens} tokens per request\n"
    )
    print(markdown_table(rows, COLUMNS, floatfmt=".1f"))
    if stress:
        print(
            f"\nstress: {stress['requests']} requests at {stress['clients']} clients -> {stress['failed']} failed, "
            f"{stress['tokens_per_s']:.1f} tokens/s, p99 {stress['p99_ms']:.0f} ms {stress['first_failure']}"
        )
    plot = plot_rows(rows, args.model)
    print(f"plot: {plot}")
    return {"rows": rows, "stress": stress, "plot": str(plot)}


if __name__ == "__main__":
    main()
