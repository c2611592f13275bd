"""Chat templates: how a list of messages becomes the one string an instruction-tuned model was trained on.

A chat model ships a Jinja template (SmolLM2's is ChatML: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, a
default system message when there is none, and ``<|im_start|>assistant\\n`` as the generation prompt). We render it the
way transformers' ``apply_chat_template`` does — a sandboxed Jinja environment (templates come from model files: untrusted
code) with trim_blocks/lstrip_blocks, ``raise_exception``, a non-HTML-escaping ``tojson``, loop controls, and the
variables ``messages``, ``tools``, ``documents``, ``add_generation_prompt`` plus the tokenizer's special tokens — so the
string is identical (tests/test_01_chat_template.py compares them), then encode it with special tokens matched whole.

    from ch01.chat_template import apply_chat_template, render_chat
    render_chat(tok.chat_template, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = apply_chat_template(tok, [{"role": "user", "content": "Hi"}])   # = tok.apply_chat_template(...)

Refs: Jinja2 sandbox docs; Hugging Face transformers ``utils/chat_template_utils.py``; ChatML (OpenAI 2023).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


def raise_exception(message: str):
    """Lets a template reject a conversation, e.g. ``{{ raise_exception('roles must alternate') }}``."""
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """JSON without Jinja's HTML escaping (tool schemas must reach the model verbatim)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """The template compiled once in a sandbox configured like transformers' (whitespace control included)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = False, **extra) -> str:
    """The prompt string for ``messages`` ([{"role": ..., "content": ...}, ...]); ``add_generation_prompt`` appends the
    assistant header the model continues from; ``extra`` reaches the template as variables (bos_token, tools, ...)."""
    variables = {"tools": None, "documents": None, **extra}
    return compile_template(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **variables
    )


def apply_chat_template(tok, messages: list[dict], add_generation_prompt: bool = True, **extra) -> list[int]:
    """Token ids of ``messages`` rendered with ``tok.chat_template`` (special tokens such as <|im_start|> become their
    single ids). The template sees ``bos_token`` / ``eos_token`` like in transformers."""
    template = getattr(tok, "chat_template", None)
    if not template:
        raise ValueError("this tokenizer has no chat_template (read one from a GGUF or a Hugging Face directory)")
    by_id = {i: s for s, i in tok.special_ids.items()}
    names = {"bos_token": by_id.get(getattr(tok, "bos_id", None)), "eos_token": by_id.get(getattr(tok, "eos_id", None))}
    names = {k: v for k, v in names.items() if v is not None}
    return tok.encode(render_chat(template, messages, add_generation_prompt, **{**names, **extra}))


__all__ = ["apply_chat_template", "compile_template", "render_chat"]
