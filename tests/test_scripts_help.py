"""Every runnable script in the repo (collected automatically, so a new one is covered) answers ``--help`` quickly
and offers only the shared flags it honours (``--device/--seed/--dtype/--out`` must be read as ``args.<flag>``)."""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(
    str(p.relative_to(ROOT))
    for p in ROOT.glob("[01][0-9]_*/**/*.py")
    if 'if __name__ == "__main__"' in p.read_text() and "triton_server/model_repository" not in str(p)
)
SHARED = ("device", "seed", "dtype", "out")


def test_scripts_were_collected():
    assert len(SCRIPTS) > 50 and "01_transformer_from_scratch/train.py" in SCRIPTS


@pytest.mark.timeout(120)
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_answers_and_lists_only_honoured_flags(script, monkeypatch):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    text = out.getvalue()
    assert exc.value.code in (0, None) and "usage:" in text, text[-500:]
    source = (ROOT / script).read_text()
    for flag in SHARED:
        if re.search(rf"^\s+--{flag}\b", text, re.M):
            assert re.search(rf"\bargs\.{flag}\b", source), f"{script} offers --{flag} but never reads args.{flag}"
