"""Chapter 08 ONNX export: onnxruntime vs torch (logits, KV outputs, greedy decoding), int8, the ORT server backend."""

import numpy as np
import pytest
import torch

from ch01.pretrained import pretrained_char_model, val_loss
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
    ref = val_loss(model, val_ids, max_batches=4)
    assert abs(ort_val_loss(sess, val_ids, model.config.block_size, max_batches=4) - ref) < 1e-4
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
