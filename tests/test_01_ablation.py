"""ch01 ``bench_ablation.py``: each piece is a real switch (its cache and parameters change as its paper says), the
combination is built from the pieces that won, and a short run gives one row per variant. No timings are asserted."""

import math

import pytest

from ch01.bench_ablation import BASELINE, PIECES, cache_kib, combination, main, model_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_piece_changes_the_decode_cache_as_its_paper_says():
    kib = {n: cache_kib(model_config(PIECES[n][0], 65), n_tokens=128) for n in PIECES}
    base = kib[BASELINE]  # 4 layers x (k + v) x 4 heads x 32 dims x 128 tokens x 4 bytes
    assert base == pytest.approx(4 * 2 * 128 * 128 * 4 / 1024)
    assert kib["+ MLA (latent 32, rope 16)"] == pytest.approx(base * (32 + 16) / (2 * 128))  # latent + rope key
    window = model_config(PIECES["+ sliding window 32"][0], 65)
    assert kib["+ sliding window 32"] == cache_kib(window, n_tokens=64) < base  # rolling: constant past the window
    assert kib["+ Gated DeltaNet 3:1 (DDDA)"] < base / 2  # one attention layer of four, plus fixed DeltaNet states
    assert kib["+ QK-norm"] == kib["+ Muon"] == base


def test_the_combination_merges_exactly_the_pieces_that_beat_the_baseline():
    means = {n: 1.0 for n in PIECES}
    means.update({"+ QK-norm": 0.9, "+ Muon": 0.8, "+ sliding window 32": 0.95, "+ Gated DeltaNet 3:1 (DDDA)": 0.9})
    name, model_over, train_over = combination(PIECES, means)
    assert model_over == {"qk_norm": True, "layer_pattern": "DDDA"}  # the window is dropped: mixers take no mask
    assert train_over == {"optimizer": "muon"} and name == "combination: Muon, QK-norm, Gated DeltaNet 3:1"
    means["+ MLA (latent 32, rope 16)"] = 0.85  # MLA beats QK-norm, and the model refuses the two together
    assert combination(PIECES, means)[1] == {"mla_kv_rank": 32, "mla_rope_dim": 16, "layer_pattern": "DDDA"}
    assert combination(PIECES, {n: 1.0 for n in PIECES}) is None


def test_a_short_run_gives_a_row_per_variant_with_finite_losses():
    argv = [
        "--max-iters",
        "3",
        "--seeds",
        "0",
        "1",
        "--variants",
        "+ QK-norm",
        "--eval-iters",
        "2",
        "--cache-tokens",
        "8",
    ]
    out = main([*argv, "--equal-time"])
    names = [r["variant"] for r in out["rows"]]
    assert names[:2] == [BASELINE, "+ QK-norm"] and len(names) in (2, 3)  # + the combination if QK-norm won
    assert all(math.isfinite(r["val"]) for rs in out["results"].values() for r in rs)
    assert all(len(rs) == 2 for rs in out["results"].values()) and "±" in out["rows"][0]["val loss"]
    assert [t["variant"] for t in out["equal_time"]] == names
