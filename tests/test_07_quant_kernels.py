"""ch07 quantized decoding: the Q8_0 / Q4_0 / Q4_1 kernels against dequantize-then-matmul (exact input and Q8_0-rounded
input, llama.cpp's arithmetic), the block bytes against the ``gguf`` package's quantizers, the thread pool against one
thread, and whole decoders — quantized here or loaded from a GGUF's blocks — against ch01's model with the same
dequantized weights: greedy tokens equal with exact inputs; with Q8_0-rounded inputs, equal to the ch01 model whose
linear layers round their inputs the same way (chapter 06's llama.cpp emulation) on almost every position."""

import copy

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ch01.char_tokenizer import CharTokenizer
from ch01.generate import generate
from ch01.model import GPT, GPTConfig
from ch06.gguf_export import export_gguf, q8_0_activations
from ch07 import decode_kernels
from ch07.fused_decode import FusedDecoder
from ch07.quantized import QTYPES, QuantWeight, main, q8_round

pytestmark = pytest.mark.usefixtures("one_thread")
needs_kernel = pytest.mark.skipif(decode_kernels.load_library() is None, reason="no C compiler: torch fallback only")
GGML = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
GGML["q4_1"] = gguf.GGMLQuantizationType.Q4_1


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_blocks_are_ggufs_and_dequantize_like_gguf(qtype):
    w = torch.randn(24, 96) * torch.logspace(-2, 1, 24)[:, None]
    qw = QuantWeight.from_float(w, qtype)
    ref = gguf.quants.quantize(w.numpy(), GGML[qtype])
    np.testing.assert_array_equal(qw.blocks(), ref)  # split into scales + codes and back: the file's bytes
    torch.testing.assert_close(qw.dequantized(), torch.from_numpy(gguf.quants.dequantize(ref, GGML[qtype])))
    assert qw.nbytes == ref.nbytes


def test_q8_round_error_bound():
    x = torch.randn(5, 128) * 4
    err = (q8_round(x) - x).abs().view(5, 4, 32)
    amax = x.abs().view(5, 4, 32).amax(-1, keepdim=True)
    d = amax / 127
    assert (err <= d * (0.5 + 127 * 2**-11) + 1e-6).all()  # half a code step, + fp16's rounding of d times |q| <= 127
    assert err.max() > 0.4 * d.min()  # and it is that big: the input really is rounded


@needs_kernel
@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("M", [1, 2, 4, 5, 9])
@pytest.mark.parametrize("q8_input", [True, False])
def test_kernel_equals_dequantize_then_matmul(qtype, M, q8_input):
    torch.manual_seed(M)
    N, K = 40, 96
    W, x, gain, mult = torch.randn(N, K), torch.randn(M, K) * 3, torch.rand(K) + 0.5, torch.rand(N)
    qw = QuantWeight.from_float(W, qtype, gain=gain, row_mult=mult, q8_input=q8_input)
    h = F.rms_norm(x, (K,), gain, 1e-5)
    h = q8_round(h) if q8_input else h  # the kernel's input rounding, or none
    expected = h @ qw.dequantized().t() * mult
    torch.testing.assert_close(qw(x, rms_eps=1e-5), expected, atol=2e-5, rtol=1e-5)
    res = torch.randn(M, N)
    out = qw(x, residual=res, rms_eps=1e-5)
    assert out.data_ptr() == res.data_ptr()
    fallback = QuantWeight.from_float(W, qtype, gain=gain, row_mult=mult, q8_input=q8_input, use_kernel=False)
    torch.testing.assert_close(fallback(x, rms_eps=1e-5), expected, atol=2e-5, rtol=1e-5)
    if q8_input:  # the input rounding is small next to the product: ~1% of its scale
        exact = F.rms_norm(x, (K,), gain, 1e-5) @ qw.dequantized().t() * mult
        assert (qw(x, rms_eps=1e-5) - exact).abs().max() < 0.02 * exact.abs().max()


@needs_kernel
def test_two_threads_give_the_same_numbers():
    torch.manual_seed(0)
    W, x = torch.randn(300, 128), torch.randn(3, 128)
    qw, pw = QuantWeight.from_float(W, "q4_1"), decode_kernels.PackedWeight(W.t().contiguous())
    one = qw(x), pw(x)
    try:
        assert decode_kernels.set_threads(2) == 2
        two = qw(x), pw(x)
    finally:
        decode_kernels.set_threads(1)
    for a, b in zip(one, two):
        assert torch.equal(a, b)  # each output is summed by one thread in the same order


