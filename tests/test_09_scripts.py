"""ch09 scripts end to end on tiny budgets (plots go to a temporary --out, never to assets/), and bad flags."""

from __future__ import annotations

import pytest

from ch09 import neural_ode, ode_transformer, pal, self_improve
from ch09.sandbox import unavailable_reason

needs_sandbox = pytest.mark.skipif(
    unavailable_reason() is not None, reason=f"chapter 09 sandbox unavailable: {unavailable_reason()}"
)

pytestmark = pytest.mark.timeout(300)


@needs_sandbox
def test_pal_main_tiny(tmp_path):
    res = pal.main(
        ["--n-train", "64", "--n-test", "8", "--iters", "3", "--n-layer", "1", "--n-embd", "32", "--out", str(tmp_path)]
    )
    for method in ("direct", "pal"):
        r = res["results"][method]
        assert r["accuracy"] == sum(r["correct"]) / 8 and len(r["outputs"]) == 8
    for ok, pred, q in zip(res["results"]["pal"]["correct"], res["results"]["pal"]["preds"], res["test"]):
        assert ok == (pred == q.answer)
    assert (tmp_path / "pal_accuracy_numbers_expression.png").exists()


def test_ode_transformer_main_tiny(tmp_path):
    res = ode_transformer.main(
        [
            "--iters",
            "2",
            "--n-embd",
            "32",
            "--block-size",
            "16",
            "--depth",
            "3",
            "--rk4-steps",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    one, tied, ode, untied = res.values()
    assert one["params"] == tied["params"] == ode["params"] < untied["params"]  # the tied models share one block
    assert (one["nfe"], tied["nfe"], ode["nfe"], untied["nfe"]) == (1, 3, 8, 3)  # RK4: 4 evaluations per step
    assert (tmp_path / "ode_transformer.png").exists()


def test_spiral_and_star_mains_tiny(tmp_path):
    res = neural_ode.main(["--iters", "5", "--method", "rk4", "--adjoint", "--out", str(tmp_path)])
    assert res["nfe"] == [4 * 9] * 5  # rk4, one step per interval, 9 intervals
    assert all(b > 0 for b in res["nfe_backward"])  # the adjoint solves its own ODE backwards
    res = self_improve.main(
        [
            "--n-seed",
            "8",
            "--n-pool",
            "8",
            "--n-test",
            "4",
            "--rounds",
            "1",
            "--seed-iters",
            "2",
            "--iters",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert res["star"][0] == res["control"][0] and len(res["star"]) == 2  # both arms start from the same M0
    assert (tmp_path / "star_accuracy.png").exists() and (tmp_path / "spiral_rk4_adjoint.png").exists()


@pytest.mark.parametrize(
    "main, argv",
    [
        (pal.main, ["--n-test", "0"]),
        (self_improve.main, ["--rounds", "0"]),
        (ode_transformer.main, ["--depth", "0"]),
        (neural_ode.main, ["--iters", "0"]),
    ],
)
def test_bad_flags_exit_with_a_message(main, argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert "must be at least" in capsys.readouterr().err
