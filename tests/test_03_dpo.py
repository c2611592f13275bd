"""Chapter 03: DPO from scratch == TRL's DPOTrainer loss; the local HF char tokenizer; the reward model beats chance."""

import copy
import math

import pytest
import torch

from ch01.pretrained import pretrained_char_model


def test_hf_char_tokenizer_round_trips():
    from ch03.hf_tokenizer import check_roundtrip, hf_char_tokenizer

    _, tok, _ = pretrained_char_model("tiny", 200, verbose=False)
    hf_tok = hf_char_tokenizer(tok)
    assert check_roundtrip(hf_tok, tok, "ROMEO:\nO  sweet, love!  \n\n3$x")
    assert hf_tok.eos_token_id == hf_tok.pad_token_id == tok.stoi["$"]


def test_dpo_loss_matches_hand_calculation():
    from ch03.dpo import dpo_loss

    loss, stats = dpo_loss(
        torch.tensor([-10.0, -5.0]),
        torch.tensor([-12.0, -4.0]),
        torch.tensor([-11.0, -5.0]),
        torch.tensor([-11.0, -5.0]),
        beta=0.5,
    )
    # margins: 0.5·((−10+11) − (−12+11)) = 1.0;  0.5·((−5+5) − (−4+5)) = −0.5
    expected = -(math.log(1 / (1 + math.exp(-1.0))) + math.log(1 / (1 + math.exp(0.5)))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["reward_accuracy"] == 0.5


@pytest.mark.timeout(300)
def test_dpo_loss_equals_trl_dpo_trainer_loss(tmp_path, one_thread):
    """Same policy/reference weights (our GPT and its HF Llama export), same TRL-collated batch -> same loss."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from ch01.hf_interop import to_hf
    from ch03.dpo import dpo_batch_loss
    from ch03.hf_tokenizer import hf_char_tokenizer

    ref, tok, _ = pretrained_char_model("tiny", 200, verbose=False)
    policy = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a policy that differs from the reference, as after some training
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    data = Dataset.from_list(
        [
            {"prompt": "ROMEO:\nI am ", "chosen": "sweet and kind", "rejected": "dead, my lord"},
            {"prompt": "JULIET:\nO ", "chosen": "love, be merry", "rejected": "villain!"},
            {"prompt": "KING:\n", "chosen": "Good friends, peace.", "rejected": "Blood!"},
        ]
    )
    beta = 0.3
    cfg = DPOConfig(
        output_dir=str(tmp_path),
        beta=beta,
        per_device_train_batch_size=3,
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_length=None,
    )
    trainer = DPOTrainer(
        model=to_hf(policy), ref_model=to_hf(ref), args=cfg, train_dataset=data, processing_class=hf_char_tokenizer(tok)
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 6  # chosen rows then rejected rows, right-padded
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch).item()
        ours, _ = dpo_batch_loss(policy, ref, batch["input_ids"], batch["completion_mask"], beta)
    assert ours.item() == pytest.approx(trl_loss, abs=1e-5)
    assert abs(trl_loss - math.log(2)) > 1e-3  # the policy differs from the reference: not the trivial log 2


@pytest.mark.timeout(300)
def test_reward_model_beats_chance_on_held_out_pairs(one_thread):
    from ch03.reward_model import get_reward_model

    gap = 0.25  # the tiny 200-step policy writes near-gibberish, so its rewards differ less than the small one's
    out = get_reward_model(
        "tiny", 200, n_prompts=300, n_eval_prompts=150, k=6, min_gap=gap, epochs=2, use_cache=False, log=lambda *a: None
    )
    n = out["metrics"]["held_out_pairs"]
    assert n == len(out["test_pairs"]["chosen"]) > 50
    # every labelled pair respects the margin rule, on both splits
    for split in ("train_pairs", "test_pairs"):
        assert (out[split]["true_chosen"] - out[split]["true_rejected"] >= gap).all()
    # held-out accuracy must clear chance by two binomial standard deviations
    assert out["metrics"]["pair_accuracy"] > 0.5 + 2 * math.sqrt(0.25 / n), out["metrics"]
    assert out["metrics"]["spearman"] > 0


def test_trl_reward_function_and_pair_dataset_match_our_tensors():
    """What TRL sees (strings) must be exactly what our from-scratch code scores (token tensors)."""
    from ch03.reward_model import RewardModel
    from ch03.trl_rlhf import make_reward_func, pairs_dataset

    policy, tok, (ids, _) = pretrained_char_model("tiny", 200, verbose=False)
    rm = RewardModel(copy.deepcopy(policy), prompt_len=6).eval()
    torch.nn.init.normal_(rm.head.weight, std=1.0)
    seqs = ids[:24].view(2, 12)
    pairs = {"chosen": seqs, "rejected": seqs.flip(0)}
    ds = pairs_dataset(pairs, tok, prompt_len=6)
    assert tok.encode(ds[0]["prompt"] + ds[0]["chosen"]) == seqs[0].tolist()
    assert tok.encode(ds[1]["prompt"] + ds[1]["rejected"])[6:] == seqs[0, 6:].tolist()
    scores = make_reward_func("rm", rm, tok, 6)(ds["prompt"], [c + "$" for c in ds["chosen"]])  # EOS is dropped
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(scores), rm(seqs))
    true = make_reward_func("true", rm, tok, 6)(ds["prompt"], ds["chosen"])
    assert len(true) == 2 and all(isinstance(x, float) for x in true)