@needs_kernel
def test_concurrent_callers_share_the_pool_safely():
    """ctypes releases the GIL: two Python threads may run kernels at once (a server); the pool serves one of them,
    the other runs alone, and both get the right numbers."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(1)
    weights = [QuantWeight.from_float(torch.randn(256, 96), q) for q in ("q8_0", "q4_0")]
    xs = [torch.randn(2, 96) for _ in weights]
    expected = [w(x) for w, x in zip(weights, xs)]
    try:
        decode_kernels.set_threads(2)
        with ThreadPoolExecutor(2) as ex:
            for _ in range(20):
                outs = list(ex.map(lambda wx: wx[0](wx[1]), zip(weights, xs)))
                assert all(torch.equal(o, e) for o, e in zip(outs, expected))
    finally:
        decode_kernels.set_threads(1)


def test_bad_input():
    with pytest.raises(ValueError, match="qtype"):
        QuantWeight.from_float(torch.randn(4, 32), "q5_0")
    with pytest.raises(ValueError, match="multiple"):
        QuantWeight(np.zeros((4, 33), np.uint8), "q8_0")
    with pytest.raises(ValueError, match="features"):
        QuantWeight.from_float(torch.randn(4, 32), "q8_0")(torch.randn(1, 64))
    with pytest.raises(ValueError, match="quant"):
        FusedDecoder(GPT(GPTConfig.preset("tiny", vocab_size=65)), quant="int3")
    with pytest.raises(ValueError, match="threads"):
        decode_kernels.set_threads(0)


def _model(**kw):
    torch.manual_seed(0)
    cfg = GPTConfig.preset("tiny", vocab_size=65, block_size=96, **kw)
    model = GPT(cfg).eval()
    with torch.no_grad():  # larger weights than the init: decisive logits, like a trained model
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    return model


def _dequantized_copy(model, qtype, round_inputs=False):
    """ch01's model with every matrix replaced by its dequantized blocks (and inputs rounded to Q8_0 if asked)."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, torch.nn.Linear):
            with torch.no_grad():
                m.weight.copy_(QuantWeight.from_float(m.weight, qtype).dequantized())
            if round_inputs:
                m.register_forward_pre_hook(q8_0_activations)
    return ref


@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("kernels", [True, False])
def test_exact_input_decoder_gives_the_dequantized_models_tokens(qtype, kernels):
    model = _model(n_kv_head=2)  # grouped-query attention
    ref = _dequantized_copy(model, qtype)
    fast = FusedDecoder(model, kernels=kernels, quant=qtype, q8_input=False)
    x = torch.randint(0, 65, (2, 20))
    torch.testing.assert_close(fast(x), ref(x), atol=2e-4, rtol=1e-4)
    prompts = [[1, 2, 3, 4, 5], [7] * 11]
    assert generate(fast, prompts, 30, temperature=0) == generate(ref, prompts, 30, temperature=0)


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_q8_input_decoder_follows_llama_cpps_arithmetic(qtype):
    model = _model()
    ref = _dequantized_copy(model, qtype, round_inputs=True)  # chapter 06's emulation of llama.cpp's CPU matmuls
    fast = FusedDecoder(model, quant=qtype)
    x = torch.randint(0, 65, (1, 64))
    a, b = fast(x), ref(x)
    diff = (a - b).abs()
    assert diff.median() < 1e-5  # most logits equal to float32 rounding …
    assert diff.max() < 0.02 * a.abs().max()  # … the rest moved by an input code rounded the other way (~1%)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95


@needs_kernel
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_from_gguf_keeps_the_files_blocks(qtype, tmp_path):
    """Our own GGUF export (q/k rows permuted for llama.cpp's RoPE, GQA) read back as blocks = quantized here."""
    model = _model(n_kv_head=2)
    path = export_gguf(model, CharTokenizer("".join(chr(32 + i) for i in range(65))), tmp_path / "m.gguf", qtype)
    loaded, here = FusedDecoder.from_gguf(path), FusedDecoder(model, quant=qtype)
    assert loaded.weight_bytes_per_token() == here.weight_bytes_per_token()
    assert isinstance(loaded.tok_emb, QuantWeight)  # the file's embedding is quantized too (rows dequantized on lookup)
    here.tok_emb = loaded.tok_emb
    x = torch.randint(0, 65, (1, 24))
    torch.testing.assert_close(loaded(x), here(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_smollm2_from_its_gguf_gives_the_dequantized_models_tokens(smollm2, smollm2_path):
    model, tok = smollm2
    fast = FusedDecoder.from_gguf(smollm2_path, q8_input=False)  # Q4_1 blocks + a Q8_0 embedding, as shipped
    assert fast.weight_bytes_per_token() < 0.2 * sum(p.numel() * 4 for p in model.parameters())
    prompt = tok.encode("The capital of France is")
    assert generate(fast, prompt, 8, temperature=0) == generate(model, prompt, 8, temperature=0)


def test_main_runs():
    rows = main(["--rows", "1", "--repeats", "2"])
    assert len(rows) == 3 and all(r["q8_0 max err"] < 1e-3 for r in rows)
