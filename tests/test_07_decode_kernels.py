"""ch07 decode kernels: the small-batch GEMM equals torch's matmul (with the fused RMSNorm and residual add) for every
row count and odd shapes, in place on the residual; attention of T new tokens (RoPE, cache write, causal GQA) equals
torch's SDPA on ch01's RoPE; the torch fallbacks give the same numbers."""

import pytest
import torch
import torch.nn.functional as F

from ch01.functional import rope, rope_cache
from ch07 import decode_kernels
from ch07.decode_kernels import MAX_FAST_ROWS, PackedWeight, attend, main, swiglu

pytestmark = pytest.mark.usefixtures("one_thread")

needs_kernel = pytest.mark.skipif(decode_kernels.load_library() is None, reason="no C compiler: torch fallback only")


@needs_kernel
@pytest.mark.parametrize("K,N", [(256, 768), (64, 65), (33, 17), (1, 5), (40, 1)])
@pytest.mark.parametrize("M", [1, 2, 5, 6, 7, 12])
def test_kernel_equals_torch(M, K, N):
    torch.manual_seed(M * 1000 + K + N)
    W, x = torch.randn(K, N), torch.randn(M, K) * 3
    pw = PackedWeight(W)
    assert pw.lib is not None
    torch.testing.assert_close(pw(x), x @ W, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(pw(x, rms_eps=1e-5), F.rms_norm(x, (K,), None, 1e-5) @ W, atol=1e-4, rtol=1e-5)
    res = torch.randn(M, N)
    expected = res + F.rms_norm(x, (K,), None, 1e-5) @ W
    out = pw(x, residual=res, rms_eps=1e-5)
    assert out.data_ptr() == res.data_ptr()  # added in place: the residual stream is updated, not copied
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)


@needs_kernel
def test_non_contiguous_input_and_bad_residual():
    W = torch.randn(16, 24)
    pw = PackedWeight(W)
    x = torch.randn(16, 3).t()  # (3, 16), not contiguous
    torch.testing.assert_close(pw(x), x @ W, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="residual"):
        pw(x, residual=torch.randn(24, 3).t())


@needs_kernel
def test_fallback_matches_kernel_and_large_batches_use_torch():
    torch.manual_seed(0)
    W = torch.randn(48, 40)
    fallback, fast = PackedWeight(W, use_kernel=False), PackedWeight(W)
    assert fallback.lib is None
    for M in (1, 4, MAX_FAST_ROWS + 1, 64):  # above MAX_FAST_ROWS even the kernel object uses torch
        x, res = torch.randn(M, 48), torch.randn(M, 40)
        torch.testing.assert_close(fallback(x, rms_eps=1e-6), fast(x, rms_eps=1e-6), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            fallback(x, residual=res.clone()), fast(x, residual=res.clone()), atol=1e-5, rtol=1e-5
        )


def test_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("LLM_ROADMAP_NO_KERNELS", "1")
    decode_kernels.load_library.cache_clear()
    try:
        assert decode_kernels.load_library() is None
        assert PackedWeight(torch.randn(4, 4)).lib is None
    finally:
        monkeypatch.delenv("LLM_ROADMAP_NO_KERNELS")
        decode_kernels.load_library.cache_clear()


@needs_kernel
@pytest.mark.parametrize("H,Hkv,D", [(4, 4, 16), (4, 2, 32), (6, 3, 10), (2, 1, 64)])
@pytest.mark.parametrize("pos,T", [(0, 1), (0, 7), (37, 1), (37, 5), (20, 16)])
@pytest.mark.parametrize("scale", [1.0, 6.0], ids=["scores~N(0,D)", "scores~±500"])
def test_attend_equals_torch(H, Hkv, D, pos, T, scale):
    """RoPE (ch01's rope), cache write and causal grouped-query attention of T new tokens == the torch reference;
    large scores exercise the vectorised exp's range (near one-hot softmax, e^x underflowing to 0)."""
    torch.manual_seed(pos * 100 + T + D)
    L = 64
    cos, sin = rope_cache(D, torch.arange(L))
    ck, cv = torch.randn(2, Hkv, L, D) * scale, torch.randn(2, Hkv, L, D)  # batch row 0 is the sequence
    qkv = torch.randn(T, (H + 2 * Hkv) * D) * scale
    q, k, v = qkv.view(T, H + 2 * Hkv, D).split([H, Hkv, Hkv], dim=1)  # (T, heads, D) each
    positions = torch.arange(pos, pos + T)
    q_rot, k_rot = rope(q.transpose(0, 1), positions), rope(k.transpose(0, 1), positions)  # (heads, T, D)
    keys, values = ck[0].clone(), cv[0].clone()
    keys[:, pos : pos + T], values[:, pos : pos + T] = k_rot, v.transpose(0, 1)
    mask = torch.ones(T, pos + T, dtype=torch.bool).tril(pos)  # token t sees positions <= pos + t

    def sdpa(*tensors):  # q is taken as pre-scaled, as FusedDecoder folds 1/sqrt(D) into its weights
        q_, k_, v_ = tensors
        out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, scale=1.0, enable_gqa=True)  # (H, T, D)
        return out.transpose(0, 1).reshape(T, H * D)

    ref = sdpa(q_rot, keys[:, : pos + T], values[:, : pos + T])
    exact = sdpa(q_rot.double(), keys[:, : pos + T].double(), values[:, : pos + T].double())
    row1 = ck[1].clone()
    y = attend(qkv, ck, cv, cos.contiguous(), sin.contiguous(), pos, H, Hkv)
    torch.testing.assert_close(y, ref, atol=1e-5 * scale**2, rtol=1e-5)
    # float32 scores of ±500 carry ~1e-4 rounding: be about as close to float64 as torch's own float32 SDPA is, up to
    # one float32 rounding of the largest score (which of the two rounds luckier depends on the CPU's code path)
    scores = q_rot @ keys[:, : pos + T].repeat_interleave(H // Hkv, 0).transpose(1, 2)  # (H, T, S)
    score_ulp = torch.finfo(torch.float32).eps * scores.abs().max()
    assert (y.double() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max() + score_ulp
    torch.testing.assert_close(ck[0], keys, atol=1e-5 * scale, rtol=1e-6)  # rotated keys in the cache
    assert torch.equal(cv[0], values) and torch.equal(ck[1], row1)


@needs_kernel
def test_attend_rejects_mismatched_shapes():
    cos, sin = rope_cache(16, torch.arange(8))
    ck = cv = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="do not match"):  # 7 + 2 tokens do not fit a cache of 8
        attend(torch.randn(2, 8 * 16), ck, cv, cos.contiguous(), sin.contiguous(), 7, 4, 2)


def test_swiglu_equals_torch():
    gu = torch.randn(5, 2 * 40) * 4
    gate, up = gu.chunk(2, -1)
    torch.testing.assert_close(swiglu(gu), F.silu(gate) * up, atol=1e-5, rtol=1e-5)


def test_main_checks_the_kernel_against_torch_for_each_shape():
    rows = main(["--rows", "1", "5", "--repeats", "3"])  # main asserts kernel == x @ W before timing each shape
    assert [(r["in x out"], r["rows"]) for r in rows] == [
        (s, m) for s in ("256 x 768", "256 x 1408", "704 x 256") for m in (1, 5)
    ]
    assert all(r["torch x @ W (us)"] > 0 and r["packed kernel (us)"] > 0 for r in rows)
