"""How fast is our pure-Python byte-level BPE? Training time and encode throughput, next to Rust implementations.

Measures (median over repeats, one process): ``train_bpe`` with vocab 500 on the first 130 KB of tiny-shakespeare and
with vocab 4096 on all of it (split into pre-token counting and the merge loop), training time against vocab size (plot),
and encode throughput in MB/s of our encoder (cold and warm pre-token cache) against tiktoken built from *our* ranks
(same ids, checked). Hugging Face ``tokenizers``' ByteLevel BPE trainer is timed as a reference point only: its tie
rules differ, so its vocabulary is not expected to equal ours.

Run:  python 01_transformer_from_scratch/bench_bpe.py            (about half a minute on a laptop CPU)
Refs: Sennrich et al. 2016; Radford et al. 2019; tiktoken (github.com/openai/tiktoken).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ch01.bpe import Tokenizer, count_pretokens, merge_pretokens, train_bpe
from common.bench import hardware_info, markdown_table, timeit
from common.cli import base_parser
from common.data import load_shakespeare
from common.plot import assets_dir, bar_plot, line_plot

EOT = "<|endoftext|>"


def _hf_train_seconds(path: Path, vocab_size: int, repeats: int) -> float | None:
    try:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers
    except ImportError:
        return None

    def run():
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train([str(path)], trainer)

    return timeit(run, warmup=1, repeats=repeats).median


def _train_row(label: str, path: Path, vocab_size: int, repeats: int) -> dict:
    text = path.read_text(encoding="utf-8")
    total = timeit(lambda: train_bpe(path, vocab_size, [EOT]), warmup=1, repeats=repeats).median
    counts = count_pretokens(text, [EOT])
    count_s = timeit(lambda: count_pretokens(text, [EOT]), warmup=0, repeats=repeats).median
    merge_s = timeit(lambda: merge_pretokens(counts, vocab_size - 257, first_id=1), warmup=0, repeats=repeats).median
    hf = _hf_train_seconds(path, vocab_size, repeats)
    return {
        "corpus": label,
        "vocab": vocab_size,
        "unique pre-tokens": len(counts),
        "train_bpe (s)": total,
        "pre-token count (s)": count_s,
        "merge loop (s)": merge_s,
        "HF tokenizers, Rust (s)": hf if hf is not None else float("nan"),
    }


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    p.add_argument("--sweep", type=int, nargs="*", default=[300, 500, 1000, 2000, 4096], help="vocab sizes to plot")
    args = p.parse_args(argv)
    text = load_shakespeare()
    out_dir = assets_dir(__file__)
    print(f"machine: {hardware_info()}\n")

    with tempfile.TemporaryDirectory() as tmp:
        small, full = Path(tmp) / "shakespeare_130k.txt", Path(tmp) / "shakespeare.txt"
        small.write_text(text[:130_000], encoding="utf-8")
        full.write_text(text, encoding="utf-8")
        train_rows = [
            _train_row("tiny-shakespeare, first 130 KB", small, 500, args.repeats),
            _train_row("tiny-shakespeare, all 1.1 MB", full, 4096, max(1, args.repeats // 2)),
        ]
        print("## Training\n")
        print(markdown_table(train_rows))

        sweep = {}
        for v in args.sweep:
            t0 = time.perf_counter()
            vocab, merges = train_bpe(full, v, [EOT])
            sweep[v] = time.perf_counter() - t0
    line_plot(
        {"train_bpe on tiny-shakespeare (1.1 MB)": (list(sweep), list(sweep.values()))},
        out_dir / "bpe_train_time.png",
        title="BPE training time vs vocabulary size",
        xlabel="vocabulary size",
        ylabel="seconds",
    )

    # Encode throughput with the last sweep tokenizer (the largest vocabulary).
    tok = Tokenizer(vocab, merges, [EOT])
    enc = tok.to_tiktoken()
    if tok.encode(text) != enc.encode(text, allowed_special="all"):
        raise AssertionError("our encoder and tiktoken disagree; throughput numbers would be meaningless")
    n_bytes = len(text.encode("utf-8"))
    fns = {
        "ours, cold cache": lambda: Tokenizer(vocab, merges, [EOT]).encode(text),
        "ours, warm cache": lambda: tok.encode(text),
        "tiktoken, our ranks (1 thread)": lambda: enc.encode(text, allowed_special="all"),
    }
    enc_rows = []
    for name, fn in fns.items():
        t = timeit(fn, warmup=1, repeats=args.repeats)
        enc_rows.append({"encoder": name, "median (s)": t.median, "MB/s": n_bytes / t.median / 1e6})
    base = enc_rows[-1]["MB/s"]
    for r in enc_rows:
        r["vs tiktoken"] = r["MB/s"] / base
    print(f"\n## Encoding all of tiny-shakespeare ({n_bytes / 1e6:.2f} MB, vocab {len(vocab)}, identical ids)\n")
    print(markdown_table(enc_rows))
    bar_plot(
        {r["encoder"]: r["MB/s"] for r in enc_rows},
        out_dir / "bpe_encode_throughput.png",
        title=f"BPE encode throughput, vocab {len(vocab)}",
        ylabel="MB/s",
    )
    print(f"\nplots: {out_dir / 'bpe_train_time.png'}, {out_dir / 'bpe_encode_throughput.png'}")
    return {"train": train_rows, "sweep": sweep, "encode": enc_rows}


if __name__ == "__main__":
    main()
