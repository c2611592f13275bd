"""Decode-time kernels in ~200 lines of C: a small-batch matmul, and attention + RoPE + cache write in one call.

    from ch07.decode_kernels import PackedWeight, attend, swiglu
    w = PackedWeight(W)                            # W: (in, out) float32; packed once into column panels
    y = w(x)                                       # x (M, in) -> (M, out) == x @ W
    y = w(x, rms_eps=1e-5)                         # == F.rms_norm(x, (in,), None, 1e-5) @ W, the norm fused in
    x = w(h, residual=x)                           # == x + h @ W, added in place into x
    y = attend(qkv, k_cache, v_cache, cos, sin, pos, H, Hkv)   # T new tokens of one sequence: (T, H·D)

Decoding multiplies a few rows by every weight matrix: one row per step, k+1 rows when speculative decoding verifies
k draft tokens. Reading the weights should dominate, so k+1 rows should cost about one — but BLAS sgemm kernels are
tuned for large matrices, and on this project's CPU (AMD EPYC, AVX2, MKL via torch, one thread) ``x @ W`` with
5 rows took 2.5-3.7x the time of 1 row across runs — so a verify forward cost ~1.6 decode steps and ate most of
what speculation saves. ``decode_kernels.c`` packs each weight once into panels of 16 columns stored front to back
and reads every panel ONCE for up to 12 rows (accumulators in registers): 5 rows cost 1.3-1.5x one row there
(``python 07_inference_engineering/decode_kernels.py`` prints the table).
Like llama.cpp's and other inference engines' own matmul kernels, it trades generality for the decode shapes.

The rest of a decode step is many tiny operations — RoPE, two cache writes, the attention of one query row over the
cache, softmax, SwiGLU — each costing a few microseconds of torch dispatch whatever its size: ~20 calls per layer, the
whole cost of a small draft model's step. ``attend`` does RoPE, the cache write and causal (grouped-query) attention
for T new tokens in one call, ``swiglu`` the gate; the arithmetic is the same as the torch path (tests compare them).

``set_threads(n)`` (by default torch's intra-op thread count; ``FusedDecoder`` calls it at every forward) splits
each product's output columns over a small pthread pool that lives in ``quant_kernels.c`` — the quantized matmuls of
``ch07.quantized`` — which is built into the same library.

The C files are compiled on first use with the system C compiler (``cc -O3 -march=native``, ~1 s) into the cache
directory, keyed by the source and the CPU; without a compiler (or for more than ``MAX_FAST_ROWS`` rows, other dtypes
or devices) ``PackedWeight`` falls back to torch with the same results, so nothing depends on it being built.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from common.data import cache_dir, fingerprint

SOURCE = Path(__file__).with_name("decode_kernels.c")
QUANT_SOURCE = Path(__file__).with_name("quant_kernels.c")  # quantized matmuls + the thread pool: one library
MAX_FAST_ROWS = 12  # one pass over the weights for up to 12 rows; above that torch's sgemm is the better kernel


def _cpu_fingerprint() -> str:
    """-march=native code must not run on another CPU: key the build on the CPU model and its flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return "\n".join([platform.machine(), platform.processor(), *lines])


