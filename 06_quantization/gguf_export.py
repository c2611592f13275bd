"""Export the mini-GPT to GGUF — the single-file format llama.cpp (and Ollama, LM Studio, llama-cpp-python) runs — in
F32, F16, Q8_0 or Q4_0, with our own Q8_0 / Q4_0 block quantizers (bit-identical to ``gguf.quants.quantize``).

    python 06_quantization/gguf_export.py                        # small model -> .cache/gguf/*.gguf (all four types)
    python 06_quantization/gguf_export.py --qtype q8_0 --out model.gguf

What goes into the file (see README): a header, key/value metadata (architecture "llama", context/embedding length,
block count, FFN length, head counts, RMS eps, RoPE base, the tokenizer's tokens/scores/types), tensor infos, then the
aligned tensor data under llama.cpp's names (``token_embd``, ``blk.N.attn_q`` …, ``output``). Two details matter:
- RoPE layout: our model (like HF) rotates the pairs (i, i + D/2); llama.cpp's ``llama`` architecture rotates adjacent
  pairs (2i, 2i + 1). Permuting the rows of W_q and W_k inside every head (the permutation HF's converter applies)
  makes the two equivalent, since q·k is unchanged by applying the same permutation to both.
- Block quantization: Q8_0 = 32 weights as one fp16 scale d = max|x|/127 + 32 int8 (34 bytes, 8.5 bits/weight);
  Q4_0 = one fp16 scale d = x_absmax_signed / −8 + 32 4-bit codes q = x/d + 8 (18 bytes, 4.5 bits/weight).
References: GGUF spec (github.com/ggml-org/ggml/blob/master/docs/gguf.md); llama.cpp convert_hf_to_gguf.py, ggml-quants.c.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from ch01.char_tokenizer import CharTokenizer
from ch01.gguf_loader import permute_rope  # one home for the Q/K row order (and its inverse)
from ch01.model import GPT
from ch06.gguf_reader import QK, dequantize_q4_0, dequantize_q8_0  # the block layouts' one home: our reader

QTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}


# ------------------------------------------------------------------------------------------ our block quantizers


def _blocks(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % QK:
        raise ValueError(f"row length {x.shape[-1]} is not a multiple of the block size {QK}")
    return x.detach().to(torch.float32).reshape(-1, QK)  # (n_blocks, 32)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf (ties away from zero) written the way ggml's reference does it, exactly in float32."""
    a = v.abs()
    fl = a.floor()
    return v.sign() * (fl + (2 * (a - fl)).floor())


def quantize_q8_0(x: torch.Tensor) -> np.ndarray:
    """x (rows, cols) -> uint8 (rows, cols/32·34): per block [fp16 d][32 × int8 q], d = max|x| / 127, q = round(x/d)."""
    blocks = _blocks(x)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127  # (n, 1) float32
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    qs = _round_half_away(blocks * inv).to(torch.int8).view(torch.uint8)  # (n, 32)
    out = torch.cat([d.to(torch.float16).view(torch.uint8), qs], dim=1)  # (n, 34)
    return out.reshape(*x.shape[:-1], -1).numpy()


