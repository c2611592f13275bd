"""Build and serve your own mini-GPT, end to end, in one command — the course's chapters stitched together.

    python 10_capstone/minigpt.py all                    # cpu-demo config: tokenizer -> ... -> report (a few minutes)
    python 10_capstone/minigpt.py serve                  # OpenAI-compatible API on http://127.0.0.1:8000
    python 10_capstone/minigpt.py --config cpu-full all  # the longer CPU run; --config gpu on a CUDA machine
    python 10_capstone/minigpt.py train --force          # redo one stage (stages skip when up to date)

Stages: tokenizer (ch01 byte-level BPE), data (memmapped token files), train (ch01 loop; Ctrl-C leaves a resumable
checkpoint, re-running resumes), eval (val loss, perplexity, samples, decode speed with ch07's KV cache), quantize (ch06
int8 RTN and GGUF Q8_0), export (safetensors, Hugging Face via ch01, ONNX via ch08, GGUF via ch06), report
(runs/<name>/report.md), serve (ch08's server). Artifacts go to runs/<name>/ (gitignored).
"""

from __future__ import annotations

import sys

from ch10.config import DEFAULT_CONFIG, ConfigError, load_config
from ch10.stages import STAGES, Run, run_stage
from common.cli import base_parser


def serve(run: Run, host: str | None, port: int | None) -> None:
    from ch08.server import main as serve_main

    if not (run.model_dir / "model.safetensors").exists():
        print("no trained model yet: running the pipeline first")
        for stage in STAGES:
            run_stage(run, stage)
    sc = run.cfg["serve"]
    serve_main(["--checkpoint", str(run.model_dir), "--model-name", "minigpt", "--host", host or sc["host"],
                "--port", str(port or sc["port"]), "--max-batch", str(sc["max_batch"]), "--device", str(run.device)])


def main(argv=None) -> dict:
    p = base_parser(__doc__)
    p.add_argument("stage", nargs="?", default="all", choices=[*STAGES, "sample", "all", "serve"])
    p.add_argument("--config", default=DEFAULT_CONFIG, help="a name in 10_capstone/configs/ or a .toml path")
    p.add_argument("--runs-dir", default=None, help="where runs/<name>/ goes (default: <repo>/runs)")
    p.add_argument("--force", action="store_true", help="redo the stage(s) even if up to date")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    args = p.parse_args(argv)
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
        serve(run, args.host, args.port)
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
