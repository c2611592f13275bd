"""Build and serve your own mini-GPT, end to end, in one command — the course's chapters stitched together.

    python 10_capstone/minigpt.py all                    # cpu-demo config: tokenizer -> ... -> report (a few minutes)
    python 10_capstone/minigpt.py serve                  # OpenAI-compatible API on http://127.0.0.1:8000
    python 10_capstone/minigpt.py serve --model smollm2-135m-instruct   # the same server, a real pretrained LLM
    python 10_capstone/minigpt.py --config cpu-full all  # the longer CPU run; --config gpu on a CUDA machine
    python 10_capstone/minigpt.py train --force          # redo one stage (stages skip when up to date)

Stages: tokenizer (ch01 byte-level BPE), data (memmapped token files), train (ch01 loop; Ctrl-C leaves a resumable
checkpoint, re-running resumes), eval (val loss, perplexity, samples, decode speed with ch07's KV cache), quantize (ch06
int8 RTN and GGUF Q8_0), export (safetensors, Hugging Face via ch01, ONNX via ch08, GGUF via ch06), sft and rl
(ch03's SFT with a ChatML template and GRPO on verifiable tasks; accuracy per stage), report (runs/<name>/report.md),
serve (ch08's server; the post-trained model and its chat template when sft / rl ran). Artifacts go to runs/<name>/
(gitignored).
"""

from __future__ import annotations

import sys

from ch10.config import DEFAULT_CONFIG, ConfigError, load_config
from ch10.posttrain import served_model_dir
from ch10.stages import STAGES, Run, run_stage
from common.cli import base_parser


def server_state(run: Run, model: str | None = None):
    """ch08's server state (engine, scheduler, metrics) for the run's model — or, with ``model``, a pretrained one
    (``ch01.pretrained.load_pretrained``: a name such as smollm2-135m-instruct, a GGUF file or a HF directory)."""
    from ch08.server import PRETRAINED_MAX_CONTEXT, build_state, load_model

    max_batch = run.cfg["serve"]["max_batch"]
    if model is not None:
        gpt, tok, name = load_model(None, device=str(run.device), pretrained=model)
        return build_state(gpt, tok, name, max_batch=max_batch, max_context=PRETRAINED_MAX_CONTEXT)
    if not (run.model_dir / "model.safetensors").exists():
        print("no trained model yet: running the pipeline first")
        for stage in STAGES:
            run_stage(run, stage)
    directory = served_model_dir(run)  # the post-trained model (its ChatML template) when sft / rl ran
    gpt, tok, _ = load_model(str(directory), device=str(run.device))
    print(f"model: {directory}")
    return build_state(gpt, tok, "minigpt", max_batch=max_batch)


def serve(run: Run, host: str | None, port: int | None, model: str | None = None) -> None:
    """ch08's OpenAI-compatible app, in this process, until Ctrl-C."""
    import uvicorn

    from ch08.api import create_app
    from common.seed import seed_everything

    seed_everything(run.cfg["seed"])
    try:
        state = server_state(run, model)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    host, port = host or run.cfg["serve"]["host"], port or run.cfg["serve"]["port"]
    print(
        f"serving {state.model_name} on http://{host}:{port} (max batch {run.cfg['serve']['max_batch']}, device {run.device})"
    )
    uvicorn.run(create_app(state), host=host, port=port, timeout_graceful_shutdown=int(state.shutdown_timeout))


def main(argv=None) -> dict:
    p = base_parser(__doc__, device=True, seed=True)
    p.add_argument("stage", nargs="?", default="all", choices=[*STAGES, "sample", "all", "serve"])
    p.add_argument("--config", default=DEFAULT_CONFIG, help="a name in 10_capstone/configs/ or a .toml path")
    p.add_argument("--runs-dir", default=None, help="where runs/<name>/ goes (default: <repo>/runs)")
    p.add_argument("--force", action="store_true", help="redo the stage(s) even if up to date")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--model", default=None, help="serve: a pretrained model (smollm2-135m-instruct, a GGUF, a HF dir)")
    args = p.parse_args(argv)
    if args.model is not None and args.stage != "serve":
        p.error("--model only applies to the serve stage")
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        p.error(str(e))
    if args.device != "auto":
        cfg["device"] = args.device
    if args.seed != p.get_default("seed"):
        cfg["seed"] = args.seed
    run = Run(cfg, args.runs_dir, force=args.force, progress=not args.no_progress)
    if args.stage == "serve":
        serve(run, args.host, args.port, args.model)
        return run.metrics
    if args.stage == "sample":  # always fresh samples: the eval stage's sampling, without the skip
        run.force = True
        run_stage(run, "eval")
        print("\n\n".join(run.metrics["eval"]["samples"]))
        return run.metrics
    try:
        for stage in STAGES if args.stage == "all" else [args.stage]:
            run_stage(run, stage)
    except KeyboardInterrupt:
        print("\ninterrupted — re-run the same command to resume (training continues from its last checkpoint)")
        sys.exit(130)
    if args.stage in ("all", "report"):
        print((run.dir / "report.md").read_text())
        print(f"artifacts in {run.dir}\nserve it: python 10_capstone/minigpt.py --config {args.config} serve")
    return run.metrics


if __name__ == "__main__":
    main()
