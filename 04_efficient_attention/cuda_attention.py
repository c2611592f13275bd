"""The CUDA C++ kernels in cuda/ (fused online softmax, tiled matmul, tiled attention forward), loaded into torch.

What it shows: the same tiling ideas as flash_triton.py written one level lower, in CUDA C++ — shared-memory tiles,
one thread per query row, the online softmax — and how to call such kernels from PyTorch with
``torch.utils.cpp_extension.load``. The kernels live in plain ``.cu`` files (no torch headers) so they compile on their
own with ``nvcc -c``; ``cuda/torch_binding.cpp`` is the thin layer that checks tensors and launches them.

Run:  python 04_efficient_attention/cuda_attention.py     (needs a CUDA GPU, a CUDA build of torch and nvcc; builds
                                                           once into .cache/, then compares each kernel with torch)
Without a GPU the script says so in one sentence; tests still compile the sources with nvcc when it is on PATH.
References: Milakov & Gimelshein 2018 (online softmax); Dao et al. 2022 (FlashAttention); PyTorch "Custom C++ and CUDA
Extensions" tutorial.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

from common.bench import hardware_info, markdown_table, timeit
from common.cli import base_parser
from common.data import cache_dir
from common.seed import seed_everything

CUDA_DIR = Path(__file__).resolve().parent / "cuda"
KERNEL_SOURCE = CUDA_DIR / "attention_kernels.cu"
BINDING_SOURCE = CUDA_DIR / "torch_binding.cpp"


def nvcc_compile(out_obj: Path, arch: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``nvcc -c attention_kernels.cu``: checks the kernels compile on their own (no GPU needed)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc is not on PATH; install the CUDA toolkit to compile cuda/*.cu")
    cmd = [nvcc, "-c", str(KERNEL_SOURCE), "-o", str(out_obj), "-O2", "-std=c++17"] + (
        [f"-arch={arch}"] if arch else []
    )
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _cuda_include() -> Path:
    """The CUDA toolkit's include folder (for cuda_runtime.h): $CUDA_HOME, $CUDA_PATH, next to nvcc, /usr/local/cuda."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates += [str(Path(nvcc).resolve().parent.parent)] if nvcc else []
    for root in filter(None, candidates):
        if (Path(root) / "include" / "cuda_runtime.h").exists():
            return Path(root) / "include"
    raise RuntimeError("cannot find the CUDA toolkit headers (cuda_runtime.h); set CUDA_HOME")


def binding_syntax_check(timeout: float = 900) -> subprocess.CompletedProcess:
    """Compile-check torch_binding.cpp against the installed torch headers (works with a CPU-only torch too)."""
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("need a C++ compiler (g++) to check the binding")
    includes = [*include_paths(), str(_cuda_include()), sysconfig.get_paths()["include"], str(CUDA_DIR)]
    cmd = [
        cxx,
        "-std=c++20",
        "-fsyntax-only",
        "-DTORCH_EXTENSION_NAME=ch04_cuda",
        *(f"-I{p}" for p in includes),
        str(BINDING_SOURCE),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def load_extension(verbose: bool = False):
    """Build (once, cached under .cache/) and import the extension; raises RuntimeError with the reason if impossible."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        raise RuntimeError("the CUDA kernels need a CUDA GPU and a CUDA build of torch")
    from torch.utils.cpp_extension import load

    return load(
        name="ch04_cuda_attention",
        sources=[str(BINDING_SOURCE), str(KERNEL_SOURCE)],
        extra_include_paths=[str(CUDA_DIR)],
        extra_cuda_cflags=["-O2"],
        build_directory=str(cache_dir("torch_extensions", "ch04")),
        verbose=verbose,
    )


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def softmax_rows(ext, x):
    return ext.softmax_rows(x, _stream())


def tiled_matmul(ext, a, b):
    return ext.tiled_matmul(a, b, _stream())


def flash_attention_forward(ext, q, k, v, causal: bool = False):
    """(out (B, H, N, D), lse (B, H, N)) from the CUDA tiled attention kernel; float32 only, D <= 128."""
    return ext.flash_attention_forward(q, k, v, causal, _stream())


def main(argv=None) -> dict:
    p = base_parser(__doc__, seed=True)
    p.add_argument("--seq-len", type=int, default=1024)
    args = p.parse_args(argv)
    try:
        ext = load_extension()
    except RuntimeError as e:
        print(f"Skipping the CUDA kernels: {e}.")
        return {"rows": [], "skipped": str(e)}
    seed_everything(args.seed)
    dev = torch.device("cuda")
    x = torch.randn(4096, 1000, device=dev)
    a, b = torch.randn(513, 257, device=dev), torch.randn(257, 385, device=dev)
    q, k, v = (torch.randn(2, 8, args.seq_len, 64, device=dev) for _ in range(3))
    rows = []
    checks = [
        ("softmax", lambda: softmax_rows(ext, x), lambda: torch.softmax(x, -1)),
        ("matmul", lambda: tiled_matmul(ext, a, b), lambda: a @ b),
        (
            "attention causal",
            lambda: flash_attention_forward(ext, q, k, v, True)[0],
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        ),
    ]
    for name, ours, ref in checks:
        err = (ours() - ref()).abs().max().item()
        rows.append(
            {
                "kernel": name,
                "max_err": err,
                "ours_ms": timeit(ours, device=dev).median * 1e3,
                "torch_ms": timeit(ref, device=dev).median * 1e3,
            }
        )
    print(hardware_info(dev))
    print(markdown_table(rows, floatfmt=".3g"))
    return {"rows": rows}


if __name__ == "__main__":
    main()
