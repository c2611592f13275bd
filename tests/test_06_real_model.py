"""Chapter 06 on a real model: the block-by-block GPTQ / Wanda driver gives exactly what gptq.py / prune.py give on
the whole model, size accounting matches a real GGUF file, and on SmolLM2-135M our Q8_0 costs < 1 % bits per byte while
RTN int3 costs a lot, with F32 answering "The capital of France is Paris"."""

import pytest
import torch

from ch06.gguf_export import export_gguf
from ch06.gptq import calibration_windows
from ch06.prune import prune_model
from ch06.quantize import QuantLinear, quantizable_linears, quantize_model
from ch06.real_model import (
    OneBlock,
    calibration_ids,
    gguf_size_bytes,
    gptq_blockwise,
    main,
    materialize,
    wanda_2_4_blockwise,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    from ch01.pretrained import pretrained_char_model

    model, tok, (train_ids, _) = pretrained_char_model("tiny", max_iters=200, verbose=False)
    return model, tok, calibration_windows(train_ids, 16, model.config.block_size, seed=0)


@torch.no_grad()
def test_one_block_chain_is_the_model(tiny):
    model, _, calib = tiny
    x = model.tok_emb(calib)
    for i in range(model.config.n_layer):
        x = OneBlock(model, i)(x)
    assert torch.equal(model.lm_head(model.norm(x)), model(calib))


def test_blockwise_gptq_and_wanda_equal_the_whole_model_versions(tiny):
    model, _, calib = tiny
    ours = gptq_blockwise(model, calib, 3, 32, batch_size=32)
    ref = quantize_model(model, "gptq", 3, 32, calib_ids=calib, batch_size=32)
    for name, q in quantizable_linears(ref).items():
        mine = ours.get_submodule(name)
        assert torch.equal(mine.qweight, q.qweight) and torch.equal(mine.scale, q.scale), name
    logits = ours(calib[:2])
    assert not torch.equal(logits, model(calib[:2]))  # it did quantize
    assert torch.equal(materialize(ours)(calib[:2]), logits)  # plain Linear layers holding the dequantized weights
    assert not any(isinstance(m, QuantLinear) for m in ours.modules())
    pruned = wanda_2_4_blockwise(model, calib, batch_size=32)
    ref = prune_model(model, "wanda", 0.5, "2:4", calib_ids=calib, batch_size=32)
    for name, lin in quantizable_linears(ref).items():
        assert torch.equal(pruned.get_submodule(name).weight, lin.weight), name


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_gguf_size_bytes_is_the_files_tensor_data(tiny, qtype, tmp_path):
    model, tok, _ = tiny
    size = export_gguf(model, tok, tmp_path / "m.gguf", qtype).stat().st_size
    assert 0 < size - gguf_size_bytes(model, qtype) < 16_384  # the rest: header, metadata, tensor infos, padding


def test_main_on_smollm2(smollm2, capsys):
    argv = ["--methods", "q8_0", "rtn3", "--eval-chars", "300", "--max-new", "8", "--no-plot", "--device", "cpu"]
    rows = {r["key"]: r for r in main(argv, loaded=smollm2)}
    out = capsys.readouterr().out
    f32, q8, rtn3 = rows["f32"], rows["q8_0"], rows["rtn3"]
    for text in ("shakespeare", "readme"):
        assert 0.3 < f32[f"bpb {text}"] < 3.0  # a real language model, well below 8 bits/byte of a uniform guess
        assert abs(q8[f"bpb {text}"] / f32[f"bpb {text}"] - 1) < 0.01  # Q8_0 costs < 1 %
        assert rtn3[f"bpb {text}"] > 1.05 * f32[f"bpb {text}"]  # 3 bits round-to-nearest costs far more
    assert f32["greedy reply"].startswith("The capital of France is Paris")
    assert f32["1st"] == "The" and f32["margin"] == pytest.approx(f32["logit_1"] - f32["logit_2"])
    assert 8.4 < q8["bits/weight"] < 8.6 and f32["bits/weight"] == 32 and q8["linears b/w"] == 8.5
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # (out, in)
    bits = sum(o * i * 3 + o * -(-i // 128) * (32 + 8) for o, i in shapes) / sum(o * i for o, i in shapes)
    assert rtn3["linears b/w"] == pytest.approx(bits)  # packed codes + fp32 scale, uint8 zero per (ragged) group
    assert "| GGUF Q8_0 (ours) |" in out and "cores" in out  # the table and its hardware line


def test_calibration_sources(smollm2):
    from common.data import load_shakespeare, train_val_split

    model, tok = smollm2
    shakespeare = calibration_ids(model, tok, 3, 16, seed=0)
    assert (
        shakespeare.shape == (3, 16) and tok.decode(shakespeare[0].tolist()) in train_val_split(load_shakespeare())[0]
    )
    generated = calibration_ids(model, tok, 2, 6, seed=0, source="generated")
    assert generated.shape == (2, 6) and generated[:, 0].tolist() == [tok.special_ids["<|endoftext|>"]] * 2
    assert torch.equal(generated, calibration_ids(model, tok, 2, 6, seed=0, source="generated"))  # seeded
