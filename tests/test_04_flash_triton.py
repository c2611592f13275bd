"""ch04.flash_triton: the Triton FlashAttention-2 kernels vs torch SDPA, forward and backward.

Without a GPU the kernels run in Triton's interpreter (ch04.flash_triton sets TRITON_INTERPRET=1 before defining them),
so the shapes here are small. The reference is SDPA in float64 on the same inputs; for fp16/bf16 our error must be within
a small factor of SDPA's own error in that dtype.
"""

import pytest
import torch
import torch.nn.functional as F

from ch04 import flash_triton as ft

DEVICE = "cuda" if not ft.INTERPRET else "cpu"


def _grads(fn, q, k, v, g):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), g))


def _errors(dtype, N, D, causal, blocks=None, B=1, H=2, N_k=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    N_k = N if N_k is None else N_k
    q = torch.randn(B, H, N, D, generator=gen)
    k, v = (torch.randn(B, H, N_k, D, generator=gen) for _ in range(2))
    g = torch.randn(B, H, N, D, generator=gen)
    low = [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]
    ours = _grads(lambda a, b, c: ft.flash_attention(a, b, c, causal, blocks=blocks), *low, g.to(DEVICE, dtype))
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    exact = _grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal), *ref_in, g.double())
    sdpa_low = _grads(
        lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal),
        *[x.detach().cpu().requires_grad_() for x in low],
        g.to(dtype),
    )
    ours_err = [(a.double().cpu() - e).abs().max().item() for a, e in zip(ours, exact)]
    sdpa_err = [(a.double() - e).abs().max().item() for a, e in zip(sdpa_low, exact)]
    return ours_err, sdpa_err


@pytest.mark.timeout(300)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("N,D", [(64, 16), (45, 32)])  # 45: ragged tail, masked rows and keys
def test_fp32_forward_backward_matches_sdpa(causal, N, D):
    ours, _ = _errors(torch.float32, N, D, causal)
    assert max(ours) < 1e-5, ours  # out, dq, dk, dv


@pytest.mark.timeout(300)
@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)])
def test_unequal_tiles_causal(blocks):
    """BLOCK_M != BLOCK_N exercises the causal loop bounds (the dK/dV kernel's first query block, the last key block)."""
    ours, _ = _errors(torch.float32, 70, 16, True, blocks=blocks)
    assert max(ours) < 1e-5, ours


@pytest.mark.timeout(300)
def test_non_power_of_two_head_dim_and_cross_attention_lengths():
    ours, _ = _errors(torch.float32, 33, 24, False, N_k=50)  # D=24 padded to 32 and masked; N_q != N_k
    assert max(ours) < 1e-5, ours


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_sdpa_error(dtype):
    ours, sdpa = _errors(dtype, 40, 32, True)
    for o, s in zip(ours, sdpa):
        assert o <= 4 * s + 1e-3, (ours, sdpa)


def test_lse_and_output_in_input_dtype():
    q = torch.randn(1, 1, 20, 16, device=DEVICE, dtype=torch.float16)
    out = ft.flash_attention(q, q, q, causal=True)
    assert out.dtype == torch.float16 and out.shape == q.shape


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(1, 1, 8, 8, device=DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        ft.flash_attention(q, q, q)
    q = torch.randn(1, 1, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="causal"):
        ft.flash_attention(q, torch.randn(1, 1, 9, 16, device=DEVICE), torch.randn(1, 1, 9, 16, device=DEVICE), True)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        ft.flash_attention(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="powers of two"):
        ft.flash_attention(q, q, q, blocks=(24, 16))


def test_registered_with_ch01_and_mask_falls_back_to_sdpa():
    from ch01.model import get_attention

    fn = get_attention("flash_triton")
    q, k, v = (torch.randn(1, 2, 10, 16, device=DEVICE) for _ in range(3))
    mask = torch.rand(1, 1, 10, 10, device=DEVICE) > 0.3
    mask[..., 0] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(fn(q, k, v, causal=False, attn_mask=mask), ref)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_script_main_meets_acceptance():
    res = ft.main([])
    assert res["rows"] and all(r["ok"] for r in res["rows"])
    assert max(max(r["out"], r["dq"], r["dk"], r["dv"]) for r in res["rows"]) <= 1e-4
    assert any(r["N"] % 16 for r in res["rows"]) and {r["causal"] for r in res["rows"]} == {True, False}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["window-causal", "window", "bigbird-causal"])
