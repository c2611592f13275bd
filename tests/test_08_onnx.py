"""Chapter 08 ONNX export: onnxruntime vs torch (logits, KV outputs, greedy decoding), int8, the ORT server backend."""

import numpy as np
import pytest
import torch

from ch01.evaluate import evaluate_loss
from ch01.pretrained import pretrained_char_model
from ch08.export_onnx import (
    DecodeGraph,
    export_decode,
    export_full,
    ort_decode,
    ort_greedy,
    ort_session,
    ort_val_loss,
    quantize_int8,
)
from ch08.triton_server.prepare_repo import REPO, model_config_pb2, parse_config, render_configs


@pytest.fixture(scope="module")
def tiny():
    model, tok, (_, val_ids) = pretrained_char_model("tiny", 200, verbose=False)
    return model, tok, val_ids


@pytest.fixture(scope="module")
def decode_path(tiny, tmp_path_factory):
    return export_decode(tiny[0], tmp_path_factory.mktemp("onnx") / "decode.onnx")


@pytest.mark.timeout(600)
def test_decode_graph_matches_torch_and_greedy_decoding(tiny, decode_path):
    model, tok, _ = tiny
    sess = ort_session(decode_path)
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    # dynamic batch / seq / past, including past = 0 (prefill), one-token steps and left padding
    for B, T, P in [(1, 5, 0), (3, 1, 7), (2, 4, 9), (5, 1, 40)]:
        ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
        mask = torch.ones(B, P + T, dtype=torch.long)
        mask[0, : min(3, P)] = 0  # row 0 is left-padded
        past = [torch.randn(B, cfg.n_kv_head, P, cfg.head_dim, generator=gen) for _ in range(2 * cfg.n_layer)]
        with torch.no_grad():
            ref = DecodeGraph(model)(ids, mask, *past)
        logits, present = ort_decode(sess, ids.numpy(), mask.numpy(), [p.numpy() for p in past])
        assert np.abs(logits - ref[0].numpy()).max() <= 1e-4
        assert all(np.abs(o - r.numpy()).max() <= 1e-4 for o, r in zip(present, ref[1:]))
        assert present[0].shape == (B, cfg.n_kv_head, P + T, cfg.head_dim)
    prompt = torch.tensor([tok.encode("ROMEO:\n"), tok.encode("Nurse:\n")])
    with torch.no_grad():
        want = model.generate(prompt, 40, temperature=0.0)
    assert torch.equal(ort_greedy(sess, model, prompt, 40), want)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_full_graph_parity_and_int8_val_loss(tiny, tmp_path):
    model, _, val_ids = tiny
    path = export_full(model, tmp_path / "model.onnx")
    sess = ort_session(path)
    for B, T in [(1, 1), (3, 17), (2, model.config.block_size)]:
        x = torch.randint(0, model.config.vocab_size, (B, T))
        with torch.no_grad():
            assert np.abs(sess.run(None, {"input_ids": x.numpy()})[0] - model(x).numpy()).max() <= 1e-4
    ref = evaluate_loss(model, val_ids, max_batches=4)
    assert abs(ort_val_loss(sess, val_ids, model.config.block_size, max_batches=4) - ref) < 1e-4
    full_cfg = parse_config(render_configs(model.config)["mini_gpt_onnx"])  # Triton: batch axis implicit
    check_config_against_onnx(full_cfg, sess, batch_axis_implicit=True)
    q = ort_session(quantize_int8(path, tmp_path / "model.int8.onnx"))
    int8 = ort_val_loss(q, val_ids, model.config.block_size, max_batches=4)
    assert int8 != ref and abs(int8 - ref) < 0.05  # quantized (not identical) yet close


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_server_onnxruntime_backend_matches_torch(tiny, decode_path):
    import openai

    from ch08.serve_thread import ServerThread
    from ch08.server import build_state

    model, tok, _ = tiny
    state = build_state(
        model, tok, "tiny", backend="onnxruntime", max_batch=4, onnx_path=str(decode_path), shutdown_timeout=1.0
    )
    with ServerThread(state) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        for prompt in ["ROMEO:", "First Citizen:\n"]:
            text = c.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0).choices[0].text
            ref = model.generate(torch.tensor([tok.encode(prompt)]), 30, temperature=0.0)[0, len(prompt) :]
            assert text == tok.decode(ref.tolist())


# ------------------------------------------------------------------------------------- Triton Inference Server repo
ORT_TO_TRITON = {"tensor(int64)": "TYPE_INT64", "tensor(float)": "TYPE_FP32"}


def check_config_against_onnx(config, sess, batch_axis_implicit: bool):
    pb2 = model_config_pb2()
    for declared, actual in [(config.input, sess.get_inputs()), (config.output, sess.get_outputs())]:
        assert [t.name for t in declared] == [a.name for a in actual]
        for t, a in zip(declared, actual):
            assert pb2.DataType.Name(t.data_type) == ORT_TO_TRITON[a.type], t.name
            onnx_dims = [d if isinstance(d, int) else -1 for d in a.shape]  # symbolic axes -> -1
            assert ([-1] if batch_axis_implicit else []) + list(t.dims) == onnx_dims, t.name


