"""SmolLM2 in our model vs llama.cpp: exported to an F32 GGUF by chapter 06's writer (with its tokenizer and chat
template), llama.cpp reads back the same vocabulary and generates exactly our greedy tokens; on the original Q4_1 file
its teacher-forced top-1 choice mostly agrees with our F32 weights."""

from __future__ import annotations

import gguf
import pytest

from ch06.llama_cpp_parity import main

pytest.importorskip("llama_cpp", reason="llama.cpp parity needs llama-cpp-python (requirements-extra.txt)")


def test_f32_export_greedy_identical_and_q4_1_mostly_agrees(smollm2, tmp_path):
    model, tok = smollm2
    out = main(["--prompts", "1", "--new-tokens", "10", "--positions", "64", "--out", str(tmp_path)], loaded=smollm2)
    assert [r["identical tokens"] for r in out["greedy"]] == ["10/10"]
    assert out["greedy"][0]["answer"] == "The capital of France is Paris."
    assert out["q4_1_top1_agreement"] > 0.85  # Q4_1 activations/KV rounding flips only near-ties
    first = {r["weights"]: r["1st token"] for r in out["first_token"]}
    assert first["ours, F32"] == first["llama.cpp F32 export"] == "'The'"
    meta = gguf.GGUFReader(out["f32_path"])
    assert meta.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert meta.fields["tokenizer.chat_template"].contents() == tok.chat_template
    assert meta.fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_id
