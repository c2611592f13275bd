"""ch07's fused decoder on a real LLM: ``fused_decode.py --model smollm2-135m-instruct`` greedy-decodes a chat prompt
with ch01's forward, FusedDecoder's torch path and its C kernels, token for token the same; llama.cpp on the model's
own Q4_1 GGUF (the file our float32 weights were dequantized from) starts the same reply."""

import pytest

from ch01.model import GPT, GPTConfig
from ch07.fused_decode import main, weight_bytes_per_token

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fused_decoder_gives_ch01s_tokens_on_smollm2(smollm2, capsys):
    argv = ["--model", "smollm2-135m-instruct", "--new-tokens", "4", "--repeats", "1"]
    results = main(argv, loaded=smollm2)
    assert results["FusedDecoder, torch"][1] and results["FusedDecoder, C kernels"][1]  # same greedy tokens as ch01
    out = capsys.readouterr().out
    assert "ch01's greedy reply: 'Generating text" in out  # a real model answering the chat prompt
    assert "538.1 MB of weights read per token" in out and "cores" in out  # 134.5M float32 weights; hardware line
    llama = [name for name in results if name.startswith("llama.cpp")]
    if llama:  # llama-cpp-python installed: Q8 activations and an f16 KV cache, yet the same first tokens
        assert results[llama[0]][1]


def test_weight_bytes_per_token_is_the_same_tied_or_not():
    """A decode step reads the output matrix whole and one row of the embedding table, whether the two are one
    tensor (SmolLM2) or two."""
    tied, untied = (GPT(GPTConfig.preset("tiny", tie_weights=t)) for t in (True, False))
    assert (
        weight_bytes_per_token(tied) == weight_bytes_per_token(untied) == 4 * sum(p.numel() for p in tied.parameters())
    )
