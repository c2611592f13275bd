"""Chapter 06: RTN int8/int4 formats, bit packing, GPTQ (vs RTN and vs its own limiting case)."""

import pytest
import torch
import torch.nn as nn

from ch06.gptq import HessianHook, calibration_windows, gptq_quantize_weight
from ch06.quantize import (
    QuantLinear,
    dequantize_groupwise,
    dequantize_int8,
    model_size_bytes,
    pack_bits,
    quantize_groupwise,
    quantize_int8_per_channel,
    quantize_model,
    unpack_bits,
)


@pytest.fixture(scope="module")
def tiny():
    from ch01.pretrained import pretrained_char_model

    model, _, (train_ids, val_ids) = pretrained_char_model("tiny", max_iters=200, verbose=False)
    return model, train_ids, val_ids


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (24, 64), generator=g).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.numel() == codes.numel() * bits // 8  # dense: no wasted bits
    assert torch.equal(unpack_bits(packed, bits, codes.shape), codes)


def test_int4_two_values_per_byte_layout():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    assert pack_bits(codes, 4).tolist() == [1 | 2 << 4, 3 | 4 << 4, 5 | 6 << 4, 7 | 15 << 4]


def test_int8_per_channel_error_bound():
    w = torch.randn(32, 96) * torch.rand(32, 1) * 4
    q, scale = quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (dequantize_int8(q, scale) - w).abs()
    assert (err <= scale / 2 + 1e-6).all()  # round to nearest: at most half a step per weight
    assert torch.allclose(q.abs().amax(1).float(), torch.full((32,), 127.0))  # each row uses its full range


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 32), (4, 128), (4, None)])
def test_groupwise_error_bound_and_ragged_groups(bits, group):
    w = torch.randn(16, 352)  # 352 = the small model's FFN width: not a multiple of 128
    q, scale, zero = quantize_groupwise(w, bits, group)
    assert q.max() < 2**bits
    w_hat = dequantize_groupwise(q, scale, zero, group)
    g_idx = torch.arange(352) // min(group or 352, 352)
    assert ((w_hat - w).abs() <= scale[:, g_idx] / 2 + 1e-5).all()
    assert (w_hat[w == 0] == 0).all()  # zero stays exactly representable (pruned weights survive)


