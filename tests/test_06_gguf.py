"""Chapter 06: GGUF export — our Q8_0/Q4_0 bytes == gguf's, the file reads back complete, RoPE permutation is exact,
and (where llama-cpp-python is installed) llama.cpp reproduces our model's logits and greedy text."""

import gguf
import numpy as np
import pytest
import torch

from ch01.functional import rope
from ch06.gguf_export import (
    QTYPES,
    dequantize_q4_0,
    dequantize_q8_0,
    export_gguf,
    gguf_roundtrip_model,
    gguf_tensors,
    permute_rope,
    quantize_q4_0,
    quantize_q8_0,
)

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tiny():
    from ch01.pretrained import pretrained_char_model

    model, tok, (_, val_ids) = pretrained_char_model("tiny", max_iters=200, verbose=False)
    return model, tok, val_ids


@pytest.fixture(scope="module")
def gguf_files(tiny, tmp_path_factory):
    model, tok, _ = tiny
    d = tmp_path_factory.mktemp("gguf")
    return {qt: export_gguf(model, tok, d / f"tiny-{qt}.gguf", qt) for qt in QTYPES}


def _hard_blocks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 256, generator=g) * torch.logspace(-3, 2, 48)[:, None]  # scales over five decades
    x[0, :32] = 0  # all-zero block (d = 0)
    x[1, :32] = 1.0
    x[1, 7] = -1.0  # |max| tie between +1 and -1: the first one wins in both implementations
    x[2] = torch.round(x[2] * 8) / 8  # many exact .5 ties after scaling
    x[3, :32] = torch.linspace(-127, 127, 32)  # values landing exactly on the int8 grid
    return x


@pytest.mark.parametrize("name,ours,qtype", [("q8_0", quantize_q8_0, Q.Q8_0), ("q4_0", quantize_q4_0, Q.Q4_0)])
def test_our_block_quantizers_are_bit_identical_to_gguf(name, ours, qtype):
    for x in (_hard_blocks(), torch.randn(7, 32 * 11)):
        mine, ref = ours(x), gguf.quants.quantize(x.numpy(), qtype)
        assert mine.dtype == np.uint8 and mine.shape == ref.shape
        assert mine.shape[1] == x.shape[1] // 32 * gguf.GGML_QUANT_SIZES[qtype][1]  # 34 or 18 bytes per 32
        assert np.array_equal(mine, ref)
        deq = (dequantize_q8_0 if name == "q8_0" else dequantize_q4_0)(mine, x.shape)
        assert np.array_equal(deq.numpy(), gguf.quants.dequantize(ref, qtype))


def _interleaved_rope(x, positions, theta):
    """llama.cpp's LLAMA_ROPE_TYPE_NORM: rotate adjacent pairs (2i, 2i+1) by position·θ_i."""
    D = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    ang = positions.float()[:, None] * inv_freq  # (T, D/2)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x0 * ang.cos() - x1 * ang.sin(), x0 * ang.sin() + x1 * ang.cos()], dim=-1)
    return out.flatten(-2)


def test_rope_permutation_makes_interleaved_rope_equal_rotate_half():
    n_head, D, C, T = 4, 16, 64, 10
    wq, wk, x = torch.randn(n_head * D, C), torch.randn(n_head * D, C), torch.randn(T, C)
    pos = torch.arange(T)

    def scores(q, k):  # (T, H·D) -> (H, T, T)
        return torch.einsum("thd,shd->hts", q.view(T, n_head, D), k.view(T, n_head, D))

    def heads(f, w):
        return f((x @ w.T).view(T, n_head, D).transpose(0, 1), pos, 1e4).transpose(0, 1).reshape(T, -1)

    ours = scores(heads(rope, wq), heads(rope, wk))
    llama = scores(
        heads(_interleaved_rope, permute_rope(wq, n_head)), heads(_interleaved_rope, permute_rope(wk, n_head))
    )
    assert torch.allclose(ours, llama, atol=1e-4)


