"""Chapter 03 post-training: task generators and checkers, SFT's assistant-only loss (vs transformers' assistant mask
and TRL's SFTTrainer loss), GRPO's loss (vs TRL's GRPOTrainer._compute_loss) and a short GRPO run that learns."""

import types
from collections import defaultdict
from contextlib import nullcontext

import pytest
import torch

from ch01.char_tokenizer import CharTokenizer
from ch01.model import GPT, GPTConfig
from ch01.train import TrainConfig
from ch03.grpo import GRPOConfig, completion_logprobs, group_advantages, grpo_loss, grpo_train, toy_problem
from ch03.sft import CHATML, ChatTokenizer, encode_conversation, extend_model, masked_loss, pack, sft
from ch03.tasks import TASK_NAMES, Example, alphabet, check, make_examples, make_suite, parse_answer

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------------------- tasks
@pytest.mark.parametrize("task", TASK_NAMES)
def test_generators_deterministic_and_splits_disjoint(task):
    n = 60 if task == "cloze" else 200
    a, b = make_examples(task, n, "train", seed=3), make_examples(task, n, "train", seed=3)
    assert a == b and len({e.prompt for e in a}) == n
    assert make_examples(task, n, "train", seed=4) != a
    test = make_examples(task, 40, "test", seed=3)
    assert not {e.key for e in a} & {e.key for e in test}  # no operand pair / word / cloze line in both
    assert all(check(e, e.answer) for e in a + test)


def test_answers_are_right():
    add, sub = make_examples("add", 50, digits=3), make_examples("sub", 50, digits=2)
    assert all(int(e.answer) == eval(e.prompt[:-2]) for e in add + sub)  # "123+456=?" -> 579
    for e in make_examples("count", 50):
        letter, word = e.prompt.split()[2], e.prompt.split()[-1][:-1]
        assert int(e.answer) == word.count(letter)
    for e in make_examples("sort", 50, k=5):
        assert e.answer.split() == sorted(e.prompt.split()[1:], key=int)


@pytest.mark.parametrize(
    "task,answer,reply,ok",
    [
        ("add", "82", "82", True),
        ("add", "82", "The answer is 82.", True),
        ("add", "82", "80? no: 82", True),  # the last number counts
        ("add", "82", "82 or 83", False),
        ("add", "82", "8 2", False),
        ("add", "82", "82.5", False),
        ("add", "82", "820", False),
        ("add", "82", "x82", False),
        ("add", "82", "eighty-two", False),
        ("add", "82", "", False),
        ("sort", "1 2 5 9", "1 2 5 9", True),
        ("sort", "1 2 5 9", "sorted: 1, 2, 5, 9.", True),
        ("sort", "1 2 5 9", "1 2 5", False),
        ("sort", "1 2 5 9", "1259", False),
        ("sort", "1 2 5 9", "9 5 2 1", False),
        ("reverse", "olleh", "olleh", True),
        ("reverse", "olleh", "Reversed: olleh.", True),
        ("reverse", "olleh", "olleh hello", False),
        ("reverse", "olleh", "OLLEH", False),
        ("reverse", "olleh", "olleh2", False),
        ("count", "3", "there are 3 r's in it", True),
        ("count", "3", "3rd", False),
    ],
)
def test_checker_adversarial(task, answer, reply, ok):
    assert check(Example(task, "q", answer, "k"), reply) is ok


def test_bad_task_and_split():
    with pytest.raises(ValueError, match="unknown task"):
        make_examples("multiply", 3)
    with pytest.raises(ValueError, match="split"):
        make_examples("add", 3, split="val")
    with pytest.raises(ValueError, match="fewer than"):
        make_examples("add", 200, digits=1)  # only 100 pairs of one-digit numbers
    assert parse_answer("add", "no number") is None


# --------------------------------------------------------------------------------------------------------------- SFT
def chat_tok():
    return ChatTokenizer(CharTokenizer("ab"), extra_chars=alphabet())


def test_no_assistant_turn_is_an_error():
    with pytest.raises(ValueError, match="no assistant turn"):
        encode_conversation(chat_tok(), [{"role": "user", "content": "1+1=?"}])