def test_quant_linear_matches_dequantized_weight_and_shrinks():
    lin = nn.Linear(128, 64, bias=False)
    x = torch.randn(3, 5, 128)
    for bits, group, max_bytes in [(8, None, 128 * 64 + 64 * 4), (4, 32, 128 * 64 // 2 + 2 * 64 * 4 * 5)]:
        ql = QuantLinear.from_linear(lin, bits, group)
        assert model_size_bytes(ql) <= max_bytes
        assert torch.allclose(ql(x), x @ ql.dequantized_weight().T, atol=1e-6)
        rel = (ql(x) - lin(x)).norm() / lin(x).norm()
        assert rel < (0.1 if bits == 4 else 0.01)


def _rtn_codes(w, bits, group):
    q, s, z = quantize_groupwise(w, bits, group)
    return dequantize_groupwise(q, s, z, group)


def test_gptq_8bit_codes_round_trip_through_quant_linear():
    w = torch.randn(16, 64)
    q, s, z, _ = gptq_quantize_weight(w, torch.eye(64), bits=8, group_size=32)
    assert q.max() > 127  # asymmetric 8-bit codes use the full [0, 255] range
    ql = QuantLinear.from_codes(q, s, z, 8, 32)
    assert torch.equal(ql.dequantized_weight(), dequantize_groupwise(q, s, z, 32))


def test_gptq_with_identity_hessian_is_rtn():
    """With H = I the inputs are uncorrelated, so there is nothing to compensate: GPTQ must reduce to RTN."""
    w = torch.randn(16, 64)
    q, s, z, _ = gptq_quantize_weight(w, torch.eye(64), bits=3, group_size=32, percdamp=0.0)
    assert torch.equal(dequantize_groupwise(q, s, z, 32), _rtn_codes(w, 3, 32))


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reduces_layer_output_error(bits, act_order):
    """GPTQ's objective ‖WX − ŴX‖² on correlated inputs: clearly below RTN's with the same format."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(64, 64, generator=g) * torch.logspace(0, -1.5, 64)  # anisotropic, correlated features
    x = torch.randn(2048, 64, generator=g) @ mix.T  # (N, in)
    w = torch.randn(32, 64, generator=g)
    hook = HessianHook(64)
    hook(None, (x,), None)
    assert torch.allclose(hook.H, 2 * x.T @ x / len(x), rtol=1e-4, atol=1e-4)
    q, s, z, g_idx = gptq_quantize_weight(w, hook.H, bits, 32, act_order=act_order)
    ql = QuantLinear.from_codes(q, s, z, bits, 32, g_idx)
    err_gptq = (x @ (ql.dequantized_weight() - w).T).pow(2).mean()
    err_rtn = (x @ (_rtn_codes(w, bits, 32) - w).T).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn


@pytest.mark.timeout(300)
def test_gptq_beats_rtn_val_loss_on_tiny_model(tiny):
    """The paper's claim on our model: same format (per-row ranges), GPTQ val loss < RTN at 4 and at 3 bits."""
    from ch01.evaluate import evaluate_loss

    model, train_ids, val_ids = tiny
    calib = calibration_windows(train_ids, 64, model.config.block_size)
    for bits in (4, 3):
        rtn = evaluate_loss(quantize_model(model, "rtn", bits, None), val_ids, max_batches=5)
        gptq = evaluate_loss(quantize_model(model, "gptq", bits, None, calib_ids=calib), val_ids, max_batches=5)
        assert gptq < rtn, (bits, gptq, rtn)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gptq_beats_rtn_clearly_on_a_better_trained_tiny_model():
    """Longer-trained tiny model (structured activations): GPTQ's margin over RTN is large, per-row and at 3-bit g32."""
    from ch01.evaluate import evaluate_loss
    from ch01.pretrained import pretrained_char_model

    model, _, (train_ids, val_ids) = pretrained_char_model("tiny", max_iters=1000, verbose=False)
    calib = calibration_windows(train_ids, 64, model.config.block_size)
    base = evaluate_loss(model, val_ids, max_batches=5)
    for bits, group in ((4, None), (3, None), (3, 32)):
        rtn = evaluate_loss(quantize_model(model, "rtn", bits, group), val_ids, max_batches=5) - base
        gptq = evaluate_loss(quantize_model(model, "gptq", bits, group, calib_ids=calib), val_ids, max_batches=5) - base
        assert gptq < 0.6 * rtn, (bits, group, gptq, rtn)  # GPTQ removes at least 40 % of RTN's loss increase


def test_int8_model_close_to_fp32(tiny):
    from ch01.evaluate import evaluate_loss

    model, _, val_ids = tiny
    base = evaluate_loss(model, val_ids, max_batches=5)
    q8 = quantize_model(model, "rtn", 8)
    assert abs(evaluate_loss(q8, val_ids, max_batches=5) / base - 1) < 0.005
    assert model_size_bytes(q8) < 0.5 * model_size_bytes(model)
    assert all(p.requires_grad for p in model.parameters())  # quantize_model works on a copy


def test_bad_input_messages():
    with pytest.raises(ValueError, match="bits"):
        QuantLinear(8, 8, bits=5, group_size=None)
    with pytest.raises(ValueError, match="method"):
        quantize_model(nn.Linear(2, 2), "awq", 4)


# ------------------------------------------------------------------------------------------------------ pruning
def test_pruning_masks_exact():
    from ch06.prune import is_n_m_sparse, magnitude_mask, n_m_mask, row_mask

    w = torch.randn(32, 64)
    w[0, :10] = 0.5  # ties
    for s in (0.25, 0.5, 0.7):
        assert int((~magnitude_mask(w, s)).sum()) == int(w.numel() * s)
        assert ((~row_mask(w.abs(), s)).sum(1) == int(64 * s)).all()  # Wanda: same sparsity in every row
    m = magnitude_mask(w, 0.5)
    assert w[m].abs().min() >= w[~m].abs().max()  # kept weights are the largest
    mask = n_m_mask(w.abs())
    assert is_n_m_sparse(w * mask) and (mask.reshape(32, 16, 4).sum(-1) == 2).all()
    a, mk = w.abs().reshape(32, 16, 4), mask.reshape(32, 16, 4)
    kept_min = torch.where(mk, a, torch.inf).amin(-1)
    dropped_max = torch.where(~mk, a, -torch.inf).amax(-1)
    assert (kept_min >= dropped_max).all()  # in each group of 4 the two largest survive


def test_prune_model_sparsity_counted_and_wanda_uses_activations(tiny):
    from ch06.prune import is_n_m_sparse, prune_model, sparsity_of

    model, train_ids, _ = tiny
    calib = calibration_windows(train_ids, 16, model.config.block_size)
    assert sparsity_of(model) == 0
    mag = prune_model(model, "magnitude", 0.5)
    wanda = prune_model(model, "wanda", 0.5, calib_ids=calib)
    assert sparsity_of(mag) == pytest.approx(0.5, abs=1e-3) and sparsity_of(wanda) == pytest.approx(0.5, abs=1e-3)
    w_mag, w_wanda = mag.blocks[0].attn.wq.weight, wanda.blocks[0].attn.wq.weight
    assert not torch.equal(w_mag == 0, w_wanda == 0)  # the activation norms change which weights go
    two_four = prune_model(model, "wanda", 0.5, "2:4", calib_ids=calib)
    assert all(
        is_n_m_sparse(m.weight) for m in two_four.modules() if isinstance(m, nn.Linear) and m is not two_four.lm_head
    )
    with pytest.raises(ValueError, match="calib"):
        prune_model(model, "wanda", 0.5)


# ------------------------------------------------------------------------------------------------- bitsandbytes
@pytest.mark.timeout(300)
def test_bitsandbytes_int8_and_nf4_on_cpu(tiny, caplog):
    pytest.importorskip("bitsandbytes")
    from ch01.evaluate import evaluate_loss
    from ch06.bnb import HFCausalLM, bnb_linear_types, load_bnb

    model, _, val_ids = tiny
    base = evaluate_loss(model, val_ids, max_batches=1)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    for mode, linear, tol in (("int8", "Linear8bitLt", 0.01), ("nf4", "Linear4bit", 0.05)):
        hf = load_bnb(model, mode)
        assert bnb_linear_types(hf) == {linear}  # the real bitsandbytes modules, not a fallback
        assert hf.get_memory_footprint() < fp32_bytes
        with caplog.at_level("WARNING"):
            loss = evaluate_loss(HFCausalLM(hf, model.config), val_ids, max_batches=1)
        assert abs(loss / base - 1) < tol
        assert not any("will be cast" in r.getMessage() for r in caplog.records)  # per-matmul warning silenced