def test_gguf_reads_back_with_every_tensor_and_key(tiny, gguf_files):
    model, tok, _ = tiny
    cfg = model.config
    expected = dict(gguf_tensors(model))
    for qt, path in gguf_files.items():
        r = gguf.GGUFReader(path)
        f = {k: v.contents() for k, v in r.fields.items()}
        assert f["general.architecture"] == "llama"
        assert f["llama.context_length"] == cfg.block_size and f["llama.embedding_length"] == cfg.n_embd
        assert f["llama.block_count"] == cfg.n_layer and f["llama.feed_forward_length"] == cfg.ffn_hidden
        assert f["llama.attention.head_count"] == cfg.n_head and f["llama.attention.head_count_kv"] == cfg.n_kv_head
        assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
        assert f["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta)
        assert f["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}[qt]
        assert f["tokenizer.ggml.model"] == "rwkv"
        assert "".join(f["tokenizer.ggml.tokens"]) == tok.chars
        assert len(f["tokenizer.ggml.scores"]) == len(f["tokenizer.ggml.token_type"]) == cfg.vocab_size
        tensors = {t.name: t for t in r.tensors}
        assert set(tensors) == set(expected)
        for name, w in expected.items():
            t = tensors[name]
            assert tuple(int(n) for n in t.shape) == tuple(reversed(w.shape))  # GGUF lists ne0 (row length) first
            want = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[qt] if w.ndim == 2 else Q.F32
            assert t.tensor_type == want
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
            tol = {Q.F32: 0, Q.F16: 1e-3, Q.Q8_0: 0.02, Q.Q4_0: 0.2}[t.tensor_type]
            assert np.abs(got - w.numpy()).max() <= tol * max(float(w.abs().max()), 1e-6)


def test_gguf_roundtrip_val_loss_close(tiny):
    from ch01.evaluate import evaluate_loss

    model, _, val_ids = tiny
    base = evaluate_loss(model, val_ids, max_batches=4)
    assert abs(evaluate_loss(gguf_roundtrip_model(model, "q8_0"), val_ids, max_batches=4) / base - 1) < 0.005
    assert abs(evaluate_loss(gguf_roundtrip_model(model, "q4_0"), val_ids, max_batches=4) / base - 1) < 0.05


def test_export_rejects_mismatched_tokenizer(tiny, tmp_path):
    from ch01.char_tokenizer import CharTokenizer

    model, _, _ = tiny
    with pytest.raises(ValueError, match="vocab_size"):
        export_gguf(model, CharTokenizer("abc"), tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="qtype"):
        export_gguf(model, CharTokenizer("abc"), tmp_path / "x.gguf", "q5_k")


# ------------------------------------------------------------------------------- llama.cpp (llama-cpp-python)
PROMPT = "ROMEO:\nBut soft, what light"


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


@pytest.mark.timeout(300)
def test_llama_cpp_tokenizes_and_detokenizes_our_vocab(llama_cpp, tiny, gguf_files):
    from ch06.gguf_export import load_llama_cpp

    model, tok, val_ids = tiny
    llm = load_llama_cpp(gguf_files["f32"], model.config.block_size, n_threads=2)
    text = tok.decode(val_ids[:500].tolist())  # real text: newlines, punctuation, capitals
    ids = llm.tokenize(text.encode(), add_bos=False)
    assert ids == tok.encode(text)
    assert llm.detokenize(ids).decode() == text
    assert llm.token_bos() == -1 and llm.token_eos() == -1  # no character is mistaken for BOS/EOS
    # text in, text out through llama.cpp's own sampler: greedy completion == our model's greedy decode
    out = llm.create_completion(PROMPT, max_tokens=20, temperature=0.0)["choices"][0]
    ours = model.generate(torch.tensor([tok.encode(PROMPT)]), 20, temperature=0)[0, len(PROMPT) :].tolist()
    assert out["finish_reason"] == "length" and out["text"] == tok.decode(ours)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("qtype,atol", [("f32", 1e-4), ("f16", 1e-3), ("q8_0", 1e-3), ("q4_0", 1e-3)])
def test_llama_cpp_logits_and_greedy_match_torch(llama_cpp, tiny, gguf_files, qtype, atol):
    from ch06.gguf_export import llama_cpp_greedy, llama_cpp_logits, load_llama_cpp

    model, tok, _ = tiny
    llm = load_llama_cpp(gguf_files[qtype], model.config.block_size, n_threads=2)
    ids = tok.encode(PROMPT)
    # the weights exactly as stored in the file; for Q8_0/Q4_0 also the Q8_0 rounding llama.cpp applies to activations
    reference = gguf_roundtrip_model(model, qtype, quantize_activations=True)
    with torch.no_grad():
        want = reference(torch.tensor([ids]))[0].numpy()  # (T, V)
    got = llama_cpp_logits(llm, ids)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < atol
    if qtype in ("f32", "f16"):  # the text itself: 32 greedy tokens identical to our fp32 model
        ours = model.generate(torch.tensor([ids]), 32, temperature=0)[0, len(ids) :].tolist()
        assert llama_cpp_greedy(llm, ids, 32) == ours
        default_kv = load_llama_cpp(gguf_files[qtype], model.config.block_size, n_threads=2, f32_kv_cache=False)
        # llama.cpp's default fp16 K/V cache: each K and V rounded to 11 significant bits (relative error <= 2^-11)
        # moves the logits by ~1e-3 on this model (measured 0.6-1.0e-3 between builds and training runs)
        assert np.abs(llama_cpp_logits(default_kv, ids) - want).max() < 3e-3
        assert llama_cpp_greedy(default_kv, ids, 32) == ours


# ------------------------------------------------------------------------------- byte-level BPE vocabulary ("gpt2")
BPE_TEXT = "ROMEO:\nWhat say'st thou, my lord? 1234 — café, naïve; 東京 🙂\n\nJULIET:\nAy me!"


@pytest.fixture(scope="module")
def bpe_gguf(tmp_path_factory):
    from ch01.bpe import Tokenizer, train_bpe
    from ch01.model import GPT, GPTConfig
    from common.data import load_shakespeare

    d = tmp_path_factory.mktemp("bpe")
    (d / "corpus.txt").write_text(load_shakespeare()[:100_000])
    vocab, merges = train_bpe(d / "corpus.txt", 320, ["<|endoftext|>"])
    tok = Tokenizer(vocab, merges, ["<|endoftext|>"])
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=len(tok.vocab), n_kv_head=2, init_std=0.1, block_size=128)).eval()
    return model, tok, export_gguf(model, tok, d / "bpe.gguf", "f32")