def test_chat_tokenizer_round_trip(tmp_path):
    tok = chat_tok()
    text = "<|im_start|>user\n12+34=?<|im_end|>\n"
    ids = tok.encode(text)
    assert (
        tok.decode(ids) == text and ids[0] == tok.special_ids["<|im_start|>"] and len(ids) == len(text) - 20
    )  # two markers of 12 and 10 chars -> 2 ids
    assert ChatTokenizer.load(tok.save(tmp_path)).encode(text) == ids


def test_assistant_mask_matches_transformers(smollm2_path, tmp_path):
    """Our mask == transformers' return_assistant_tokens_mask (what TRL's assistant_only_loss uses), SmolLM2's vocab."""
    from transformers import AutoTokenizer

    from ch01.gguf_tokenizer import save_hf_tokenizer, tokenizer_from_gguf

    tok = tokenizer_from_gguf(smollm2_path)
    hf = AutoTokenizer.from_pretrained(save_hf_tokenizer(tok, tmp_path, chat_template=CHATML))
    train, _ = make_suite(1, 1)
    for e in train:
        msgs = [{"role": "system", "content": "Be brief."}, *e.messages(), {"role": "user", "content": "sure?"}]
        msgs.append({"role": "assistant", "content": f"yes, {e.answer}"})
        ref = hf.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = encode_conversation(tok, msgs)
        assert ids == ref["input_ids"] and mask == list(ref["assistant_masks"])


def test_sft_loss_matches_trl(tmp_path):
    """Our packed, assistant-only loss == TRL SFTTrainer.compute_loss on the same conversations (padded, unpacked)."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from ch01.hf_interop import to_hf

    torch.manual_seed(0)
    tok = chat_tok()
    model = GPT(GPTConfig.preset("tiny", vocab_size=tok.vocab_size, block_size=192)).eval()
    train, _ = make_suite(2, 1, tasks=("add", "count", "reverse", "cloze"))
    docs = [encode_conversation(tok, e.messages()) for e in train]
    packed = pack(docs, 192)
    assert len(packed["idx"]) < len(docs)  # several conversations share a row
    ours = masked_loss(model, packed["idx"], packed["targets"], packed["positions"], packed["doc"])["loss"]
    pad = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")))
    pad.pad_token = "<pad>"  # TRL only needs a pad id: the dataset is already tokenized
    ds = datasets.Dataset.from_list([{"input_ids": i, "assistant_masks": m} for i, m in docs])
    args = trl.SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=len(docs), report_to=[], use_cpu=True, max_length=None
    )
    trainer = trl.SFTTrainer(model=to_hf(model).eval(), args=args, train_dataset=ds, processing_class=pad)
    batch = next(iter(trainer.get_train_dataloader()))
    ref = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-5)


def test_sft_through_ch01_train_lowers_loss():
    torch.manual_seed(0)
    tok = chat_tok()
    model = extend_model(GPT(GPTConfig.preset("tiny", vocab_size=40)), tok.vocab_size, block_size=96)
    assert model.config.vocab_size == tok.vocab_size and model.config.block_size == 96
    train, _ = make_suite(40, 1, tasks=("add", "reverse"))
    tc = TrainConfig(max_iters=40, batch_size=8, lr=3e-3, warmup_iters=4, out_dir=None, progress=False, device="cpu")
    losses = sft(model, tok, [e.messages() for e in train], tc)["train_losses"]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


# -------------------------------------------------------------------------------------------------------------- GRPO
def test_group_advantages_closed_form():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    adv = group_advantages(r, 4)
    g = r.view(2, 4)
    torch.testing.assert_close(adv.view(2, 4), (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4))
    torch.testing.assert_close(group_advantages(r, 4, scale=False).view(2, 4), g - g.mean(1, keepdim=True))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def _fake_trl_trainer(loss_type: str, beta: float, eps: float, max_len: int, hf):
    """The attributes GRPOTrainer._compute_loss reads, so TRL's own code runs without a full trainer."""
    from trl import GRPOTrainer

    acc = types.SimpleNamespace(
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction="sum": x,
        autocast=nullcontext,
        is_main_process=True,
    )
    fake = types.SimpleNamespace(
        accelerator=acc, model=hf, beta=beta, loss_type=loss_type, epsilon_low=eps, epsilon_high=eps,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False), use_vllm=False,
        vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1, max_completion_length=max_len,
        aux_loss_enabled=False, _entropy_bonus_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
    )  # fmt: skip
    fake._get_per_token_logps_and_entropies = types.MethodType(GRPOTrainer._get_per_token_logps_and_entropies, fake)
    return types.MethodType(GRPOTrainer._compute_loss, fake)