def quantize_q4_0(x: torch.Tensor) -> np.ndarray:
    """x (rows, cols) -> uint8 (rows, cols/32·18): per block [fp16 d][16 bytes], d = (signed absmax) / −8,
    q = trunc(x/d + 8.5) ∈ [0, 15]; byte j holds q[j] in its low nibble and q[j + 16] in its high nibble."""
    blocks = _blocks(x)
    imax = blocks.abs().argmax(dim=1, keepdim=True)  # first index on ties, like numpy
    d = blocks.gather(1, imax) / -8  # (n, 1): the extreme value maps to code 0, so -8·d = max
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    qs = torch.trunc(blocks * inv + 8.5).to(torch.uint8).clamp(max=15)  # (n, 32)
    packed = qs[:, : QK // 2] | (qs[:, QK // 2 :] << 4)  # (n, 16)
    out = torch.cat([d.to(torch.float16).view(torch.uint8), packed], dim=1)  # (n, 18)
    return out.reshape(*x.shape[:-1], -1).numpy()


QUANTIZERS = {"q8_0": (quantize_q8_0, dequantize_q8_0), "q4_0": (quantize_q4_0, dequantize_q4_0)}


# ---------------------------------------------------------------------------------------------- tensors + metadata


def gguf_tensors(model: GPT) -> list[tuple[str, torch.Tensor]]:
    """(llama.cpp name, fp32 tensor) pairs in file order, q/k already permuted for llama.cpp's RoPE."""
    cfg = model.config
    if cfg.pos_emb != "rope" or cfg.norm != "rmsnorm" or cfg.mlp != "swiglu":
        raise ValueError("GGUF 'llama' export needs the Llama-style config (rope, rmsnorm, swiglu)")
    if cfg.attention_variants():
        raise ValueError(
            f"GGUF 'llama' export has plain attention; this model sets {', '.join(cfg.attention_variants())}"
        )
    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = [(names[T.TOKEN_EMBD] + ".weight", sd["tok_emb.weight"])]
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        pairs = [
            (T.ATTN_NORM, "attn_norm.weight"),
            (T.ATTN_Q, "attn.wq.weight"),
            (T.ATTN_K, "attn.wk.weight"),
            (T.ATTN_V, "attn.wv.weight"),
            (T.ATTN_OUT, "attn.wo.weight"),
            (T.FFN_NORM, "mlp_norm.weight"),
            (T.FFN_GATE, "mlp.w1.weight"),
            (T.FFN_UP, "mlp.w3.weight"),
            (T.FFN_DOWN, "mlp.w2.weight"),
        ]
        for kind, ours in pairs:
            w = sd[p + ours]
            if kind == T.ATTN_Q:
                w = permute_rope(w, cfg.n_head)
            elif kind == T.ATTN_K:
                w = permute_rope(w, cfg.n_kv_head)
            out.append((names[kind].format(bid=i) + ".weight", w))
    out.append((names[T.OUTPUT_NORM] + ".weight", sd["norm.weight"]))
    if not cfg.tie_weights:  # without output.weight llama.cpp reuses token_embd (tied embeddings)
        out.append((names[T.OUTPUT] + ".weight", sd["lm_head.weight"]))
    return out


def tensor_qtype(name: str, w: torch.Tensor, qtype: str) -> str:
    """The storage type of one tensor: norms (1-D) stay F32 as llama.cpp requires; rows not a multiple of 32 -> F16."""
    if w.ndim == 1 or qtype == "f32":
        return "f32"
    if qtype in QUANTIZERS and w.shape[-1] % QK:
        return "f16"
    return qtype


def encode_tensor(w: torch.Tensor, qtype: str) -> np.ndarray:
    if qtype == "f32":
        return w.numpy().astype(np.float32)
    if qtype == "f16":
        return w.numpy().astype(np.float16)
    return QUANTIZERS[qtype][0](w)


def rwkv_escape(piece: str) -> str:
    """llama.cpp's "rwkv" vocab unescapes backslash sequences; a literal backslash must be written as two."""
    return piece.replace("\\", "\\\\")


def add_tokenizer(writer: gguf.GGUFWriter, tok, vocab_size: int) -> None:
    """Our vocabulary in the GGUF tokenizer metadata: char-level -> llama.cpp type "rwkv", byte-level BPE -> "gpt2"."""
    from ch01.bpe import Tokenizer

    if isinstance(tok, Tokenizer):
        return add_bpe_tokenizer(writer, tok, vocab_size)
    if not isinstance(tok, CharTokenizer):
        raise TypeError(
            f"gguf_export writes CharTokenizer or ch01.bpe.Tokenizer vocabularies, not {type(tok).__name__}"
        )
    add_char_tokenizer(writer, tok, vocab_size)


def add_char_tokenizer(writer: gguf.GGUFWriter, tok: CharTokenizer, vocab_size: int) -> None:
    """The char vocab as llama.cpp vocab type "rwkv": tokenizing = greedy longest match of literal token strings
    (here: one character each), detokenizing = concatenation, and — unlike the "llama" (SPM) and "gpt2" (BPE) types,
    which default BOS/EOS to ids 1/2 or 11, real characters in a 65-token vocab ('!' would end every generation) —
    no special tokens at all, which is what a char-level model trained without BOS/EOS needs."""
    if tok.vocab_size != vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}")
    writer.add_tokenizer_model("rwkv")
    writer.add_token_list([rwkv_escape(c) for c in tok.chars])
    writer.add_token_scores([0.0] * vocab_size)
    writer.add_token_types([gguf.TokenType.NORMAL] * vocab_size)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def add_bpe_tokenizer(writer: gguf.GGUFWriter, tok, vocab_size: int) -> None:
    """ch01's byte-level BPE as llama.cpp vocab type "gpt2" with the tokenizer's own pre-tokenizer ("gpt-2", or
    "smollm" for SmolLM2's vocabulary): tokens and merges written through GPT-2's byte-to-unicode map, exactly as Hugging
    Face's files store them, special tokens as CONTROL, the chat template when there is one. BOS/EOS: the tokenizer's
    own, else our first special token (llama.cpp's gpt2 default, id 11, is an ordinary token in a small vocab)."""
    from ch01.bpe import bytes_to_unicode

    b2u = bytes_to_unicode()
    show = lambda b: "".join(b2u[x] for x in b)
    if len(tok.vocab) != vocab_size:
        raise ValueError(f"tokenizer has {len(tok.vocab)} tokens but the model's vocab_size is {vocab_size}")
    if sorted(tok.vocab) != list(range(vocab_size)):
        raise ValueError("BPE vocabulary ids must be 0..vocab_size-1")
    special = set(tok.special_ids.values())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(getattr(tok, "pre_tokenizer", "gpt-2"))  # ch01's names are llama.cpp's pre-types
    writer.add_token_list(
        [tok.vocab[i].decode("utf-8") if i in special else show(tok.vocab[i]) for i in range(vocab_size)]
    )
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(vocab_size)]
    )
    writer.add_token_merges([f"{show(a)} {show(b)}" for a, b in tok.merges])
    bos, eos = getattr(tok, "bos_id", None), getattr(tok, "eos_id", None)
    if special:
        writer.add_bos_token_id(min(special) if bos is None else bos)
        writer.add_eos_token_id(min(special) if eos is None else eos)
    if eos is not None:
        writer.add_pad_token_id(eos)
    if getattr(tok, "chat_template", None):
        writer.add_chat_template(tok.chat_template)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def export_gguf(model: GPT, tok, path: str | Path, qtype: str = "f32", name: str = "mini-gpt") -> Path:
    """Write ``model`` + ``tok`` as a llama.cpp-loadable GGUF file; returns the path."""
    if qtype not in QTYPES:
        raise ValueError(f"qtype={qtype!r}; choose one of {', '.join(QTYPES)}")
    cfg, path = model.config, Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.ffn_hidden)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    add_tokenizer(writer, tok, cfg.vocab_size)
    for tname, w in gguf_tensors(model):
        t = tensor_qtype(tname, w, qtype)
        writer.add_tensor(tname, encode_tensor(w, t), raw_dtype=QTYPES[t] if t in QUANTIZERS else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def q8_0_activations(module, inputs):
    """llama.cpp's CPU matmul for Q8_0/Q4_0 weights first quantizes the activations to Q8_0 blocks as well."""
    x = inputs[0]
    q = quantize_q8_0(x.reshape(-1, x.shape[-1]).cpu())  # our quantizers return numpy bytes: CPU
    return (dequantize_q8_0(q, x.shape).to(x.device, x.dtype),)


@torch.no_grad()
def gguf_roundtrip_model(model: GPT, qtype: str, quantize_activations: bool = False) -> GPT:
    """A copy of ``model`` whose weights went through exactly the storage type each gets in the GGUF file — what
    llama.cpp computes with — so its val loss is the file's val loss (activations stay fp32 here).

    ``quantize_activations`` also rounds every quantized layer's input to Q8_0, as llama.cpp's CPU kernels do
    (``vec_dot_type`` of Q8_0 and Q4_0 is Q8_0), to reproduce its logits rather than the weights' effect alone.
    The q/k row permutation can be ignored: blocks run along a row (the input dimension) and the permutation only
    reorders whole rows, so quantizing then permuting equals permuting then quantizing.
    """
    import copy

    out = copy.deepcopy(model)
    for name, w in out.state_dict().items():
        t = tensor_qtype(name, w, qtype)
        if t == "f16":
            w.copy_(w.half().float())
        elif t in QUANTIZERS:
            quant, dequant = QUANTIZERS[t]
            w.copy_(dequant(quant(w.float()), w.shape))
    if quantize_activations and qtype in QUANTIZERS:
        for name, m in out.named_modules():
            if isinstance(m, torch.nn.Linear) and tensor_qtype(name, m.weight, qtype) in QUANTIZERS:
                m.register_forward_pre_hook(q8_0_activations)
    return out


# ------------------------------------------------------------------------------- running the file in llama.cpp


def load_llama_cpp(path: str | Path, n_ctx: int, n_threads: int | None = None, f32_kv_cache: bool = True):
    """``llama_cpp.Llama`` on the GGUF file with logits kept for every position (``scores``); None if not installed.

    llama.cpp stores K/V in fp16 by default, which alone moves our logits by ~5e-4; an fp32 cache isolates the
    weight format (an F32 file then matches our torch model to ~2e-6).
    """
    try:
        import llama_cpp
    except ImportError:
        return None
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_kv_cache else {}
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        logits_all=True,
        verbose=False,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        seed=0,
        **kv,
    )


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    """(T, V) logits llama.cpp computes for ``ids`` from an empty context."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_cpp_greedy(llm, ids: list[int], n_new: int) -> list[int]:
    """Greedy continuation computed by llama.cpp (argmax of its logits, KV cache kept between steps)."""
    llm.reset()
    llm.eval(ids)
    out = list(ids)
    for _ in range(n_new):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out[len(ids) :]


def main(argv=None):
    from ch01.evaluate import evaluate_loss
    from ch06.quantize import pretrained, print_loss_table, script_parser
    from common.data import cache_dir

    p = script_parser(__doc__, out=True)
    p.add_argument("--qtype", nargs="*", default=list(QTYPES), choices=list(QTYPES))
    args = p.parse_args(argv)
    model, tok, (_, val_ids) = pretrained(args)
    out_dir = Path(args.out) if args.out else cache_dir("gguf")
    base = evaluate_loss(model, val_ids)
    rows = []
    for qt in args.qtype:
        path = export_gguf(model, tok, out_dir / f"{args.preset}-{qt}.gguf", qt)
        loss = evaluate_loss(gguf_roundtrip_model(model, qt), val_ids)
        rows.append({"qtype": qt, "file": str(path), "MB": path.stat().st_size / 1e6, "val_loss": loss})
    return print_loss_table(rows, base)


if __name__ == "__main__":
    main()
