"""ch07 ``bench_decode.py --llama-cpp``: our fused decoder and llama.cpp on the same GGUF files (F32 and Q8_0 exports
of a random model of the chapter's target shape). Checked: the bytes per token it divides by are the weights' sizes
in closed form (4 bytes per float, 34 bytes per 32 Q8_0 weights), and on the F32 file both engines greedy-decode the
same tokens. No timings are asserted."""

import pytest

from ch07.bench_decode import main
from ch07.fused_decode import weight_bytes_per_token

pytestmark = pytest.mark.usefixtures("one_thread")


def test_llama_cpp_table(monkeypatch):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (requirements-extra.txt)")
    argv = ["--llama-cpp", "--llama-models", "char", "--untrained", "--llama-quants", "f32", "q8_0"]
    rows = main(argv + ["--thread-counts", "1", "--llama-new-tokens", "6", "--repeats", "1", "--no-plot"])
    assert [r["weights"] for r in rows] == ["F32", "Q8_0"]
    from ch01.model import GPT, GPTConfig
    from ch07.models import TARGET

    model = GPT(GPTConfig.preset(TARGET["preset"], vocab_size=65, **TARGET["overrides"]))
    norms = 4 * sum(p.numel() for n, p in model.named_parameters() if "norm" in n)  # (tiny: not counted)
    n_matrix = (weight_bytes_per_token(model) - norms) / 4  # parameters read per token, the embedding table aside
    assert rows[0]["MB/token"] == pytest.approx(4 * n_matrix / 1e6)
    assert rows[1]["MB/token"] == pytest.approx(n_matrix * 34 / 32 / 1e6)  # every matrix's rows are 32-multiples
    assert rows[0]["same tokens"] == "6/6"


def test_vs_llama_cpp_plot_groups_thread_counts(tmp_path):
    from ch07.bench_decode import plot_vs_llama_cpp

    rows = [
        {"model": "char", "weights": w, "threads": t, "ours / llama.cpp": 0.9} for w in ("F32", "Q8_0") for t in (1, 2)
    ]
    assert plot_vs_llama_cpp(rows, tmp_path / "p.png").stat().st_size > 0