@lru_cache(maxsize=1)
def load_library():
    """The compiled kernel as a ctypes library, or None (with one warning) where it cannot be built."""
    if os.environ.get("LLM_ROADMAP_NO_KERNELS"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        warnings.warn("no C compiler found: ch07.decode_kernels falls back to torch", stacklevel=2)
        return None
    sources = [SOURCE, QUANT_SOURCE]
    key = fingerprint(*(s.read_text() for s in sources), _cpu_fingerprint(), compiler, length=16)
    lib_path = cache_dir("ch07", "kernels") / f"decode_kernels-{key}.so"
    if not lib_path.exists():
        with tempfile.TemporaryDirectory() as tmp:  # build aside, then one atomic rename: safe for parallel builds
            tmp_lib = Path(tmp) / lib_path.name
            cmd = [compiler, "-O3", "-march=native", "-shared", "-fPIC", *map(str, sources), "-o", str(tmp_lib)]
            cmd += ["-lm", "-lpthread"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                warnings.warn(
                    f"building the decode kernels failed, falling back to torch:\n{done.stderr}", stacklevel=2
                )
                return None
            os.replace(tmp_lib, lib_path)
    lib = ctypes.CDLL(str(lib_path))
    ptr, long = ctypes.c_void_p, ctypes.c_long
    lib.pack_weight.argtypes = [ptr, ptr, long, long]
    lib.small_gemm.argtypes = [ptr, ptr, ptr, long, long, long, ctypes.c_int, ctypes.c_int, ctypes.c_float]
    lib.panel_width.restype = long
    lib.swiglu.argtypes = [ptr, ptr, long, long]
    lib.attend.argtypes = [ptr] * 6 + [long] * 6
    lib.q_matmul.argtypes = [ctypes.c_int] + [ptr] * 5 + [long] * 3 + [ctypes.c_int] * 2 + [ctypes.c_float, ptr, ptr]
    lib.q_matmul.argtypes += [ctypes.c_int]
    lib.set_threads.argtypes = [ctypes.c_int]
    return lib


def set_threads(n: int | None = None) -> int:
    """Threads the C kernels use from now on (default: torch's intra-op thread count, so ``torch.set_num_threads``
    steers both); returns the number in effect (1 without the kernels)."""
    lib = load_library()
    n = torch.get_num_threads() if n is None else n
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    return 1 if lib is None else lib.set_threads(n)


def _cpu_float32(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def attend(qkv, k_cache, v_cache, cos, sin, pos: int, n_head: int, n_kv_head: int) -> torch.Tensor | None:
    """Attention of T new tokens of ONE sequence (batch row 0 of the cache), in one C call.

    qkv (T, (H + 2·Hkv)·D): the QKV projection of the new tokens, q pre-scaled by 1/sqrt(D), before RoPE (rotated in
    place). k_cache / v_cache (B, Hkv, L, D): the new keys/values are written at positions pos..pos+T-1. cos / sin:
    ch01's ``rope_cache`` tables (≥ pos+T rows, D). Returns y (T, H·D), causal softmax(q kᵀ) v over the cache, or None
    where the kernel is unavailable (the caller then takes its torch path)."""
    lib = load_library()
    if lib is None or not _cpu_float32(qkv, k_cache, v_cache, cos, sin):
        return None
    T, (_, Hkv, L, D) = qkv.shape[0], k_cache.shape
    if Hkv != n_kv_head or qkv.shape[1] != (n_head + 2 * Hkv) * D or pos + T > min(L, len(cos)):
        raise ValueError(f"attend: qkv {tuple(qkv.shape)} / cache {tuple(k_cache.shape)} / pos {pos} do not match")
    y = torch.empty(T, n_head * D)
    lib.attend(
        qkv.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        y.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        T,
        n_head,
        Hkv,
        D,
        L,
        pos,
    )
    return y


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """(T, 2F) -> (T, F): silu(gate) * up, as ``F.silu(gate) * up`` with ``gate, up = gate_up.chunk(2, -1)``."""
    lib = load_library()
    if lib is None or not _cpu_float32(gate_up):
        gate, up = gate_up.chunk(2, -1)
        return F.silu(gate).mul_(up)
    T, F2 = gate_up.shape
    out = torch.empty(T, F2 // 2)
    lib.swiglu(gate_up.data_ptr(), out.data_ptr(), T, F2 // 2)
    return out


class PackedWeight:
    """A constant (in, out) weight matrix, kept as is for torch and packed for the small-batch kernel."""

    def __init__(self, weight: torch.Tensor, use_kernel: bool = True):
        self.weight = weight.detach().contiguous()  # (K, N)
        self.in_features, self.out_features = self.weight.shape
        lib = load_library() if use_kernel else None
        self.lib = (
            lib if lib is not None and self.weight.dtype == torch.float32 and self.weight.device.type == "cpu" else None
        )
        if self.lib is not None:
            nb = self.lib.panel_width()
            K, N = self.weight.shape
            self.packed = torch.empty(-(-N // nb) * K * nb)  # (panels, K, nb) flattened
            self.lib.pack_weight(self.weight.data_ptr(), self.packed.data_ptr(), K, N)
            self._gemm, self._packed_ptr = self.lib.small_gemm, self.packed.data_ptr()  # hot path: no lookups

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None, rms_eps: float | None = None):
        """(M, in) -> (M, out): ``rmsnorm?(x) @ W``, plus ``residual`` (which is updated in place on the kernel path)."""
        M, K = x.shape
        if self.lib is None or M > MAX_FAST_ROWS or x.dtype != torch.float32 or x.device.type != "cpu":
            h = x if rms_eps is None else F.rms_norm(x, (K,), None, rms_eps)
            return h @ self.weight if residual is None else torch.addmm(residual, h, self.weight)
        x = x.contiguous()
        if residual is None:
            y, add = torch.empty(M, self.out_features), 0
        else:
            y, add = residual, 1
            if not (y.is_contiguous() and y.shape == (M, self.out_features)):
                raise ValueError(f"residual must be a contiguous ({M}, {self.out_features}) tensor")
        norm = rms_eps is not None
        self._gemm(x.data_ptr(), self._packed_ptr, y.data_ptr(), M, K, self.out_features, add, norm, rms_eps or 0.0)
        return y


def main(argv=None):
    """µs per call of torch's ``x @ W`` vs the packed kernel for the target's projection shapes and 1-7 rows."""
    from common.bench import hardware_info, markdown_table, timeit
    from common.cli import base_parser

    p = base_parser("small-batch GEMM: torch (MKL) vs the packed C kernel, microseconds per call", seed=True)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 5, 7])
    p.add_argument("--repeats", type=int, default=300)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    print("kernel:", "built" if load_library() is not None else "unavailable (torch fallback)")
    rows = []
    for K, N in [(256, 768), (256, 1408), (704, 256)]:  # the chapter target's QKV, gate+up and down projections
        W = torch.randn(K, N)
        pw = PackedWeight(W)
        for M in args.rows:
            x = torch.randn(M, K)
            torch.testing.assert_close(pw(x), x @ W, atol=1e-4, rtol=1e-5)
            fns = (lambda x=x, W=W: x @ W, lambda x=x, pw=pw: pw(x))
            blas, kernel = (timeit(fn, warmup=20, repeats=args.repeats).median * 1e6 for fn in fns)
            rows.append({"in x out": f"{K} x {N}", "rows": M, "torch x @ W (us)": blas, "packed kernel (us)": kernel})
    print(hardware_info(), "(1 thread; median per call)")
    print(markdown_table(rows, floatfmt=".1f"))
    return rows


if __name__ == "__main__":
    main()
