"""``runs/<name>/report.md``: every number the pipeline measured, in one table per stage, plus the samples."""

from __future__ import annotations

from pathlib import Path

from common.bench import hardware_info, markdown_table


def _mb(n) -> str:
    return f"{n / 1e6:.2f}" if isinstance(n, (int, float)) else "–"


def _loss(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "–"


def _model_rows(m: dict) -> list[dict]:
    """The "Model and training" table: (metric, value) rows."""
    tok, data, tr, ev = m.get("tokenizer", {}), m.get("data", {}), m.get("train", {}), m.get("eval", {})
    mc = tr.get("config", {})
    rows = [
        (
            "tokenizer",
            f"byte-level BPE, {tok.get('vocab_size', '–')} tokens ({data.get('chars_per_token', '–')} chars/token), "
            f"trained in {tok.get('train_seconds', '–')} s",
        ),
        (
            "model",
            f"{mc.get('n_layer')} layers, {mc.get('n_head')} heads, {mc.get('n_embd')} dims, "
            f"context {mc.get('block_size')}, attention `{mc.get('attn_impl')}`",
        ),
        ("parameters", f"{tr.get('params', 0):,}"),
        (
            "training",
            f"{tr.get('iters')} iterations in {tr.get('train_seconds')} s ({tr.get('train_tokens_per_s', 0):,} tokens/s)",
        ),
        ("val loss", _loss(ev.get("val_loss"))),
        ("perplexity (per BPE token)", f"{ev.get('perplexity', float('nan')):.2f}"),
    ]
    rows += _suite_rows(ev.get("suite", {}))
    speed = ev.get("decode_tokens_per_s", {})
    if speed:
        rows.append(
            (
                f"decode tokens/s ({ev.get('decode_new_tokens')} new, batch 1)",
                f"{speed.get('no_cache')} without KV cache, {speed.get('kv_cache')} with "
                f"({speed.get('kv_cache', 0) / max(speed.get('no_cache', 1), 1e-9):.1f}×)",
            )
        )
    return [{"metric": k, "value": v} for k, v in rows]


def _num(x, fmt: str = ".3f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "–"


def _suite_rows(suite: dict) -> list[tuple[str, str]]:
    """The capstone model's columns of the course's evaluation table (``10_capstone/eval_suite.py``)."""
    if not suite:
        return []
    rows = [
        ("bits per byte: held-out Shakespeare / README prose",
         f"{_num(suite.get('bpb shakespeare'))} / {_num(suite.get('bpb prose'))} (window {suite.get('context')})"),
        ("Shakespeare cloze acc / acc_norm (chance 0.25)",
         f"{_num(suite.get('cloze acc'))} / {_num(suite.get('cloze acc_norm'))}"),
    ]  # fmt: skip
    tasks = suite.get("tasks") or {}
    if tasks:
        per_task = ", ".join(f"{t} {_num(v, '.2f')}" for t, v in tasks.items() if t != "mean")
        rows.append(("chapter-03 task exact match (mean)", f"{_num(tasks.get('mean'))} ({per_task})"))
    return rows


def _artifact_rows(m: dict) -> list[dict]:
    """The "Quantization and exports" table: in-memory quantized copies, then the exported files."""
    q, ex = m.get("quantize", {}), m.get("export", {})
    base = q.get("fp32", {}).get("val_loss")
    rows = [
        (f"{name} (in memory)", _mb(r.get("bytes")), _loss(r["val_loss"]), f"{r.get('val_loss_change_pct', 0):+.2f}%")
        for name, r in q.items()
        if isinstance(r, dict) and "val_loss" in r
    ]
    for name, r in ex.items():
        if not isinstance(r, dict):
            continue
        if "skipped" in r:
            rows.append((name, "–", "–", f"skipped: {r['skipped']}"))
            continue
        v = r.get("val_loss")
        change = f"{100 * (v - base) / base:+.2f}%" if isinstance(v, float) and base else "same weights"
        rows.append((f"{name} `{Path(r['path']).name}`", _mb(r.get("bytes")), _loss(v), change))
    return [dict(zip(("artifact", "size (MB)", "val loss", "change"), r)) for r in rows]


def _posttrain_lines(m: dict) -> list[str]:
    """The "Post-training" section: held-out exact match per task after each stage (base, SFT, GRPO)."""
    sft, rl = m.get("sft", {}), m.get("rl", {})
    if not sft:
        return []
    lines = ["## Post-training (chapter 03: SFT, then GRPO)", ""]
    acc = (rl if "accuracy" in rl else sft).get("accuracy")
    if acc:
        tasks = [t for t in next(iter(acc.values())) if t not in ("mean", "val_loss")]
        rows = [{"stage": s, **{t: f"{a[t]:.0%}" for t in tasks}, "mean": f"{a['mean']:.0%}",
                 "Shakespeare val loss": f"{a['val_loss']:.4f}"} for s, a in acc.items()]  # fmt: skip
        lines += [f"Held-out exact match, greedy, {sft.get('test_examples')} questions in all "
                  f"(SFT on {sft.get('train_examples')} examples, {sft.get('replay_rows', 0)} rows of pretraining "
                  "text in every batch); the val loss shows what the tasks cost the language model.", "",
                  markdown_table(rows), ""]  # fmt: skip
    lines += [f"{stage}: skipped ({r['skipped']})" for stage, r in (("sft", sft), ("rl", rl)) if "skipped" in r]
    if "reward_first_last" in rl:
        first, last = rl["reward_first_last"]
        lines += [f"GRPO mean reward {first:.2f} (first step) → {last:.2f} (last step); ![GRPO](grpo.png)", ""]
    return lines


def write_report(run) -> Path:
    m = run.metrics
    lines = [
        f"# mini-GPT report — `{run.cfg['name']}`",
        "",
        f"Config `{run.cfg['path']}`; machine: {hardware_info(run.device)}.",
        "",
        "## Model and training",
        "",
        markdown_table(_model_rows(m)),
        "",
        "## Quantization and exports",
        "",
        markdown_table(_artifact_rows(m), ["artifact", "size (MB)", "val loss", "change"]),
        "",
        "![loss curve](loss.png)",
        "",
        *_posttrain_lines(m),
        "## Samples",
        "",
    ]
    for s in m.get("eval", {}).get("samples", []):
        lines += ["```", s, "```", ""]
    lines += ["## Serve it", "", "```bash", f"python 10_capstone/minigpt.py --config {run.cfg['path']} serve", "```"]
    path = run.dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