@pytest.mark.parametrize("dr_grpo", [False, True])
def test_grpo_loss_matches_trl(dr_grpo):
    """Same tiny model (ours and its HF twin), ragged prompts, completions of different lengths, old/ref log-probs
    that differ from the current ones (so ratios clip and the KL is non-zero): TRL's loss == ours."""
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    from ch01.hf_interop import to_hf

    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=50)).eval()
    hf = to_hf(model).eval()
    add_fused_lm_head(hf, outputs=("log_probs", "entropy"))  # what GRPOTrainer does to its model
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12], [13]]
    Tc, max_len = 6, 8
    completions = torch.randint(1, 50, (4, Tc))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] + [0] * 5]).float()
    adv = torch.tensor([1.2, -0.7, 0.3, -1.5])
    with torch.no_grad():
        cur = completion_logprobs(model, prompts, completions)
    old, ref_lp = cur + 0.3 * torch.randn_like(cur), cur + 0.5 * torch.randn_like(cur)
    ours, _ = grpo_loss(cur, old, ref_lp, adv, mask, beta=0.04, epsilon=0.2, dr_grpo=dr_grpo, max_len=max_len)

    Tp = max(map(len, prompts))
    prompt_ids = torch.tensor([[0] * (Tp - len(p)) + p for p in prompts])  # TRL pads prompts on the left
    prompt_mask = torch.tensor([[0] * (Tp - len(p)) + [1] * len(p) for p in prompts])
    inputs = dict(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completions, completion_mask=mask.long(),
        advantages=adv, old_per_token_logps=old, ref_per_token_logps=ref_lp,
    )  # fmt: skip
    compute_loss = _fake_trl_trainer("dr_grpo" if dr_grpo else "grpo", 0.04, 0.2, max_len, hf)
    with torch.no_grad():
        ref = compute_loss(hf, inputs)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_short_grpo_run_raises_reward():
    model, tok, prompts, reward = toy_problem(seed=0)
    cfg = GRPOConfig(steps=20, max_new_tokens=2, lr=3e-3, seed=0)
    history = grpo_train(model, tok, prompts, cfg, reward_fn=reward)
    first, last = sum(history["reward"][:5]) / 5, sum(history["reward"][-5:]) / 5
    assert last > first + 0.4 and history["kl"][-1] > 0


def test_evaluate_tasks_any_model():
    """A chat model is asked through its template; a plain char model gets None where its vocabulary cannot even
    write the question (tiny-shakespeare has no digits but 3), and a float where it can."""
    from ch03.tasks import evaluate_tasks

    torch.manual_seed(0)
    tok = chat_tok()
    model = GPT(GPTConfig.preset("tiny", vocab_size=tok.vocab_size, block_size=192))
    acc = evaluate_tasks(model, tok, n=4, max_new_tokens=4)
    assert set(acc) == {*TASK_NAMES, "mean"} and all(0 <= v <= 1 for v in acc.values())
    shakespeare = CharTokenizer("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    acc = evaluate_tasks(GPT(GPTConfig.preset("tiny", vocab_size=65)), shakespeare, n=4, max_new_tokens=4)
    assert acc["add"] is None and acc["sort"] is None and acc["reverse"] == 0.0


def test_replay_rows_are_plain_next_token_windows_of_the_pretraining_tokens():
    from ch03.sft import replay_batches, sft_batches

    tok = ChatTokenizer(CharTokenizer.from_text("abc 0123456789+=?-"), extra_chars=alphabet())
    docs = [encode_conversation(tok, e.messages()) for e in make_examples("add", 20, seed=0)]
    packed = pack(docs, 32)
    data = torch.arange(1000) % 7  # "pretraining" tokens with a pattern we can check
    batch_fn = replay_batches(sft_batches(packed, 3, seed=0), data, rows=2, block_size=32, seed=0)
    idx, targets, positions, doc = batch_fn()
    assert idx.shape == targets.shape == positions.shape == doc.shape == (5, 32)
    sft_rows, replay = slice(0, 3), slice(3, 5)
    assert (targets[sft_rows] == -100).any()  # SFT rows: prompts are context, not targets
    assert torch.equal(targets[replay], (idx[replay] + 1) % 7)  # replay rows: every next token is a target
    assert torch.equal(positions[replay], torch.arange(32).expand(2, -1)) and (doc[replay] == 0).all()
