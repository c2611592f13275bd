"""common/: device fallback, seeding, data, get_batch, checkpoints (round trip, atomicity, corruption), bench ratios."""

from __future__ import annotations

import os
import random
import time

import numpy as np
import pytest
import torch

from common import bench, checkpoint, data, device, seed
from common.cli import base_parser


def test_device_auto_falls_back_to_cpu_and_rejects_missing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert device.pick_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA"):
        device.pick_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        device.pick_device("tpu")
    assert device.supports_dtype("cpu", torch.float32) and device.supports_dtype("cpu", torch.bfloat16)
    assert not device.supports_dtype("cpu", torch.float16)
    assert device.autocast_dtype("cpu") is None


def test_device_auto_prefers_cuda_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "FakeGPU")
    assert device.pick_device("auto") == torch.device("cuda")


def test_seed_everything_reproduces_all_generators():
    def draw():
        return random.random(), np.random.rand(), torch.rand(3).tolist()

    seed.seed_everything(7)
    a = draw()
    seed.seed_everything(7)
    assert draw() == a
    seed.seed_everything(8)
    assert draw() != a


def test_shakespeare_checksum_and_split():
    text = data.load_shakespeare()
    assert len(text) == data.SHAKESPEARE_CHARS == 1_115_394
    train, val = data.train_val_split(text)
    assert len(train) == 1_003_854 and len(val) == 111_540 and train + val == text
    with pytest.raises(ValueError):
        data.train_val_split(text, 1.5)


def test_corrupt_corpus_detected(tmp_path, monkeypatch):
    bad = tmp_path / "t.txt"
    bad.write_text(data.SHAKESPEARE_PATH.read_text()[:-1] + "X")
    monkeypatch.setattr(data, "SHAKESPEARE_PATH", bad)
    with pytest.raises(ValueError, match="corrupt"):
        data.load_shakespeare()


@pytest.mark.parametrize("kind", ["tensor", "numpy"])
def test_get_batch_shapes_and_shift(kind):
    arr = np.arange(1000, dtype=np.uint16)
    src = torch.from_numpy(arr.astype(np.int64)) if kind == "tensor" else arr
    x, y = data.get_batch(src, 5, 16, "cpu", generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y, x + 1)  # next-token targets
    with pytest.raises(ValueError):
        data.get_batch(src[:10], 2, 16)


