"""LoRA and QLoRA from scratch (ch03.lora, ch03.nf4) against PEFT and bitsandbytes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ch01.model import GPT, GPTConfig
from ch03.lora import (
    ADAPTER_WEIGHTS,
    apply_lora,
    base_fingerprint,
    load_adapter,
    lora_layers,
    merge,
    merge_and_unload,
    peft_target_names,
    save_adapter,
    to_peft_state,
    unmerge,
)
from ch03.nf4 import (
    NF4Linear,
    apply_qlora,
    dequantize_nf4,
    dynamic_code,
    nf4_codebook,
    quantize_blockwise,
    quantize_nf4,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# QLoRA paper (Dettmers et al. 2023), appendix E: the NF4 data type's 16 values
PAPER_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip
TARGETS = ["wq", "wv", "w2"]


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)  # large init and GQA: a wrong mapping cannot hide behind tiny activations
    return GPT(GPTConfig.preset("tiny", vocab_size=97, n_kv_head=2, init_std=0.2)).eval()


def with_trained_adapter(model: GPT, targets=TARGETS, seed: int = 1) -> GPT:
    apply_lora(model, targets, rank=4, alpha=8)
    torch.manual_seed(seed)
    for layer in lora_layers(model).values():  # B = 0 at init would make every comparison trivial
        nn.init.normal_(layer.lora_B, std=0.1)
    return model


IDX = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))  # (B, T)


def peft_model(base: GPT, ours: GPT):
    peft = pytest.importorskip("peft", reason="PEFT parity needs peft")
    from ch01.hf_interop import to_hf

    suffixes = sorted({n.rsplit(".", 1)[-1] for n in peft_target_names(ours)})
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=suffixes)
    pm = peft.get_peft_model(to_hf(base), cfg)
    result = peft.set_peft_model_state_dict(pm, to_peft_state(ours))
    assert not result.unexpected_keys
    return pm.eval()


@torch.no_grad()
def test_outputs_and_merge_match_peft():
    base = tiny_gpt()
    ours = with_trained_adapter(copy.deepcopy(base))
    pm = peft_model(base, ours)
    assert (ours(IDX) - pm(input_ids=IDX).logits).abs().max() < 1e-5
    merged_hf = pm.merge_and_unload()
    merge_and_unload(ours)
    from ch01.hf_interop import weight_map

    theirs = merged_hf.state_dict()
    for name, hf_name in weight_map(ours.config).items():
        torch.testing.assert_close(ours.state_dict()[name], theirs[hf_name], rtol=0, atol=1e-6)
    assert not lora_layers(ours) and all(p.dtype == torch.float32 for p in ours.parameters())


@torch.no_grad()
def test_merge_unmerge_round_trip():
    model = with_trained_adapter(tiny_gpt())
    weights = {n: layer.base.weight.clone() for n, layer in lora_layers(model).items()}
    before = model(IDX)
    merge(model)
    assert all(not torch.equal(layer.base.weight, weights[n]) for n, layer in lora_layers(model).items())
    torch.testing.assert_close(model(IDX), before, rtol=0, atol=1e-5)  # merged W + ΔW computes the same function
    unmerge(model)
    for n, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.base.weight, weights[n], rtol=0, atol=1e-6)


def test_only_adapter_trains():
    model = with_trained_adapter(tiny_gpt())
    model.train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in trainable)
    assert len(trainable) == 2 * len(lora_layers(model)) == 2 * 2 * 3  # 3 targets × 2 layers of the tiny preset
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.loss(IDX[:, :-1], IDX[:, 1:]).backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad)


@torch.no_grad()
def test_dropout_only_in_training():
    from ch03.lora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 16, bias=False), rank=4, alpha=8, dropout=0.5)
    nn.init.normal_(layer.lora_B, std=0.5)
    x = torch.randn(4, 32)  # (B, in)
    expected = layer.base(x) + x @ layer.delta_weight().T  # eval: no dropout, y = W·x + ΔW·x
    torch.testing.assert_close(layer.eval()(x), expected, rtol=0, atol=1e-5)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))  # dropout on the LoRA branch's input
    assert (layer(x) - expected).abs().max() > 1e-3


@torch.no_grad()
def test_adapter_save_load(tmp_path):
    base = tiny_gpt()
    model = with_trained_adapter(copy.deepcopy(base))
    save_adapter(model, tmp_path)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / ADAPTER_WEIGHTS)).keys()
    assert keys and all(k.endswith((".lora_A", ".lora_B")) for k in keys)  # only the adapter is stored
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded(IDX), model(IDX), rtol=0, atol=0)
    assert base_fingerprint(loaded) == base_fingerprint(base)


def test_adapter_on_another_base_is_refused(tmp_path):
    save_adapter(with_trained_adapter(tiny_gpt(seed=0)), tmp_path)
    with pytest.raises(ValueError, match="trained on base model"):
        load_adapter(tiny_gpt(seed=1), tmp_path)


def test_target_that_matches_nothing_is_refused():
    with pytest.raises(ValueError, match="'q_proj' matches no linear layer"):
        apply_lora(tiny_gpt(), ["wq", "q_proj"])
    model = apply_lora(tiny_gpt(), [r"blocks\.0\.attn\.w[qv]"])  # a regex selects exactly what it names
    assert sorted(lora_layers(model)) == ["blocks.0.attn.wq", "blocks.0.attn.wv"]


# -------------------------------------------------------------------------------------------------------- NF4
def test_nf4_codebook_is_the_papers():
    torch.testing.assert_close(nf4_codebook(), torch.tensor(PAPER_NF4), rtol=0, atol=1e-6)


def bnb_functional():
    bnb = pytest.importorskip("bitsandbytes.functional", reason="NF4 parity needs bitsandbytes (CPU kernels ≥ 0.47)")
    return bnb


def test_nf4_codebook_and_dynamic_code_match_bitsandbytes():
    bnb = bnb_functional()
    torch.testing.assert_close(nf4_codebook(), bnb.get_4bit_type("nf4", device="cpu"), rtol=0, atol=1e-6)
    torch.testing.assert_close(dynamic_code(), bnb.create_dynamic_map(), rtol=0, atol=0)


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([packed.view(-1) >> 4, packed.view(-1) & 0xF], dim=1).view(-1)[:n].long()  # (n,)


@pytest.mark.parametrize("shape", [(64, 128), (33, 70), (96, 640)])
def test_nf4_bytes_match_bitsandbytes(shape):
    bnb = bnb_functional()
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ours = quantize_nf4(w, double_quant=False)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    torch.testing.assert_close(ours.absmax, state.absmax, rtol=0, atol=0)
    assert ours.packed.shape == packed.view(-1).shape
    a, b = _unpack(ours.packed, w.numel()), _unpack(packed, w.numel())
    differ = (a != b).nonzero().view(-1)
    # the codebooks agree to ~1e-7, so the two may only round differently a value sitting on a decision boundary
    assert len(differ) <= 2
    scaled = (w.reshape(-1) / ours.absmax.repeat_interleave(64)[: w.numel()]).double()  # (n,) in [-1, 1]
    code = nf4_codebook().double()
    for i in differ.tolist():
        assert abs(a[i] - b[i]) == 1 and abs(scaled[i] - (code[a[i]] + code[b[i]]) / 2) < 1e-6
    same = torch.ones(w.numel(), dtype=torch.bool)
    same[differ] = False
    deq, ref = dequantize_nf4(ours).view(-1), bnb.dequantize_4bit(packed, state).view(-1)
    torch.testing.assert_close(deq[same], ref[same], rtol=0, atol=1e-6)


def test_double_quant_error_bound_and_bitsandbytes():
    bnb = bnb_functional()
    w = torch.randn(300, 1024, generator=torch.Generator().manual_seed(1)) * 0.02  # 4800 blocks of 64
    q = quantize_nf4(w)
    _, absmax = quantize_blockwise(w, nf4_codebook(), 64)  # the fp32 scales double quantization replaces
    code = dynamic_code()
    half_gap = (code[1:] - code[:-1]).max() / 2
    err = (q.scales() - absmax).abs()  # (n_blocks,)
    bound = half_gap * q.absmax2.repeat_interleave(256)[: absmax.numel()] + 1e-7
    assert (err <= bound).all()  # nearest of 256 levels of the dynamic code, per block of 256 scales
    assert (err / absmax).max() < 0.02  # a few percent at most on the scales
    bits = 8 * q.nbytes() / w.numel()
    assert abs(bits - (4 + 8 / 64 + 32 / (64 * 256))) < 0.01  # ≈ 4.127 bits per parameter
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert abs(q.offset - state.offset.item()) < 1e-9
    torch.testing.assert_close(q.absmax2, state.state2.absmax, rtol=0, atol=0)
    # bitsandbytes' CPU kernel occasionally picks the second-nearest dynamic level; ours is never farther than it
    theirs = code[state.absmax.long()] * q.absmax2.repeat_interleave(256)[: absmax.numel()] + state.offset
    assert ((q.scales() - absmax).abs() <= (theirs - absmax).abs() + 1e-7).all()
    assert (q.absmax == state.absmax).float().mean() > 0.99
    deq, ref = dequantize_nf4(q), bnb.dequantize_4bit(packed, state)
    assert ((deq - ref).abs() <= 2 * half_gap * state.state2.absmax.max() + 1e-6).all()


# ------------------------------------------------------------------------------------------------------- QLoRA
def test_qlora_layer_is_dequantized_base_plus_lora():
    torch.manual_seed(0)
    linear = nn.Linear(128, 96, bias=False)
    model = nn.Sequential(linear)
    ref_w = dequantize_nf4(quantize_nf4(linear.weight))
    apply_qlora(model, ["0"], rank=4, alpha=8)
    layer = model[0]
    assert isinstance(layer.base, NF4Linear) and not list(layer.base.parameters())
    nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(3, 5, 128, requires_grad=True)  # (B, T, in)
    expected = F.linear(x, ref_w) + F.linear(F.linear(x, layer.lora_A), layer.lora_B) * 2.0  # α/r = 8/4
    y = model(x)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)
    y.sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None and x.grad is not None
    merged = merge_and_unload(model)[0]  # dequantize, then add ΔW
    torch.testing.assert_close(merged.weight, ref_w + layer.delta_weight().detach(), rtol=0, atol=1e-6)


@torch.no_grad()
def test_qlora_adapter_loads_on_the_float_base(tmp_path):
    base = tiny_gpt()
    q = apply_qlora(copy.deepcopy(base), TARGETS, rank=4, alpha=8)
    assert base_fingerprint(q) == base_fingerprint(base)
    for layer in lora_layers(q).values():
        nn.init.normal_(layer.lora_B, std=0.1)
    save_adapter(q, tmp_path)
    full = load_adapter(copy.deepcopy(base), tmp_path)  # the float model accepts the adapter trained on its NF4 copy
    for name, layer in lora_layers(full).items():
        assert torch.equal(layer.lora_A, lora_layers(q)[name].lora_A)
        assert torch.equal(layer.lora_B, lora_layers(q)[name].lora_B)
    logits = q(IDX)
    merge_and_unload(q)  # QLoRA's export path: dequantized base + ΔW in plain float layers
    torch.testing.assert_close(q(IDX), logits, rtol=0, atol=1e-4)


def test_scripts_report_sizes():
    from ch03.lora import main as lora_main
    from ch03.nf4 import main as nf4_main

    out = lora_main([])
    assert out["lora"] < out["full"] / 5 and out["unmerge_diff"] < 1e-5 and out["merged_diff"] < 1e-5
    rows = {r["method"].split()[0]: r for r in nf4_main([])["rows"]}
    assert rows["LoRA"]["trainable"] == rows["QLoRA"]["trainable"] < rows["full"]["trainable"]
    assert rows["QLoRA"]["bytes"] < rows["full"]["bytes"] < rows["LoRA"]["bytes"]


# ------------------------------------------------------------------------------------ export of a merged adapter
def _greedy_parity_in_llama_cpp(model, tok, ids: list[int], path, n_new: int) -> None:
    pytest.importorskip("llama_cpp", reason="llama.cpp parity needs llama-cpp-python")
    from ch06.gguf_export import export_gguf, llama_cpp_greedy, load_llama_cpp

    export_gguf(model, tok, path, "f32")
    llm = load_llama_cpp(path, n_ctx=len(ids) + n_new + 8, n_threads=1)
    ours = model.generate(torch.tensor([ids]), n_new, temperature=0)[0, len(ids) :].tolist()
    assert llama_cpp_greedy(llm, ids, n_new) == ours


def test_merged_adapter_exports_to_hf_and_gguf(tmp_path):
    from transformers import AutoModelForCausalLM

    from ch01.pretrained import pretrained_char_model
    from ch03.smollm2_lora import export_merged

    base, tok, _ = pretrained_char_model("tiny", max_iters=200, verbose=False)
    model = with_trained_adapter(copy.deepcopy(base))
    idx = torch.tensor([tok.encode("ROMEO:\nWhat say")])  # (1, T)
    with torch.no_grad():
        tuned = model(idx)
        assert (tuned - base(idx)).abs().max() > 1e-2  # the adapter changes the model
        hf = AutoModelForCausalLM.from_pretrained(export_merged(model, tok, tmp_path)).eval()
        torch.testing.assert_close(hf(input_ids=idx).logits, tuned, rtol=0, atol=1e-4)
    assert not lora_layers(model)
    _greedy_parity_in_llama_cpp(model, tok, idx[0].tolist(), tmp_path / "merged.gguf", 24)


@pytest.mark.slow
def test_smollm2_lora_script_and_llama_cpp_export(smollm2_path, tmp_path):
    from ch01.chat_template import apply_chat_template
    from ch03.lora import read_adapter_config
    from ch03.smollm2_lora import main

    args = ["--n-train", "30", "--n-test", "4", "--suite-test", "1", "--steps", "3", "--rank", "4"]
    out = main([*args, "--targets", "wq", "wv", "--out", str(tmp_path)])
    losses = out["sft_losses"]
    assert len(losses) == 3 and all(0 < v < 20 for v in losses)
    assert [r["stage"] for r in out["rows"]] == ["shipped", "LoRA SFT"]
    assert out["rows"][1]["trainable"] == 30 * 4 * ((576 + 576) + (576 + 192))  # 30 layers × r·(in+out) of q and v
    assert read_adapter_config(out["adapter"]).rank == 4
    model, tok = out["model"], out["tokenizer"]  # merged: plain float weights
    ids = apply_chat_template(tok, [{"role": "user", "content": "25+14=?"}])
    _greedy_parity_in_llama_cpp(model, tok, ids, tmp_path / "smollm2-lora.gguf", 8)
