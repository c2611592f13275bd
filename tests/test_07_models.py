"""ch07 draft distillation: training the draft on the target's own greedy continuations (on-policy) makes it predict
the target's greedy tokens on held-out prompts far better than before — the acceptance rate of greedy speculation."""

import pytest
import torch

from ch01.model import GPT, GPTConfig
from ch01.train import prepare_data
from ch07.kv_cache import generate
from ch07.models import distilled_draft, greedy_agreement

pytestmark = pytest.mark.usefixtures("one_thread")


def test_on_policy_distillation_raises_greedy_agreement(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_ROADMAP_CACHE", str(tmp_path))
    torch.manual_seed(0)
    target = GPT(GPTConfig.preset("tiny", vocab_size=65, block_size=160, init_std=0.1)).eval()
    draft = GPT(GPTConfig.preset("tiny", vocab_size=65, block_size=160, n_layer=1, n_embd=32, n_head=2)).eval()
    _, _, val_ids = prepare_data("char")
    assert len(set(generate(target, val_ids[:64], 64)[0].tolist())) > 10  # the target's greedy text is not a loop
    settings = dict(iters=150, batch_size=8, n_sequences=32, new_tokens=64, lr=1e-2, verbose=False)
    before = greedy_agreement(target, draft, val_ids, n_prompts=4, new_tokens=64)
    student = distilled_draft(target, draft, **settings)
    after = greedy_agreement(target, student, val_ids, n_prompts=4, new_tokens=64)
    assert before < 0.1 and after > 0.35, (before, after)  # measured: 0.00 -> 0.48
    assert student.config == draft.config and not torch.equal(student.tok_emb.weight, draft.tok_emb.weight)
    again = distilled_draft(target, draft, **settings)  # cached: loaded, not retrained
    assert torch.equal(again.tok_emb.weight, student.tok_emb.weight)