def test_cached_tokens_memmap(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_ROADMAP_CACHE", str(tmp_path))
    toks = data.cached_tokens("bytes", lambda s: list(s.encode()), text="hello")
    assert isinstance(toks, np.memmap) and toks.tolist() == list(b"hello")
    again = data.cached_tokens("bytes", lambda s: 1 / 0, text="hello")  # cached: encoder not called
    assert again.tolist() == list(b"hello")


def test_get_batch_reads_only_its_windows_from_a_memmap(tmp_path):
    import tracemalloc

    np.save(tmp_path / "t.npy", np.arange(8_000_000, dtype=np.int64) % 60_000)  # 64 MB on disk
    mm = np.load(tmp_path / "t.npy", mmap_mode="r")
    tracemalloc.start()
    x, y = data.get_batch(mm, 4, 32, generator=torch.Generator().manual_seed(0))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20  # a few windows, never the 64 MB array
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(
        x, torch.from_numpy(mm[x[:, 0].numpy()[:, None] + np.arange(32)])
    )


def test_fingerprint_same_settings_same_key_any_change_new_key():
    settings = {"lr": 1e-3, "layers": 2, "name": "tiny"}
    assert data.fingerprint(settings) == data.fingerprint(dict(reversed(settings.items())))  # key order is irrelevant
    assert data.fingerprint(settings) != data.fingerprint({**settings, "lr": 2e-3})
    assert data.fingerprint(settings, 1) != data.fingerprint(settings, 2)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    key = data.fingerprint(model, settings)
    assert key == data.fingerprint(model.state_dict(), settings) and len(key) == 12
    with torch.no_grad():
        model.weight[1, 2] += 1e-6  # one weight, a tiny change
    assert data.fingerprint(model, settings) != key
    x = torch.zeros(4)
    assert (
        data.fingerprint(x) != data.fingerprint(x.view(2, 2)) != data.fingerprint(x.double())
    )  # shape and dtype count
    assert data.fingerprint(x.numpy()) == data.fingerprint(np.zeros(4, np.float32))


def test_keyed_cache_dir_one_folder_per_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_ROADMAP_CACHE", str(tmp_path))
    a = data.keyed_cache_dir("ch99", "model", key={"iters": 10})
    assert a == data.keyed_cache_dir("ch99", "model", key={"iters": 10}) and a.is_dir()
    assert a.parent == tmp_path / "ch99" and a.name == f"model-{data.fingerprint({'iters': 10})}"
    assert data.keyed_cache_dir("ch99", "model", key={"iters": 11}) != a


def test_hf_dataset_view(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_ROADMAP_CACHE", str(tmp_path))
    f = tmp_path / "c.txt"
    f.write_text("a\nb b\nc\n")
    ds = data.load_hf_dataset(f)
    assert ds["text"] == ["a", "b b", "c"]


def _tiny_setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def test_checkpoint_round_trip_bit_identical_and_rng(tmp_path):
    model, opt, sched = _tiny_setup()
    path = checkpoint.save_checkpoint(tmp_path / "c.safetensors", model, opt, sched, step=3, extra={"note": "hi"})
    expected_next = (random.random(), np.random.rand(), torch.rand(2))
    m2, o2, s2 = _tiny_setup()
    for p in m2.parameters():
        p.data.add_(1.0)
    meta = checkpoint.load_checkpoint(path, m2, o2, s2)
    assert meta["step"] == 3 and meta["extra"] == {"note": "hi"}
    for a, b in zip(model.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    for sa, sb in zip(opt.state.values(), o2.state.values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k])
    assert s2.state_dict() == sched.state_dict()
    got = (random.random(), np.random.rand(), torch.rand(2))  # RNG restored to the moment of saving
    assert got[0] == expected_next[0] and got[1] == expected_next[1] and torch.equal(got[2], expected_next[2])


def test_checkpoint_tied_weights(tmp_path):
    emb = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    checkpoint.save_checkpoint(tmp_path / "t.safetensors", model)
    m2 = torch.nn.ModuleDict({"emb": torch.nn.Embedding(5, 3), "head": torch.nn.Linear(3, 5, bias=False)})
    m2["head"].weight = m2["emb"].weight
    checkpoint.load_checkpoint(tmp_path / "t.safetensors", m2)
    assert torch.equal(m2["head"].weight, emb.weight)


def test_atomic_write_keeps_old_checkpoint_on_crash(tmp_path, monkeypatch):
    model, opt, _ = _tiny_setup()
    path = tmp_path / "c.safetensors"
    checkpoint.save_checkpoint(path, model, opt, step=1)
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, model, opt, step=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left behind
    assert checkpoint.load_checkpoint(path, model, opt)["step"] == 1


@pytest.mark.parametrize("damage", ["truncate", "garble", "missing", "not_ours"])
def test_corrupt_checkpoint_clear_error(tmp_path, damage):
    model, opt, _ = _tiny_setup()
    path = tmp_path / "c.safetensors"
    checkpoint.save_checkpoint(path, model, opt, step=1)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garble":
        path.write_bytes(b"\xff" * 16 + raw[16:])
    elif damage == "missing":
        path.unlink()
    else:
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(checkpoint.CheckpointError, match="c.safetensors"):
        checkpoint.load_checkpoint(path, model, opt)


def test_bench_ratio_of_known_cost_callables():
    fast = lambda: time.sleep(0.002)
    slow = lambda: time.sleep(0.010)
    rows = bench.compare({"slow": slow, "fast": fast}, baseline="slow", warmup=1, repeats=7)
    ratio = rows[1]["speedup"]
    assert rows[0]["speedup"] == 1.0 and 2.5 < ratio < 6.0  # 10 ms / 2 ms = 5 (sleep overshoots a little)
    t = bench.timeit(fast, warmup=0, repeats=5)
    assert t.p10 <= t.median <= t.p90 and t.repeats == 5
    table = bench.markdown_table(rows, ["name", "speedup"])
    assert table.splitlines()[0] == "| name | speedup |" and "| fast |" in table


def test_markdown_table_formats():
    rows = [{"name": "a", "loss": 1.23456, "err": 3.1e-7, "n": 1234567, "ok": True}]
    assert bench.markdown_table(rows, floatfmt=".2f", formats={"err": ".1e", "n": ","}).splitlines() == [
        "| name | loss | err | n | ok |",
        "|---|---|---|---|---|",
        "| a | 1.23 | 3.1e-07 | 1,234,567 | True |",
    ]
    assert bench.markdown_table([], ["a", "b"]) == "| a | b |\n|---|---|" and bench.markdown_table([]) == ""


def test_peak_memory_sees_a_large_allocation():
    def alloc():
        x = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
        time.sleep(0.02)
        return x.sum()

    peak = bench.peak_memory(alloc)
    assert 48 * 2**20 < peak < 160 * 2**20
    assert "torch" in bench.hardware_info()


def test_cli_rejects_a_missing_device_in_one_sentence(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        base_parser("x", device=True).parse_args(["--device", "cuda"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "Traceback" not in err


def test_cli_shared_arguments_are_opt_in():
    args = base_parser("x", device=True, seed=True, dtype=True).parse_args(["--device", "cpu", "--seed", "3"])
    assert (args.device, args.seed, args.dtype) == ("cpu", 3, "float32")
    with pytest.raises(SystemExit):  # a script that did not ask for --dtype does not offer it
        base_parser("x", seed=True).parse_args(["--dtype", "float32"])
    assert os.path.basename(__file__).startswith("test_common")
