"""Generate text from a trained mini-GPT: temperature, top-k and top-p (nucleus) sampling, or greedy.

    python 01_transformer_from_scratch/train.py                 # writes .cache/runs/ch01/model/
    python 01_transformer_from_scratch/sample.py --prompt "ROMEO:" --temperature 0.8 --top-k 50

References: Holtzman et al. 2020 (nucleus sampling); Radford et al. 2019.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ch01.model import GPT
from ch01.tokenizer import load_tokenizer
from common.cli import base_parser
from common.data import cache_dir
from common.device import pick_device


def load_model_and_tokenizer(model_dir: str | Path, device: str = "cpu"):
    model_dir = Path(model_dir)
    if not (model_dir / "model.safetensors").exists():
        raise SystemExit(
            f"no trained model in {model_dir}: run `python 01_transformer_from_scratch/train.py` first "
            "or pass --model-dir"
        )
    try:
        tok = load_tokenizer(model_dir)  # char or BPE: whichever train.py saved
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    return GPT.load(model_dir, map_location=str(device)).eval(), tok


def main(argv=None) -> dict:
    p = base_parser(__doc__, device=True, seed=True)
    p.add_argument("--model-dir", default=str(cache_dir("runs", "ch01") / "model"))
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    args = p.parse_args(argv)
    if args.temperature < 0 or (args.top_p is not None and not 0 < args.top_p <= 1):
        p.error("--temperature must be >= 0 and --top-p in (0, 1]")
    device = pick_device(args.device)
    model, tok = load_model_and_tokenizer(args.model_dir, device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    prompt = torch.tensor([tok.encode(args.prompt)] * args.num_samples, device=device)  # (N, T0)
    out = model.generate(
        prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=gen
    )
    texts = [tok.decode(row.tolist()) for row in out]
    for i, text in enumerate(texts):
        print(f"--- sample {i} ---\n{text}")
    return {"samples": texts}


if __name__ == "__main__":
    main()