def test_block_sparse_triton_equals_dense_masked(kind):
    from ch04.sparse_attention import bigbird_pattern, dense_masked_attention, sliding_window_pattern
    from ch04.sparse_triton import block_sparse_attention_triton

    n = 70  # ragged: the last block is partial
    pattern = {
        "window-causal": sliding_window_pattern(n, 20, 16),
        "window": sliding_window_pattern(n, 20, 16, causal=False),
        "bigbird-causal": bigbird_pattern(n, 16, local=1, n_global=1, n_random=1),
    }[kind]
    q, k, v = (torch.randn(1, 2, n, 16, device=DEVICE) for _ in range(3))
    torch.testing.assert_close(
        block_sparse_attention_triton(q, k, v, pattern), dense_masked_attention(q, k, v, pattern), atol=1e-5, rtol=1e-5
    )


@pytest.mark.timeout(300)
@pytest.mark.skipif(not ft.INTERPRET, reason="only the interpreter path depends on import order")
def test_works_when_triton_was_imported_before_the_interpreter_was_switched_on():
    """bitsandbytes (and others) import triton early; ch04 must still run its kernels in the interpreter."""
    import os
    import subprocess
    import sys

    code = (
        "import triton, triton.language as tl, torch, torch.nn.functional as F\n"
        "from ch04.flash_triton import flash_attention\n"
        "q = torch.randn(1, 1, 20, 16)\n"
        "err = (flash_attention(q, q, q, True) - F.scaled_dot_product_attention(q, q, q, is_causal=True)).abs().max()\n"
        "print(type(tl.zeros).__name__, float(err))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=280)
    assert res.returncode == 0, res.stderr[-2000:]
    name, err = res.stdout.split()
    assert name == "InterpretedFunction" and float(err) < 1e-5


_AOT_SCRIPT = r"""
import os
os.environ["TRITON_INTERPRET"] = "0"  # compiled mode, even without a GPU: we only compile, never launch
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ch04 import flash_triton as ft, triton_kernels as tk

tt = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
scalars = {"qk_scale": "fp32", "sm_scale": "fp32", "H": "i32", "N_Q": "i32", "N_K": "i32", "HEAD_DIM": "i32"}
for dtype, D in [(torch.float16, 64), (torch.bfloat16, 128), (torch.float32, 128)]:
    BM, BN, _ = ft._blocks(D, dtype, None)
    meta = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=D, CAUSAL=True, FP32_DOT=False)
    for fn, ptrs in [(tk.flash_fwd_kernel, ["Q", "K", "V", "Out"]),
                     (tk.flash_bwd_dkdv_kernel, ["Q", "K", "V", "DO", "DK", "DV"]),
                     (tk.flash_bwd_dq_kernel, ["Q", "K", "V", "DO", "DQ"])]:
        names = fn.arg_names
        sig = {n: tt[dtype] if n in ptrs else "*fp32" if n in ("LSE", "DELTA") else scalars.get(n, "constexpr")
               for n in names}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=meta), target=GPUTarget("cuda", 90, 32))
        assert k.metadata.shared <= 227 * 1024, (fn.__name__, dtype, D, k.metadata.shared)
from ch04.sparse_triton import block_sparse_fwd_kernel as bs

meta = dict(BLOCK=64, BLOCK_D=64, CAUSAL=True, HAS_WINDOW=True, FP32_DOT=False)
sig = {n: "*fp16" if n in ("Q", "K", "V", "Out") else "*i32" if n == "LAYOUT" else "fp32" if n == "qk_scale"
       else "constexpr" if n in meta else "i32" for n in bs.arg_names}
triton.compile(ASTSource(fn=bs, signature=sig, constexprs=meta), target=GPUTarget("cuda", 90, 32))
print("compiled")
"""


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_kernels_compile_for_h100_without_a_gpu():
    """Ahead-of-time compile (Triton -> PTX -> cubin for sm_90) of the GPU tile configs: catches errors the interpreter
    cannot (types across loop-carried values, shared-memory budget) on a machine with no GPU."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, timeout=1150)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
