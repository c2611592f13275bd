"""Chapter 02: every distributed strategy, run for real on 2 gloo ranks, equals one process on the whole batch.

Each test spawns 2 CPU ranks once (ch02.launch); the ranks write their results to files before tearing down, so the
occasional gloo abort at interpreter exit cannot fail a test (see launch.py).
"""

from __future__ import annotations

import atexit
import os

import pytest
import torch
import torch.distributed as dist

from ch02 import accelerate_train, ddp, fsdp, memory_calculator, pipeline, tensor_parallel
from ch02.launch import WorkerError, launch
from ch02.reference import tiny_config

GRAD_TOL = 1e-6  # gradients: one float32 rounding of a mean over 2 ranks
LOSS_TOL = 1e-5


def _sum_then_abort(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    atexit.register(os._exit, 134)  # die like gloo's "terminate called without an active exception", after reporting
    return t


def _fail_on_rank1(rank, world):
    if rank == 1:
        raise ValueError("rank 1 is broken on purpose")
    t = torch.ones(1)
    dist.all_reduce(t)  # rank 0 would wait here forever; the launcher must stop it
    return t


@pytest.mark.timeout(120)
def test_launch_keeps_results_of_ranks_that_abort_at_exit():
    results = launch(_sum_then_abort, 2)
    assert [r.item() for r in results] == [3.0, 3.0]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_launch_reports_a_rank_that_fails_and_stops_the_others():
    with pytest.raises(WorkerError, match="rank 1 is broken on purpose"):
        launch(_fail_on_rank1, 2, timeout_s=60)


@pytest.mark.timeout(180)
def test_scratch_ddp_equals_torch_ddp_equals_single_process():
    out = ddp.main(["--steps", "3", "--accum", "2", "--batch-size", "8"])
    assert out["same_data"]  # DistributedSampler's shards are exactly the rows we give each rank
    for row in out["rows"]:
        assert row["max |Δ grad| step 0"] <= GRAD_TOL, row
        assert row["max |Δ loss|"] <= LOSS_TOL, row
        assert row["max |Δ weight| end"] <= 1e-4, row  # Adam divides by sqrt(v): tiny grads amplify rounding
    scratch_vs_torch = out["rows"][-1]
    assert scratch_vs_torch["max |Δ grad| step 0"] <= GRAD_TOL
    r0 = out["results"][0]["scratch"]
    pending = r0["grads_pending_at_launch"]  # bucketed all-reduces start while backward is still running
    assert len(pending) > 1 and pending[0] > 0 and pending == sorted(pending, reverse=True)
    assert torch.allclose(r0["params"]["tok_emb.weight"], out["results"][1]["scratch"]["params"]["tok_emb.weight"])


@pytest.mark.timeout(180)
def test_fsdp2_matches_single_process_resumes_from_sharded_checkpoint_and_halves_memory(tmp_path):
    out = fsdp.main(["--steps", "4", "--out", str(tmp_path / "ckpt")])
    checks = {c["check"]: c["value"] for c in out["checks"]}
    assert checks["max |Δ loss| FSDP vs one process"] <= LOSS_TOL
    assert checks["max |Δ grad| step 0 vs one process"] <= GRAD_TOL
    assert checks["max |Δ loss| resumed vs uninterrupted"] <= 1e-7
    assert checks["max |Δ weight| resumed vs uninterrupted"] <= 1e-7
    assert any((tmp_path / "ckpt").glob("*.distcp"))  # one shard file per rank
    # measured per-rank model state vs the ZeRO formulas (memory_calculator)
    results = out["results"]
    n = results[0]["n_params"]
    ddp_pred = memory_calculator.model_state_bytes("ddp", n, 2)
    zero3_pred = memory_calculator.model_state_bytes("zero3", n, 2)
    assert results[0]["ddp_mem"] == ddp_pred
    for kind in ("params", "grads", "optimizer"):
        assert sum(r["fsdp_mem"][kind] for r in results) == ddp_pred[kind]  # shards add up to the whole
        for r in results:  # each rank ~1/W (dim-0 sharding of odd-sized rows leaves a few rows' imbalance)
            assert abs(r["fsdp_mem"][kind] - zero3_pred[kind]) <= 0.01 * zero3_pred[kind]


@pytest.mark.timeout(180)
def test_gpipe_and_1f1b_gradients_equal_single_process():
    out = pipeline.main(["--no-bubble", "--n-micro", "4", "--batch-size", "8"])
    assert {r["schedule"] for r in out["rows"]} == {"gpipe", "1f1b"}
    for row in out["rows"]:
        assert row["max |Δ grad| vs one process"] <= GRAD_TOL, row
        assert row["|Δ loss|"] <= LOSS_TOL, row
    # each rank holds one stage: the stage sizes are what memory_calculator's PP row uses
    counts = memory_calculator.gpt_counts(tiny_config(), pp=2)
    stage_sizes = [sum(g.numel() for g in res["gpipe"]["grads"].values()) for res in out["stages"]]
    assert stage_sizes == counts.stages


@pytest.mark.timeout(180)
def test_tensor_parallel_dtensor_and_by_hand_equal_single_process():
    out = tensor_parallel.main(["--batch-size", "4"])
    counts = memory_calculator.gpt_counts(tiny_config())
    for row in out["rows"]:
        assert row["max |Δ logits|"] <= 1e-5, row
        assert row["max |Δ grad|"] <= GRAD_TOL, row
        # each rank stores half of every attention/MLP matrix plus the replicated rest
        assert row["params on this rank"] == counts.tp_sharded // 2 + counts.total - counts.tp_sharded


@pytest.mark.timeout(180)
def test_accelerate_two_processes_equal_single_process():
    out = accelerate_train.main(["--steps", "3"])
    info = out["results"][0]["info"]
    assert info["num_processes"] == 2 and info["backend"] == "gloo" and info["wrapped"] == "DistributedDataParallel"
    for row in out["rows"]:
        assert row["|Δ|"] <= LOSS_TOL, row
    assert out["weight_diff"] <= 1e-5


def test_memory_formulas_follow_the_zero_paper():
    psi, n = 7.5e9, 64  # the paper's Figure 1 example: 7.5B parameters, 64 GPUs, mixed precision (K = 12)
    gb = {
        s: sum(memory_calculator.model_state_bytes(s, psi, n, "mixed").values()) / 1e9
        for s in ("ddp", "zero1", "zero2", "zero3")
    }
    assert gb["ddp"] == pytest.approx(120, rel=1e-9)
    assert gb["zero1"] == pytest.approx(31.4, abs=0.05)
    assert gb["zero2"] == pytest.approx(16.6, abs=0.05)
    assert gb["zero3"] == pytest.approx(1.875, abs=1e-3)
    with pytest.raises(ValueError, match="unknown strategy"):
        memory_calculator.model_state_bytes("zero4", psi, n)
