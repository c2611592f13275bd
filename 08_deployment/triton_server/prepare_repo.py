"""Fill the NVIDIA Triton Inference Server model repository with the mini-GPT's ONNX export.

    python 08_deployment/triton_server/prepare_repo.py                 # small char model -> model_repository/
    docker run --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 \\
        -v $PWD/08_deployment/triton_server/model_repository:/models \\
        nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models

Three models (https://github.com/triton-inference-server/server/blob/main/docs/user_guide/model_configuration.md):
  mini_gpt_onnx      full-sequence graph, onnxruntime backend, Triton dynamic batching (logits for scoring)
  mini_gpt_decode    decode graph with explicit past keys/values (batch axis explicit: max_batch_size 0)
  mini_gpt_generate  Python backend: tokenizes, loops prefill + decode steps by calling mini_gpt_decode (BLS), samples
``render_configs(cfg)`` writes the config.pbtxt files from a GPTConfig, so names and shapes always match the export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ch01.model import GPT, GPTConfig
from ch08.export_onnx import export_decode, export_full, past_names
from common.bench import markdown_table
from common.cli import base_parser

REPO = Path(__file__).resolve().parent / "model_repository"


def model_config_pb2():
    """Triton's ModelConfig protobuf module from the ``tritonclient`` package.

    It lives in ``tritonclient/grpc/model_config_pb2.py``, but ``import tritonclient.grpc`` needs the ``grpcio`` extra
    (``tritonclient[grpc]``); the generated module itself only needs protobuf, so load it by path when grpc is absent.
    """
    try:
        from tritonclient.grpc import model_config_pb2 as mod

        return mod
    except (ImportError, RuntimeError):
        import importlib.util
        import sys

        spec = importlib.util.find_spec("tritonclient")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("tritonclient is not installed (pip install tritonclient)") from None
        path = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
        name = "_triton_model_config_pb2"
        if name not in sys.modules:
            mspec = importlib.util.spec_from_file_location(name, path)
            sys.modules[name] = importlib.util.module_from_spec(mspec)
            mspec.loader.exec_module(sys.modules[name])
        return sys.modules[name]


def parse_config(text: str):
    """config.pbtxt text -> ``inference.ModelConfig`` message (raises on unknown fields or bad syntax)."""
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_pb2().ModelConfig())


def _io(name: str, dtype: str, dims: list[int], optional: bool = False) -> str:
    opt = " optional: true" if optional else ""
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ]{opt} }}'


def _block(kind: str, items: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def render_configs(cfg: GPTConfig, max_batch: int = 16) -> dict[str, str]:
    kv = [cfg.n_kv_head, cfg.head_dim]
    onnx_cfg = (
        'name: "mini_gpt_onnx"\nplatform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch}  # Triton adds the batch axis in front of every dims below\n"
        + _block("input", [_io("input_ids", "TYPE_INT64", [-1])])
        + _block("output", [_io("logits", "TYPE_FP32", [-1, cfg.vocab_size])])
        + "# requests are batched only when their shapes match (same prompt length); see README\n"
        + f"dynamic_batching {{\n  preferred_batch_size: [ 4, 8, {max_batch} ]\n"
        + "  max_queue_delay_microseconds: 2000\n}\n"
        + "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
    )
    past, present = past_names(cfg.n_layer, "past"), past_names(cfg.n_layer, "present")
    decode_cfg = (
        'name: "mini_gpt_decode"\nplatform: "onnxruntime_onnx"\n'
        "max_batch_size: 0  # the batch axis is explicit: past/present carry it in dimension 0\n"
        + _block(
            "input",
            [_io("input_ids", "TYPE_INT64", [-1, -1]), _io("attention_mask", "TYPE_INT64", [-1, -1])]
            + [_io(n, "TYPE_FP32", [-1, kv[0], -1, kv[1]]) for n in past],
        )
        + _block(
            "output",
            [_io("logits", "TYPE_FP32", [-1, -1, cfg.vocab_size])]
            + [_io(n, "TYPE_FP32", [-1, kv[0], -1, kv[1]]) for n in present],
        )
        + "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
    )
    generate_cfg = (
        'name: "mini_gpt_generate"\nbackend: "python"\nmax_batch_size: 0\n'
        + _block(
            "input",
            [
                _io("prompt", "TYPE_STRING", [1]),
                _io("max_tokens", "TYPE_INT32", [1], True),
                _io("temperature", "TYPE_FP32", [1], True),
                _io("seed", "TYPE_INT64", [1], True),
            ],
        )
        + _block("output", [_io("text", "TYPE_STRING", [1])])
        + 'parameters { key: "decode_model" value: { string_value: "mini_gpt_decode" } }\n'
        + "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
    )
    return {"mini_gpt_onnx": onnx_cfg, "mini_gpt_decode": decode_cfg, "mini_gpt_generate": generate_cfg}


def prepare(model: GPT, tokenizer, repo: str | Path = REPO, max_batch: int = 16) -> Path:
    """Export both graphs into ``repo``, write the configs, the tokenizer and the model facts the Python backend needs."""
    repo = Path(repo)
    for name, text in render_configs(model.config, max_batch).items():
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        (repo / name / "config.pbtxt").write_text(text)
    export_full(model, repo / "mini_gpt_onnx" / "1" / "model.onnx")
    export_decode(model, repo / "mini_gpt_decode" / "1" / "model.onnx")
    gen = repo / "mini_gpt_generate" / "1"
    src = REPO / "mini_gpt_generate" / "1" / "model.py"  # the Python-backend code lives in the committed repository
    if src.resolve() != (gen / "model.py").resolve():
        shutil.copy(src, gen / "model.py")
    tokenizer.save(gen)  # gen/tokenizer.json, which model.py reads
    cfg = model.config
    facts = {"n_layer": cfg.n_layer, "n_kv_head": cfg.n_kv_head, "head_dim": cfg.head_dim, "block_size": cfg.block_size}
    (gen / "model_config.json").write_text(json.dumps(facts))
    return repo


def main(argv=None) -> Path:
    from ch01.pretrained import pretrained_char_model

    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--repo", default=str(REPO), help="model repository directory to fill")
    args = p.parse_args(argv)
    model, tok, _ = pretrained_char_model(args.preset, args.iters)
    repo = prepare(model.float().eval(), tok, args.repo)
    rows = [
        {"model": d.name, "files": ", ".join(sorted(str(f.relative_to(d)) for f in d.rglob("*") if f.is_file()))}
        for d in sorted(x for x in repo.iterdir() if x.is_dir())
    ]
    print(markdown_table(rows))
    return repo


if __name__ == "__main__":
    main()