def test_bpe_vocab_metadata(bpe_gguf):
    model, tok, path = bpe_gguf
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].data) == len(tok.vocab) == model.config.vocab_size
    assert len(fields["tokenizer.ggml.merges"].data) == len(tok.merges)
    assert int(fields["tokenizer.ggml.bos_token_id"].parts[-1][0]) == tok.special_ids["<|endoftext|>"]


@pytest.mark.timeout(300)
def test_llama_cpp_runs_our_bpe_vocab(llama_cpp, bpe_gguf):
    from ch06.gguf_export import llama_cpp_greedy, llama_cpp_logits, load_llama_cpp

    model, tok, path = bpe_gguf
    llm = load_llama_cpp(path, model.config.block_size, n_threads=2)
    ids = tok.encode(BPE_TEXT)
    assert llm.tokenize(BPE_TEXT.encode(), add_bos=False, special=False) == ids  # same BPE, same ids
    assert llm.detokenize(ids).decode() == BPE_TEXT
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0].numpy()
    assert np.abs(llama_cpp_logits(llm, ids) - want).max() < 1e-4
    ours = model.generate(torch.tensor([ids[:8]]), 24, temperature=0)[0, 8:].tolist()
    assert llama_cpp_greedy(llm, ids[:8], 24) == ours
