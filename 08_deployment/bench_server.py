"""Load-test the server: N concurrent streaming clients (asyncio + httpx) against continuous batching vs one-at-a-time.

    python 08_deployment/bench_server.py                              # 1 and 16 clients, 64 requests each, small model
    python 08_deployment/bench_server.py --clients 1,4,16,32 --requests 128
    python 08_deployment/bench_server.py --stress 1000 --stress-clients 32   # + failure count over 1,000 requests
    python 08_deployment/bench_server.py --model smollm2-135m-instruct --clients 1,4 --requests 8 --max-batch 4
    python 08_deployment/bench_server.py --model smollm2-135m-instruct --modes continuous,llama.cpp --clients 1,4,16
    python 08_deployment/bench_server.py --model smollm2-135m-instruct --modes none --prefix-ttft 8   # prefix cache

Both modes run the same server (server.py in a subprocess on 127.0.0.1, loopback only, so the load-generating clients
do not share its GIL); "sequential" is ``--max-batch 1``, so a
request waits until the one before it has finished. Each client sends a request, reads the SSE stream to the end, and
sends the next (a closed loop, bounded by ``--requests``). Every request generates exactly ``--max-tokens`` tokens
(sampling at temperature 0.8, no stop strings), so the two modes do the same work (a real model's end-of-turn token can end one early: ``tokens_per_req``). Reported: generated tokens/s, request
latency p50/p95/p99, time to first token (TTFT) p50/p95, failed requests. ``--model`` serves a real pretrained model
(anything ``ch01.pretrained.load_pretrained`` takes) with a 2048-token context instead of a checkpoint.

``llama.cpp`` (a mode) runs llama-cpp-python's OpenAI server (``python -m llama_cpp.server``, from
requirements-extra.txt; the mode is skipped with one line when it is not installed) on an F32 GGUF export of the SAME
weights (ch06's ``export_gguf``, cached under .cache/gguf/), with as many threads as torch uses, and the same clients.
``--prefix-ttft N`` sends N requests one after another that share a ``--shared-tokens``-token prefix (a system
prompt) and differ after it, to a server with prefix caching on and one with it off: time to first token, medians.
References: Orca (Yu et al., OSDI 2022) and vLLM (Kwon et al., SOSP 2023) for continuous batching.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

from ch08.serve_thread import ServerProcess
from ch08.server import load_model
from common.bench import hardware_info, markdown_table
from common.cli import base_parser
from common.data import cache_dir, load_shakespeare
from common.plot import assets_dir, line_plot


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


class LlamaCppServer(ServerProcess):
    """llama-cpp-python's OpenAI-compatible server on a GGUF file, on a free loopback port (requests queue rather than
    interrupt each other: ``--interrupt_requests False``)."""

    health_path = "/v1/models"

    def __init__(self, gguf: Path, name: str, threads: int, n_ctx: int = 2048):
        super().__init__([])
        self.cmd = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--model_alias",
            name,
            "--n_ctx",
            str(n_ctx),
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
            "--interrupt_requests",
            "False",
            "--verbose",
            "False",
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]


def llama_cpp_available() -> bool:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        return False
    return True


def f32_gguf(args) -> Path:
    """The benchmarked model's weights as an F32 GGUF (exported once, cached) for llama.cpp's server."""
    model, tok, name = load_model(args.checkpoint, args.preset, args.iters, pretrained=args.model)
    path = cache_dir("gguf") / f"{Path(name).stem}-f32.gguf"
    if not path.exists():
        from ch06.gguf_export import export_gguf

        export_gguf(model, tok, path, "f32", name=name)
    return path


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
    """One streaming request: latency, time to the first text, tokens (the usage chunk's count, else text chunks:
    llama.cpp's server streams one token per chunk and sends no usage)."""
    t0 = time.perf_counter()
    ttft, tokens, chunks = None, 0, 0
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
            if chunk.get("choices") and chunk["choices"][0]["text"]:
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    ttft = ttft if ttft is not None else float("nan")
    return {"latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens or chunks}


async def load_test(
    url: str,
    model: str,
    prompts: list[str],
    n_clients: int,
    n_requests: int,
    max_tokens: int,
    timeout: float = 300.0,
    usage: bool = True,
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
            }
            if usage:  # llama.cpp's server has no stream_options
                body["stream_options"] = {"include_usage": True}
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
        "ttft_p99_ms": pct(ttft, 99) * 1e3,
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
    p.add_argument(
        "--modes",
        default="continuous,sequential",
        help="comma-separated: continuous (our server), sequential (ours, --max-batch 1), llama.cpp (its server on the "
        "same weights), or none",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of each server (torch / llama.cpp; default: OMP_NUM_THREADS, else all cores)",
    )
    p.add_argument("--repeats", type=int, default=1, help="load tests per (mode, clients), round-robin; median kept")
    p.add_argument("--prefix-ttft", type=int, default=0, help="also: N requests sharing a prefix, cache on vs off")
    p.add_argument("--shared-tokens", type=int, default=512, help="length of the shared prefix for --prefix-ttft")
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
    "ttft_p99_ms",
    "runs",
]


def run_modes(args, modes: list[str], source: list[str], name: str, prompts: list[str]) -> tuple[list[dict], dict]:
    """All modes' servers up at once; per concurrency level ``--repeats`` load tests per mode, round-robin over the
    modes (a slow minute of a shared machine hits every mode alike), the median run (by tokens/s) reported.
    Returns (rows, stress run of the continuous server or None)."""
    rows, stress = [], None
    with contextlib.ExitStack() as stack:
        urls = {m: stack.enter_context(server_for(args, m, source, name)) for m in modes}
        for m, url in urls.items():
            asyncio.run(load_test(url, name, prompts, 2, 4, 4, usage=m != "llama.cpp"))  # warm-up
        for n in [int(c) for c in args.clients.split(",")]:
            runs = {m: [] for m in modes}
            for _ in range(args.repeats):
                for m, url in urls.items():
                    test = load_test(url, name, prompts, n, args.requests, args.max_tokens, usage=m != "llama.cpp")
                    runs[m].append(asyncio.run(test))
                    print(f"{m:>10} x{n:<3} {runs[m][-1]['tokens_per_s']:8.1f} tok/s  failed {runs[m][-1]['failed']}")
            for m, results in runs.items():
                median = sorted(results, key=lambda r: r["tokens_per_s"])[len(results) // 2]
                rows.append({"mode": m, **median, "runs": " / ".join(f"{r['tokens_per_s']:.1f}" for r in results)})
        if args.stress and "continuous" in urls:
            stress = asyncio.run(
                load_test(urls["continuous"], name, prompts, args.stress_clients, args.stress, args.max_tokens)
            )
    return rows, stress


def server_for(args, mode: str, source: list[str], name: str, extra: tuple[str, ...] = ()) -> ServerProcess:
    """The server process of a mode: ours (continuous batching, or one request at a time) or llama.cpp's."""
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    if mode == "llama.cpp":
        return LlamaCppServer(f32_gguf(args), name, threads)
    batch = 1 if mode == "sequential" else args.max_batch
    server_args = [*source, "--backend", args.backend, "--max-batch", str(batch), "--device", "cpu", *extra]
    server_args += ["--max-queue", str(max(1024, args.stress)), "--decoder", args.decoder]
    return ServerProcess(server_args, env={"OMP_NUM_THREADS": str(threads)})


async def ttft_series(url: str, name: str, prompts: list[str]) -> list[float]:
    """Time to first token of each prompt, sent one after another (streaming, 4 new tokens, greedy)."""
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        for prompt in prompts:
            body = {"model": name, "prompt": prompt, "max_tokens": 4, "temperature": 0.0, "stream": True}
            out.append((await one_request(client, {**body, "stream_options": {"include_usage": True}}))["ttft"])
    return out


def prefix_ttft(args, source: list[str], name: str) -> list[dict]:
    """TTFT with prefix caching on vs off: ``--prefix-ttft`` prompts = one shared ~``--shared-tokens`` prefix + a
    different line each. The first request (which fills the cache) is left out of the median."""
    text = load_shakespeare()
    rows, shared = [], None
    for caching in ("off", "on"):
        with server_for(args, "continuous", source, name, ("--prefix-caching", caching)) as url:
            if shared is None:  # size the prefix in the model's own tokens (the usage of one request tells)
                n_chars = 2 * args.shared_tokens
                body = {"model": name, "prompt": text[:n_chars], "max_tokens": 1}
                probe = httpx.post(url + "/v1/completions", json=body, timeout=300).json()
                if "usage" not in probe:
                    raise SystemExit(f"--prefix-ttft: {probe['error']['message']} (a longer-context model is needed)")
                chars = int(n_chars * args.shared_tokens / probe["usage"]["prompt_tokens"])
                shared = text[:chars]
                lines = text[chars:].split("\n")
                questions = [f"\n{lines[10 * i + 7]}\n" for i in range(args.prefix_ttft)]
            ttft = asyncio.run(ttft_series(url, name, [shared + q for q in questions]))
            n_shared = httpx.post(
                url + "/v1/completions", json={"model": name, "prompt": shared, "max_tokens": 1}, timeout=300
            )
            hits = httpx.get(url + "/metrics").text
        hit = sum(float(x.split()[-1]) for x in hits.splitlines() if x.startswith("llm_prefix_cache_hit_tokens_total"))
        rows.append(
            {
                "prefix caching": caching,
                "shared prefix tokens": n_shared.json()["usage"]["prompt_tokens"],
                "requests": len(ttft),
                "TTFT p50 ms (2nd..)": statistics.median(ttft[1:]) * 1e3,
                "TTFT first ms": ttft[0] * 1e3,
                "prefix-cache hit tokens": hit,
            }
        )
    rows[1]["TTFT speedup"] = rows[0]["TTFT p50 ms (2nd..)"] / rows[1]["TTFT p50 ms (2nd..)"]
    rows[0]["TTFT speedup"] = 1.0
    return rows


def plot_label(args) -> str | None:
    """What names the plot file: a pretrained model's stem, or a checkpoint's last two folders (runs/cpu-demo/model ->
    cpu-demo-model); None for the default char model (bench_server.png)."""
    if args.model:
        return Path(args.model).stem
    return "-".join(Path(args.checkpoint).resolve().parts[-2:]) if args.checkpoint else None


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
    modes = [m for m in args.modes.split(",") if m != "none"]
    if "llama.cpp" in modes and not llama_cpp_available():
        print("llama.cpp mode skipped: llama-cpp-python[server] is not installed (requirements-extra.txt)")
        modes.remove("llama.cpp")
    rows, stress = run_modes(args, modes, source, name, prompts) if modes else ([], None)
    baseline = "llama.cpp" if "llama.cpp" in modes else "sequential"
    for r in rows:
        base = next((s for s in rows if s["mode"] == baseline and s["clients"] == r["clients"]), None)
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
    print(
        f"\n{hardware_info()}; {args.threads or os.environ.get('OMP_NUM_THREADS', os.cpu_count())} threads per server; backend {args.backend}, decoder {args.decoder}; "
        f"model {name}; {args.max_tokens} tokens per request; speedup vs {baseline}\n"
    )
    if rows:
        print(markdown_table(rows, COLUMNS, floatfmt=".1f"))
    prefix = prefix_ttft(args, source, name) if args.prefix_ttft else None
    if prefix:
        print(f"\nprefix caching, {args.prefix_ttft} requests sharing a prefix, one at a time:\n")
        print(markdown_table(prefix, floatfmt=".1f"))
    if stress:
        print(
            f"\nstress: {stress['requests']} requests at {stress['clients']} clients -> {stress['failed']} failed, "
            f"{stress['tokens_per_s']:.1f} tokens/s, p99 {stress['p99_ms']:.0f} ms {stress['first_failure']}"
        )
    plot = plot_rows(rows, plot_label(args)) if rows else None
    print(f"plot: {plot}")
    return {"rows": rows, "stress": stress, "plot": str(plot), "prefix_ttft": prefix}


if __name__ == "__main__":
    main()