def test_triton_configs_parse_and_match_the_onnx_graph(tiny, decode_path):
    from ch01.model import GPTConfig

    committed = {d.name: (d / "config.pbtxt").read_text() for d in REPO.iterdir() if (d / "config.pbtxt").exists()}
    assert committed == render_configs(GPTConfig.preset("small", vocab_size=65))  # the repo = small char model
    for name, text in committed.items():
        config = parse_config(text)  # raises on any unknown field / bad syntax
        assert config.name == name
    assert parse_config(committed["mini_gpt_onnx"]).dynamic_batching.max_queue_delay_microseconds > 0
    generate = parse_config(committed["mini_gpt_generate"])
    assert generate.backend == "python" and generate.parameters["decode_model"].string_value == "mini_gpt_decode"
    decode = parse_config(render_configs(tiny[0].config)["mini_gpt_decode"])
    check_config_against_onnx(decode, ort_session(decode_path), batch_axis_implicit=decode.max_batch_size > 0)


class FakeTritonUtils:
    """Just enough of ``triton_python_backend_utils`` to run model.py: BLS calls go to an onnxruntime session."""

    def __init__(self, sessions):
        sessions_ = sessions

        class Tensor:
            def __init__(self, name, array):
                self._name, self._array = name, np.asarray(array)

            def name(self):
                return self._name

            def as_numpy(self):
                return self._array

        class Response:
            def __init__(self, output_tensors=(), error=None):
                self.output_tensors, self.error_ = list(output_tensors), error

            def has_error(self):
                return self.error_ is not None

            def error(self):
                return self.error_

        class InferenceRequest:
            def __init__(self, model_name, inputs, requested_output_names):
                self.model_name, self.inputs, self.outputs = model_name, inputs, requested_output_names

            def exec(self):
                sess = sessions_[self.model_name]
                out = sess.run(self.outputs, {t.name(): t.as_numpy() for t in self.inputs})
                return Response([Tensor(n, o) for n, o in zip(self.outputs, out)])

        class TritonError:
            def __init__(self, msg):
                self.msg = msg

            def message(self):
                return self.msg

        self.Tensor, self.InferenceRequest, self.InferenceResponse = Tensor, InferenceRequest, Response
        self.TritonError, self.TritonModelException = TritonError, RuntimeError
        self.get_output_tensor_by_name = lambda r, n: next(t for t in r.output_tensors if t.name() == n)
        self.get_input_tensor_by_name = lambda r, n: r.inputs.get(n)


def test_triton_python_backend_generates_like_torch(tiny, decode_path, tmp_path, monkeypatch):
    import importlib.util
    import json
    import shutil
    import types

    model, tok, _ = tiny
    gen_dir = tmp_path / "mini_gpt_generate" / "1"
    gen_dir.mkdir(parents=True)
    shutil.copy(REPO / "mini_gpt_generate" / "1" / "model.py", gen_dir / "model.py")
    tok.save(gen_dir)
    cfg = model.config
    (gen_dir / "model_config.json").write_text(
        json.dumps(
            {"n_layer": cfg.n_layer, "n_kv_head": cfg.n_kv_head, "head_dim": cfg.head_dim, "block_size": cfg.block_size}
        )
    )
    fake = FakeTritonUtils({"mini_gpt_decode": ort_session(decode_path)})
    monkeypatch.setitem(__import__("sys").modules, "triton_python_backend_utils", fake)
    spec = importlib.util.spec_from_file_location("triton_generate_model", gen_dir / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    backend = module.TritonPythonModel()
    config = parse_config(render_configs(cfg)["mini_gpt_generate"])
    from google.protobuf import json_format

    backend.initialize({"model_config": json_format.MessageToJson(config, preserving_proto_field_name=True)})
    requests = [
        types.SimpleNamespace(
            inputs={
                "prompt": fake.Tensor("prompt", np.array([b"ROMEO:"], dtype=object)),
                "max_tokens": fake.Tensor("max_tokens", np.array([30], np.int32)),
            }
        ),
        types.SimpleNamespace(
            inputs={"prompt": fake.Tensor("prompt", np.array(["\u00e9t\u00e9".encode()], dtype=object))}
        ),
    ]
    ok, bad = backend.execute(requests)
    text = fake.get_output_tensor_by_name(ok, "text").as_numpy()[0].decode()
    ref = model.generate(torch.tensor([tok.encode("ROMEO:")]), 30, temperature=0.0)[0, 6:]
    assert text == tok.decode(ref.tolist())
    assert bad.has_error() and "vocabulary" in bad.error().message()
