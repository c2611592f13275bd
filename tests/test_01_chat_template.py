"""ch01.chat_template: our rendering of chat templates vs transformers' apply_chat_template (same string, same ids)."""

import gguf
import jinja2
import pytest

from ch01.chat_template import apply_chat_template, render_chat
from ch01.gguf_tokenizer import gguf_tokenizer_metadata, save_hf_tokenizer, tokenizer_from_gguf

CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "  And   ünïcode\nwith newlines? 👋  "},
]
WITH_SYSTEM = [{"role": "system", "content": "You are terse."}, *CHAT]

# Exercises what real templates use: whitespace control ({%- -%}, trim/lstrip of indented blocks), raise_exception,
# loop controls, namespace, tojson (no HTML escaping), bos_token, tools and extra variables.
RICH_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(n=0) %}
{% if tools %}
    Tools: {{ tools | tojson }}
{% endif %}
{% for m in messages %}
    {% if m['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + m['role']) }}
    {% endif %}
    {% if m['role'] == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    [{{ ns.n }}] <{{ m['role'] }}>
      {{- m['content'] | trim }}</{{ m['role'] }}>
    {% if ns.n >= limit | default(99) %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}"""


@pytest.fixture(scope="session")
def smol(smollm2_path):
    return tokenizer_from_gguf(gguf_tokenizer_metadata(gguf.GGUFReader(str(smollm2_path))))


def _hf(template: str):
    """A transformers tokenizer that only carries the template and special tokens (its vocabulary is irrelevant)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        chat_template=template,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


@pytest.mark.parametrize("messages", [CHAT, WITH_SYSTEM], ids=["no-system", "system"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_smollm2_template_renders_like_transformers(smol, messages, add_generation_prompt):
    ours = render_chat(smol.chat_template, messages, add_generation_prompt=add_generation_prompt)
    theirs = _hf(smol.chat_template).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    assert ours.startswith("<|im_start|>system\n") and ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
    assert ("You are a helpful AI assistant" in ours) == (messages is CHAT)  # default system message only without one


@pytest.mark.parametrize("messages", [CHAT, WITH_SYSTEM], ids=["no-system", "system"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("extra", [{}, {"limit": 1}, {"tools": [{"name": "add", "description": "a <b> & 'c'"}]}])
def test_rich_template_renders_like_transformers(messages, add_generation_prompt, extra):
    hf = _hf(RICH_TEMPLATE)
    theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)
    ours = render_chat(RICH_TEMPLATE, messages, add_generation_prompt, bos_token="<s>", eos_token="</s>", **extra)
    assert ours == theirs and ours.startswith("<s>")


def test_raise_exception_and_sandbox():
    bad = [{"role": "tool", "content": "x"}]
    with pytest.raises(jinja2.TemplateError, match="unknown role tool"):
        render_chat(RICH_TEMPLATE, bad)
    with pytest.raises(jinja2.exceptions.SecurityError):  # templates come from model files: no attribute escapes
        render_chat("{{ messages.__class__.__mro__ }}", CHAT)
    with pytest.raises(jinja2.exceptions.SecurityError):  # immutable: a template cannot edit the caller's messages
        render_chat("{{ messages.append(1) }}", CHAT)


def test_apply_chat_template_ids_match_transformers(smol, tmp_path):
    save_hf_tokenizer(smol, tmp_path)
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    for messages in (CHAT, WITH_SYSTEM):
        ids = smol.apply_chat_template(messages)  # add_generation_prompt=True by default: ready to generate
        assert ids == apply_chat_template(smol, messages, add_generation_prompt=True)
        assert ids == list(auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
        assert ids[-4:] == smol.encode("<|im_start|>assistant\n") == [smol.bos_id, 520, 9531, 198]
        assert ids.count(smol.eos_id) == 4  # one <|im_end|> per message, the default system message included


def test_tokenizer_without_template_says_so():
    from ch01.bpe import Tokenizer

    with pytest.raises(ValueError, match="no chat_template"):
        Tokenizer({i: bytes([i]) for i in range(256)}, []).apply_chat_template(CHAT)
