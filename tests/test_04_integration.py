"""ch04 attention implementations plugged into the ch01 model: 20 training steps match the sdpa losses."""

import pytest
import torch

import ch04.flash_pytorch  # noqa: F401  (registers "flash_pytorch")
import ch04.flash_triton as ft  # registers "flash_triton"
from ch01.char_tokenizer import CharTokenizer
from ch01.model import ATTENTION_IMPLS, GPT, GPTConfig
from common.data import load_shakespeare


def _train_losses(attn_impl: str, steps: int = 20, batch: int = 2, block_size: int = 32) -> list[float]:
    """Same init, same batches, same AdamW: only the attention implementation differs."""
    device = "cpu" if ft.INTERPRET else "cuda"
    torch.manual_seed(0)
    text = load_shakespeare()[:20000]
    tok = CharTokenizer.from_text(text)
    ids = torch.tensor(tok.encode(text))
    cfg = GPTConfig.preset("tiny", vocab_size=tok.vocab_size, block_size=block_size, attn_impl=attn_impl)
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    starts = torch.randint(0, len(ids) - block_size - 1, (steps, batch), generator=torch.Generator().manual_seed(1))
    data = ids[starts[..., None] + torch.arange(block_size + 1)].to(device)  # (steps, batch, T+1)
    losses = []
    for step in range(steps):
        loss = model.loss(data[step, :, :-1], data[step, :, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_registered():
    assert {"flash_triton", "flash_pytorch"} <= set(ATTENTION_IMPLS)


@pytest.fixture(scope="module")
def sdpa_losses():
    return _train_losses("sdpa")


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "impl",
    [
        "flash_pytorch",
        # the Triton interpreter costs ~1 s of CPU per step here: 20 steps are a slow test, a 5-step prefix is not
        pytest.param("flash_triton", marks=pytest.mark.slow),
    ],
)
def test_twenty_training_steps_match_sdpa(impl, sdpa_losses):
    losses = _train_losses(impl)
    assert losses[-1] < losses[0] - 0.3  # it trains
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(sdpa_losses), atol=2e-4, rtol=1e-4)


@pytest.mark.timeout(600)
def test_flash_triton_first_steps_match_sdpa(sdpa_losses):
    losses = _train_losses("flash_triton", steps=5)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(sdpa_losses[:5]), atol=2e-4, rtol=1e-4)
