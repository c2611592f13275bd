"""ch01.train: a short run learns, resume is bit-exact, the script's main() works end to end."""

from __future__ import annotations

import math

import torch

from ch01.model import GPTConfig
from ch01.train import TrainConfig, prepare_data, train


def _cfgs(tmp_path, iters, **kw):
    mcfg = GPTConfig.preset("tiny", vocab_size=65, block_size=32)
    tc = TrainConfig(
        max_iters=iters,
        batch_size=8,
        lr=3e-3,
        warmup_iters=5,
        eval_interval=25,
        eval_iters=4,
        ckpt_interval=1000,
        log_interval=10,
        progress=False,
        out_dir=str(tmp_path),
        device="cpu",
        **kw,
    )
    return mcfg, tc


def test_50_steps_learn_char_shakespeare(tmp_path):
    tok, tr, va = prepare_data("char")
    assert tok.vocab_size == 65 and len(tr) == 1_003_854
    mcfg, tc = _cfgs(tmp_path, 50)
    res = train(mcfg, tc, tr, va)
    first, last_val = res["train_losses"][0], res["val"][-1][2]
    assert math.isclose(first, math.log(65), rel_tol=0.1)  # starts near uniform over 65 chars
    assert last_val < 3.0  # 50 steps learn character frequencies and common bigrams (uniform is 4.17)
    assert len(res["train_losses"]) == 50 and res["tokens_per_s"] > 0


def test_resume_is_bit_exact(tmp_path, monkeypatch):
    """2N steps straight == N steps, checkpoint, (new RNG state), resume, N steps: same losses, same weights."""
    import ch01.train as T

    tok, tr, va = prepare_data("char")
    mcfg, tc = _cfgs(tmp_path / "straight", 20)
    straight = train(mcfg, tc, tr, va)

    class Interrupted(Exception):
        pass

    real_save = T._Loop.save

    def save_then_die(loop, step):
        real_save(loop, step)
        if step == 10:
            raise Interrupted  # the process "dies" right after writing the step-10 checkpoint

    mcfg, tc = _cfgs(tmp_path / "resumed", 20)
    tc.ckpt_interval = 10
    monkeypatch.setattr(T._Loop, "save", save_then_die)
    try:
        train(mcfg, tc, tr, va)
    except Interrupted:
        pass
    monkeypatch.setattr(T._Loop, "save", real_save)
    torch.manual_seed(999)  # a fresh process has another RNG state; resume must restore the saved one
    resumed = train(mcfg, tc, tr, va, resume=True)
    assert resumed["train_losses"] == straight["train_losses"]
    for a, b in zip(straight["model"].parameters(), resumed["model"].parameters()):
        assert torch.equal(a, b)


def test_sample_script_greedy_matches_model_generate(tmp_path):
    from ch01.model import GPT
    from ch01.sample import main as sample_main

    tok, tr, va = prepare_data("char")
    mcfg, tc = _cfgs(tmp_path, 10)
    res = train(mcfg, tc, tr, va, tokenizer=tok)
    out = sample_main(
        ["--model-dir", str(tmp_path / "model"), "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "20"]
    )
    model = GPT.load(tmp_path / "model")
    ids = model.generate(torch.tensor([tok.encode("ROMEO:")]), 20, temperature=0.0)
    assert out["samples"] == [tok.decode(ids[0].tolist())]
    assert torch.equal(next(model.parameters()), next(res["model"].parameters()))


def test_hooks_extra_loss_callbacks_and_a_ready_model(tmp_path):
    """A ready-made model, an auxiliary loss logged per step, a callback per step, no files when out_dir=None."""
    from ch01.model import GPT

    tok, tr, va = prepare_data("char")
    mcfg, tc = _cfgs(None, 12, batch_seed=7)
    tc.out_dir, tc.eval_at_start, tc.eval_interval = None, True, 6
    torch.manual_seed(0)
    model = GPT(mcfg)
    model.aux_loss = lambda: 0.01 * model.tok_emb.weight.pow(2).mean()  # stands in for an MoE's balancing loss
    seen = []
    res = train(model, tc, tr, va, callbacks=[lambda s: seen.append((s.it, float(s.loss)))])
    assert res["model"] is model and res["out_dir"] is None
    assert [it for it, _ in seen] == list(range(12)) and len(res["aux_losses"]) == 12
    assert [v[0] for v in res["val"]] == [0, 6, 12]  # at start, every 6 steps, at the end
    for (_, total), ce, aux in zip(seen, res["train_losses"], res["aux_losses"]):
        assert math.isclose(total, ce + aux, rel_tol=1e-5)  # minimised: CE + aux; logged: each part
    again = train(GPT(mcfg), tc, tr, va)  # batch_seed: the same batches whatever the global RNG did
    assert math.isclose(again["train_losses"][0], res["train_losses"][0], rel_tol=0.05)


def test_bpe_run_saves_its_tokenizer_and_sample_loads_it(tmp_path):
    from ch01.bpe import Tokenizer, train_bpe
    from ch01.sample import main as sample_main
    from ch01.tokenizer import load_tokenizer
    from common.data import load_shakespeare

    text = load_shakespeare()[:20000]
    (tmp_path / "corpus.txt").write_text(text)
    tok = Tokenizer(*train_bpe(str(tmp_path / "corpus.txt"), 300, []), [])
    ids = torch.tensor(tok.encode(text))
    mcfg = GPTConfig.preset("tiny", vocab_size=tok.vocab_size, block_size=32)
    tc = TrainConfig(
        max_iters=5,
        batch_size=4,
        warmup_iters=1,
        eval_iters=2,
        eval_interval=100,
        progress=False,
        out_dir=str(tmp_path / "run"),
        device="cpu",
    )
    train(mcfg, tc, ids[: len(ids) * 9 // 10], ids[len(ids) * 9 // 10 :], tokenizer=tok)
    loaded = load_tokenizer(tmp_path / "run" / "model")
    assert isinstance(loaded, Tokenizer) and loaded.encode("ROMEO: my lord") == tok.encode("ROMEO: my lord")
    out = sample_main(["--model-dir", str(tmp_path / "run" / "model"), "--prompt", "ROMEO:", "--max-new-tokens", "8"])
    assert out["samples"][0].startswith("ROMEO:") and len(out["samples"][0]) > len("ROMEO:")
