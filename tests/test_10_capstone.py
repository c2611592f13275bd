"""Chapter 10: the whole pipeline on the tiny config — every artifact exists and loads in the real tool."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ch01.bpe import Tokenizer
from ch01.model import GPT
from ch01.tokenizer import load_tokenizer
from ch10.config import ConfigError, load_config
from ch10.minigpt import main
from ch10.stages import STAGES

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    metrics = main(["all", "--config", "tiny", "--runs-dir", str(root), "--no-progress"])
    return root / "tiny", metrics


def test_every_artifact_exists(run_dir):
    d, metrics = run_dir
    for rel in [
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "data/train.npy",
        "data/val.npy",
        "checkpoints/ckpt.safetensors",
        "model/model.safetensors",
        "model/config.json",
        "model/vocab.json",
        "loss.png",
        "samples.txt",
        "metrics.json",
        "report.md",
        "exports/hf/config.json",
        "exports/onnx/model.onnx",
        "exports/onnx/decode.onnx",
        "sft/model.safetensors",
        "sft/chat_tokenizer.json",
        "rl/model.safetensors",
        "grpo.png",
    ]:
        assert (d / rel).exists(), rel
    assert set(metrics) >= {"tokenizer", "data", "train", "eval", "quantize", "export", "sft", "rl", "report"}
    ev = metrics["eval"]
    assert np.isclose(ev["perplexity"], np.exp(ev["val_loss"]))
    assert ev["val_loss"] < np.log(300)  # learned something beyond a uniform guess over 300 BPE tokens
    report = (d / "report.md").read_text()
    assert f"{ev['val_loss']:.4f}" in report and "## Samples" in report


def test_eval_stage_reports_the_suites_row(run_dir):
    from ch01.cloze import TARGET_DELIMITER, build_cloze
    from ch01.scoring import multiple_choice

    d, metrics = run_dir
    suite = metrics["eval"]["suite"]
    model, tok = GPT.load(d / "model").eval(), Tokenizer.load(d / "tokenizer")
    mc = multiple_choice(model, tok, build_cloze(8), target_delimiter=TARGET_DELIMITER)
    assert (suite["cloze acc"], suite["cloze acc_norm"]) == (mc["acc"], mc["acc_norm"])
    assert 0 < suite["bpb shakespeare"] < 8  # a byte-level BPE model that learned something: below 8 bits a byte
    assert f"{suite['bpb shakespeare']:.3f}" in (d / "report.md").read_text()


def test_token_files_match_the_tokenizer(run_dir):
    d, _ = run_dir
    tok = Tokenizer.load(d / "tokenizer")
    val = np.load(d / "data" / "val.npy", mmap_mode="r")
    assert isinstance(val, np.memmap) and val.dtype == np.uint16
    text = tok.decode(val[:200].tolist())
    assert tok.encode(text) == val[:200].tolist()


def test_hf_export_gives_same_logits(run_dir):
    from transformers import AutoModelForCausalLM

    d, _ = run_dir
    ours = GPT.load(d / "model").eval()
    hf = AutoModelForCausalLM.from_pretrained(d / "exports" / "hf").eval()
    x = torch.from_numpy(np.load(d / "data" / "val.npy")[:64].astype(np.int64))[None]
    with torch.no_grad():
        assert (hf(input_ids=x).logits - ours(x)).abs().max().item() < 1e-4


def test_hf_export_tokenizer_and_pipeline_give_our_tokens(run_dir):
    from transformers import AutoTokenizer, pipeline

    d, _ = run_dir
    tok, hf_dir = Tokenizer.load(d / "tokenizer"), d / "exports" / "hf"
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    text = "ROMEO:\nBut soft, what light through yonder window breaks?<|endoftext|>"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    ours = GPT.load(d / "model").eval()
    prompt = torch.tensor([tok.encode("ROMEO:\n")])
    expected = tok.decode(ours.generate(prompt, 8, temperature=0)[0].tolist())
    generator = pipeline("text-generation", model=str(hf_dir))
    assert generator("ROMEO:\n", max_new_tokens=8, do_sample=False)[0]["generated_text"] == expected


def test_onnx_export_same_greedy_tokens(run_dir):
    from ch08.export_onnx import ort_greedy, ort_session

    d, _ = run_dir
    model = GPT.load(d / "model").eval()
    prompt = torch.from_numpy(np.load(d / "data" / "val.npy")[:10].astype(np.int64))[None]
    ort = ort_greedy(ort_session(d / "exports" / "onnx" / "decode.onnx"), model, prompt, 20)
    assert torch.equal(ort, model.generate(prompt, 20, temperature=0.0))


def test_gguf_reads_back(run_dir):
    import gguf

    d, metrics = run_dir
    path = d / "exports" / "minigpt-q8_0.gguf"
    if "skipped" in metrics["export"].get("gguf_q8_0", {}):
        pytest.skip(metrics["export"]["gguf_q8_0"]["skipped"])
    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    model = GPT.load(d / "model")
    assert {"token_embd.weight", "output_norm.weight"} <= names
    assert len(names) == 2 + 1 + 9 * model.config.n_layer  # embd, output_norm, output + 9 per block


def test_gguf_runs_in_llama_cpp(run_dir):
    pytest.importorskip("llama_cpp")
    from ch06.gguf_export import llama_cpp_greedy, load_llama_cpp

    d, _ = run_dir
    model, tok = GPT.load(d / "model").eval(), Tokenizer.load(d / "tokenizer")
    llm = load_llama_cpp(d / "exports" / "minigpt-f16.gguf", model.config.block_size, n_threads=2)
    ids = tok.encode("ROMEO:\nWhat say'st thou?")
    assert llm.tokenize(b"ROMEO:\nWhat say'st thou?", add_bos=False, special=False) == ids
    ours = model.generate(torch.tensor([ids]), 20, temperature=0)[0, len(ids) :].tolist()
    assert llama_cpp_greedy(llm, ids, 20) == ours
    llm.close()


def test_rerun_skips_up_to_date_stages(run_dir, capsys):
    d, _ = run_dir
    before = (d / "model" / "model.safetensors").stat().st_mtime_ns
    main(["all", "--config", "tiny", "--runs-dir", str(d.parent), "--no-progress"])
    out = capsys.readouterr().out
    assert out.count("up to date") == len(STAGES)
    assert (d / "model" / "model.safetensors").stat().st_mtime_ns == before


def test_force_retrains_from_scratch_and_interrupted_training_resumes(run_dir, tmp_path):
    import shutil

    from ch10.stages import Run, run_stage

    d, _ = run_dir
    root = tmp_path / "runs"
    shutil.copytree(d, root / "tiny")
    run = Run(load_config("tiny"), root, progress=False)
    stages = json.loads((root / "tiny" / "stages.json").read_text())
    stages["train"]["done"] = False  # as if training had been interrupted after its last checkpoint
    (root / "tiny" / "stages.json").write_text(json.dumps(stages))
    assert run_stage(run, "train")["resumed"] is True
    run.force = True
    assert run_stage(run, "train")["resumed"] is False


def test_a_changed_setting_reruns_its_stage_and_what_follows(run_dir):
    from ch10.stages import STAGES, Run

    d, _ = run_dir
    cfg = load_config("tiny")
    assert all(Run(cfg, d.parent).up_to_date(s) for s in STAGES)
    cfg["eval"]["decode_tokens"] += 1
    changed = Run(cfg, d.parent)
    assert [s for s in STAGES if changed.up_to_date(s)] == ["tokenizer", "data", "train"]
    cfg = load_config("tiny")
    cfg["train"]["lr"] *= 2
    changed = Run(cfg, d.parent)
    assert [s for s in STAGES if changed.up_to_date(s)] == ["tokenizer", "data"]
    assert not changed.started("train")  # its checkpoint belongs to other settings: training would start over
    assert isinstance(changed.tokens("train"), np.memmap)  # batches are drawn from the memory map


def test_server_answers_through_openai_client(run_dir):
    import openai

    from ch08.serve_thread import ServerThread
    from ch10.minigpt import server_state
    from ch10.stages import Run

    d, _ = run_dir
    run = Run(load_config("tiny"), d.parent)
    state = server_state(run)  # what `minigpt.py serve` runs behind uvicorn
    state.shutdown_timeout = 2.0
    with ServerThread(state) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        resp = client.completions.create(model="minigpt", prompt="ROMEO:", max_tokens=12, temperature=0)
    model, tok = GPT.load(d / "rl").eval(), load_tokenizer(d / "rl")  # serve's default: the post-trained model
    ids = tok.encode("ROMEO:")
    out = model.generate(torch.tensor([ids]), 12, temperature=0.0)[0, len(ids) :].tolist()
    if tok.eos_id in out:  # the server stops at <|im_end|>
        out = out[: out.index(tok.eos_id)]
    assert resp.choices[0].text == tok.decode(out) and resp.usage.completion_tokens <= 12


def test_sft_and_rl_stages_report_accuracy_and_serve_chats_with_their_template(run_dir):
    import openai

    from ch01.chat_template import apply_chat_template
    from ch03.grpo import accuracy
    from ch03.sft import ChatTokenizer
    from ch08.serve_thread import ServerThread
    from ch10.minigpt import server_state
    from ch10.posttrain import task_split
    from ch10.stages import Run

    d, metrics = run_dir
    acc = metrics["rl"]["accuracy"]
    assert list(acc) == ["base", "SFT", "GRPO"] and set(acc["SFT"]) == {"add", "sub", "mean", "val_loss"}
    run = Run(load_config("tiny"), d.parent)
    model, tok = GPT.load(d / "rl").eval(), load_tokenizer(d / "rl")
    assert isinstance(tok, ChatTokenizer) and model.config.vocab_size == tok.vocab_size == 302  # BPE 300 + 2 specials
    test_set = task_split(run)[1]
    assert {k: round(v, 4) for k, v in accuracy(model, tok, test_set).items()} == {
        k: v for k, v in acc["GRPO"].items() if k not in ("mean", "val_loss")
    }  # the reported numbers are the saved model's
    assert acc["GRPO"]["val_loss"] == round(run.val_loss(model), 4) and acc["base"]["val_loss"] == round(
        run.val_loss(run.model()), 4
    )  # the forgetting column: Shakespeare val loss of each stage's model
    assert (
        "## Post-training" in (d / "report.md").read_text() and "Shakespeare val loss" in (d / "report.md").read_text()
    )
    messages = [{"role": "user", "content": test_set[0].prompt}]
    state = server_state(run)
    state.shutdown_timeout = 2.0
    with ServerThread(state) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        resp = client.chat.completions.create(model="minigpt", messages=messages, max_tokens=8, temperature=0)
    ids = apply_chat_template(tok, messages)  # ChatML: <|im_start|>user ... <|im_start|>assistant
    out = model.generate(torch.tensor([ids]), 8, temperature=0.0)[0, len(ids) :].tolist()
    stopped = tok.eos_id in out
    out = out[: out.index(tok.eos_id)] if stopped else out
    assert resp.choices[0].message.content == tok.decode(out)
    assert resp.choices[0].finish_reason == ("stop" if stopped else "length")


def test_disabled_post_training_is_skipped_and_serve_falls_back_to_the_base_model(tmp_path):
    from ch10.posttrain import served_model_dir
    from ch10.stages import Run, stage_rl, stage_sft

    cfg = load_config("tiny")
    cfg["sft"]["enabled"] = False
    run = Run(cfg, tmp_path)
    assert "skipped" in stage_sft(run)
    run.done("sft", {"skipped": "sft.enabled = false"})
    assert "SFT model" in stage_rl(run)["skipped"]  # GRPO needs the SFT model
    assert served_model_dir(run) == run.model_dir


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[model]\nn_layr = 3\n')
    with pytest.raises(ConfigError, match="n_layr"):
        load_config(bad)
    bad.write_text('name = "x"\n[sample]\ntemprature = 1\n')
    with pytest.raises(ConfigError, match="temprature"):
        load_config(bad)
    assert json.dumps(load_config("cpu-demo"))  # the default parses and is JSON-able
