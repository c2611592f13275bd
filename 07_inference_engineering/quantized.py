"""Quantized decoding: weights kept in llama.cpp's Q8_0 / Q4_0 / Q4_1 blocks and multiplied in ``quant_kernels.c``.

    from ch07.fused_decode import FusedDecoder
    fast = FusedDecoder.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # blocks straight from the file, no F32 copy
    fast = FusedDecoder(model, quant="q8_0")                          # or quantized here with chapter 06's quantizer
    logits = fast(idx, positions=pos, cache=cache)                    # GPT.forward's contract, as before

    python 07_inference_engineering/quantized.py                      # kernel vs dequantize-then-matmul, µs per call

Why: a decode step reads every weight once, so its time is bytes / bandwidth. SmolLM2-135M is 538 MB in float32,
143 MB in Q8_0 (8.5 bits per weight), 76–85 MB in Q4_0 / Q4_1 (4.5 / 5 bits): 3.8–7x fewer bytes per token.

``QuantWeight`` holds one (N, K) matrix as blocks of 32 weights of a row: fp16 scales (N, K/32) and codes — int8
(N, K) for Q8_0, 16 bytes of nibbles per block for Q4_0/Q4_1 (weight j < 16 in byte j's low nibble, j >= 16 in byte
j-16's high nibble, chapter 06's reader documents the layouts). A GGUF tensor's bytes are only split into these two
arrays: no weight is ever dequantized to float. As in llama.cpp, the kernel quantizes the INPUT row to Q8_0 as well
(one scale per 32 values) and does integer dot products per block; the numerical consequence is that the output
equals the dequantized weights times the Q8_0-rounded input (``q8_round`` here), not times the exact input. The
tests check the kernel against exactly that (to float rounding) and against the exact-input product (to the
rounding's size); greedy tokens equal a ch01 model with the dequantized weights and the same input rounding (chapter
06's ``q8_0_activations`` hooks) — which is llama.cpp's arithmetic.

RMSNorm's gain cannot be folded into quantized weights without quantizing again (the F32 decoder folds it), so here
it multiplies the input before the input is quantized — llama.cpp's order too — and attention's 1/sqrt(D) is a
per-output multiplier in the kernel. Without a C compiler the same arithmetic runs in torch (slowly: dequantized
weights cached on first use). References: llama.cpp ggml-quants.c / ggml-cpu quants.c (vec_dot_q8_0_q8_0,
vec_dot_q4_0_q8_0, vec_dot_q4_1_q8_1); Dettmers et al. 2022 (LLM.int8()) for why weight-only int8 keeps quality.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ch06.gguf_export import quantize_q4_0, quantize_q8_0
from ch06.gguf_reader import GGML_TYPE_IDS, GGML_TYPES, QK, dequantize, dequantize_q8_0
from ch07 import decode_kernels

QTYPES = {"q8_0": 0, "q4_0": 1, "q4_1": 2}  # the kernel's type ids
BLOCK_BYTES = {q: GGML_TYPES[GGML_TYPE_IDS[q.upper()]][2] for q in QTYPES}  # 34, 18, 20 bytes per 32 weights


def quantize_q4_1(x: torch.Tensor) -> np.ndarray:
    """x (rows, cols) -> Q4_1 blocks (rows, cols/32·20) with the ``gguf`` package's reference quantizer (chapter 06
    writes Q8_0 and Q4_0 itself; Q4_1 is what SmolLM2's GGUF ships)."""
    import gguf
    from gguf.quants import quantize

    return quantize(x.detach().float().numpy(), gguf.GGMLQuantizationType.Q4_1)


QUANTIZERS = {"q8_0": quantize_q8_0, "q4_0": quantize_q4_0, "q4_1": quantize_q4_1}


def q8_round(x: torch.Tensor) -> torch.Tensor:
    """What the kernel multiplies instead of x (M, K): each row's 32-value blocks rounded to Q8_0 (fp16 scale)."""
    return dequantize_q8_0(quantize_q8_0(x.float().cpu()), x.shape).to(x.device)


class QuantWeight:
    """A constant weight W (N, K) (nn.Linear's (out, in) layout, blocks along the input) in Q8_0 / Q4_0 / Q4_1.

    ``w(x, residual=None, rms_eps=None)`` has ``PackedWeight``'s contract: (M, K) -> (M, N) = rmsnorm?(x)·gain @ Wᵀ
    (times ``row_mult`` per output, plus ``residual`` in place). ``q8_input=True`` rounds the input to Q8_0 first and
    uses integer dot products (llama.cpp's arithmetic, the fast one); False multiplies the exact input by the
    dequantized weights (the same result as dequantize-then-matmul, up to float32 summation order)."""

    def __init__(self, blocks, qtype: str, gain=None, row_mult=None, use_kernel: bool = True, q8_input: bool = True):
        if qtype not in QTYPES:
            raise ValueError(f"qtype={qtype!r}; the quantized kernels take {', '.join(QTYPES)}")
        b = torch.from_numpy(np.array(blocks, dtype=np.uint8))  # (N, nb·block bytes), a writable copy
        N, bb = b.shape[0], BLOCK_BYTES[qtype]
        if b.dim() != 2 or b.shape[1] % bb:
            raise ValueError(f"{qtype} blocks must be (rows, a multiple of {bb} bytes), got {tuple(b.shape)}")
        b = b.view(N, -1, bb)  # (N, nb, bytes per block)
        self.qtype, self.out_features, self.in_features = qtype, N, b.shape[1] * QK
        self.d = b[:, :, :2].contiguous().view(torch.int16).view(N, -1)  # (N, nb) fp16 bits
        self.m = b[:, :, 2:4].contiguous().view(torch.int16).view(N, -1) if qtype == "q4_1" else None
        self.qs = b[:, :, 4 if qtype == "q4_1" else 2 :].contiguous().view(N, -1)  # (N, K) int8 | (N, K/2) nibbles
        self.gain = None if gain is None else gain.detach().float().contiguous()  # (K,)
        self.row_mult = None if row_mult is None else row_mult.detach().float().contiguous()  # (N,)
        self.lib = decode_kernels.load_library() if use_kernel else None
        self.q8_input = q8_input
        self._dense = None
        if self.lib is not None:  # the hot path's constant arguments, looked up once
            ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
            self._q_matmul = self.lib.q_matmul
            self._head = (QTYPES[qtype], ptr(self.qs), ptr(self.d), ptr(self.m))
            self._tail = (ptr(self.gain), ptr(self.row_mult), int(q8_input))

    @classmethod
    def from_float(cls, w: torch.Tensor, qtype: str, **kw) -> QuantWeight:
        """Quantize a float (N, K) weight (K a multiple of 32) with chapter 06's / gguf's block quantizer."""
        if qtype not in QUANTIZERS:
            raise ValueError(f"qtype={qtype!r}; choose one of {', '.join(QUANTIZERS)}")
        return cls(QUANTIZERS[qtype](w.detach().float().cpu()), qtype, **kw)

    @property
    def nbytes(self) -> int:
        """Bytes a product reads: codes + scales (+ minimums) — the GGUF tensor's size."""
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def blocks(self, rows: torch.Tensor | None = None) -> np.ndarray:
        """The GGUF byte layout back, of all rows or of ``rows``: (rows, nb·block bytes) uint8."""
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])  # noqa: E731
        d, qs = pick(self.d), pick(self.qs)
        N, nb = d.shape
        parts = [d.view(torch.uint8).view(N, nb, 2)]
        parts += [] if self.m is None else [pick(self.m).view(torch.uint8).view(N, nb, 2)]
        parts.append(qs.view(torch.uint8).view(N, nb, -1))
        return torch.cat(parts, dim=2).view(N, -1).numpy()

    def dequantized(self) -> torch.Tensor:
        """(N, K) float32 weights, through chapter 06's dequantizers (for references and the torch fallback)."""
        ggml_type = self.qtype.upper()
        return dequantize(self.blocks(), ggml_type, (self.out_features, self.in_features))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` dequantized (an embedding lookup on a quantized table): (len(ids), K)."""
        ids = ids.reshape(-1).cpu()
        return dequantize(self.blocks(ids), self.qtype.upper(), (len(ids), self.in_features))

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None, rms_eps: float | None = None):
        M, K = x.shape
        if K != self.in_features:
            raise ValueError(f"input has {K} features, the weight takes {self.in_features}")
        if self.lib is None or x.dtype != torch.float32 or x.device.type != "cpu":
            return self._torch(x, residual, rms_eps)
        x = x.contiguous()
        N = self.out_features
        if residual is None:
            y, add = torch.empty(M, N), 0
        else:
            y, add = residual, 1
            if not (y.is_contiguous() and y.shape == (M, N) and y.dtype == torch.float32):
                raise ValueError(f"residual must be a contiguous float32 ({M}, {N}) tensor")
        norm = rms_eps is not None
        err = self._q_matmul(*self._head, x.data_ptr(), y.data_ptr(), M, K, N, add, norm, rms_eps or 0.0, *self._tail)
        if err:
            raise MemoryError("q_matmul could not allocate its activation buffers")
        return y

    def _torch(self, x, residual, rms_eps):
        """The kernel's arithmetic in torch: norm, gain, (Q8_0-rounded) input, dequantized weights."""
        if self._dense is None:
            self._dense = self.dequantized().t().contiguous()  # (K, N)
        h = x.float() if rms_eps is None else F.rms_norm(x.float(), (x.shape[1],), None, rms_eps)
        h = h if self.gain is None else h * self.gain
        h = q8_round(h) if self.q8_input else h
        y = h @ self._dense
        y = y if self.row_mult is None else y * self.row_mult
        return y if residual is None else residual.add_(y)


# --------------------------------------------------------------------------------- building a quantized decoder


class Blocks(NamedTuple):
    """One matrix (N, K) still in a GGUF file's block format: bytes (N, K/32·block bytes)."""

    data: np.ndarray
    qtype: str


def _cat_rows(parts: list) -> Blocks | torch.Tensor:
    """Stack matrices along the output dimension (fused QKV, gate+up): blocks stay blocks if all share one type."""
    if all(isinstance(p, Blocks) for p in parts) and len({p.qtype for p in parts}) == 1:
        return Blocks(np.concatenate([p.data for p in parts]), parts[0].qtype)
    dense = [p if isinstance(p, torch.Tensor) else _dequantize(p) for p in parts]
    return torch.cat([t.detach().float() for t in dense])


def _dequantize(b: Blocks) -> torch.Tensor:
    return dequantize(b.data, b.qtype.upper(), (b.data.shape[0], b.data.shape[1] // BLOCK_BYTES[b.qtype] * QK))


def make_weight(w, gain=None, row_mult=None, quant: str | None = None, kernels: bool = True, q8_input: bool = True):
    """A decoder weight from an (N, K) matrix: GGUF ``Blocks`` -> ``QuantWeight`` as they are; a float matrix ->
    quantized to ``quant`` (K a multiple of 32), else a ``PackedWeight`` in (K, N) with gain and multiplier folded."""
    kw = dict(gain=gain, row_mult=row_mult, use_kernel=kernels, q8_input=q8_input)
    if isinstance(w, Blocks):
        return QuantWeight(w.data, w.qtype, **kw)
    if quant is not None and w.shape[1] % QK == 0:
        return QuantWeight.from_float(w, quant, **kw)
    folded = w.detach().float().t().contiguous()  # (K, N)
    folded = folded if gain is None else folded * gain.detach().float()[:, None]
    folded = folded if row_mult is None else folded * row_mult[None, :]
    return decode_kernels.PackedWeight(folded, use_kernel=kernels)


def decoder_weights(cfg, matrix, gain, quant: str | None = None, kernels: bool = True, q8_input: bool = True):
    """(layers, lm_head) in ``FusedDecoder``'s layout from ``matrix(name)`` -> (N, K) float or ``Blocks`` and
    ``gain(name)`` -> a norm's weight, by our parameter names. The norm gains multiply the inputs (folding them would
    mean quantizing again) and q's outputs get attention's 1/sqrt(D) as a per-output multiplier."""
    qkv_mult = torch.ones((cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim)
    qkv_mult[: cfg.n_head * cfg.head_dim] = cfg.head_dim**-0.5

    def mk(w, g=None, mult=None):
        return make_weight(w, g, mult, quant, kernels, q8_input)

    layers = []
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        qkv = _cat_rows([matrix(b + f"attn.w{x}.weight") for x in "qkv"])
        layers.append(
            dict(
                wqkv=mk(qkv, gain(b + "attn_norm.weight"), qkv_mult),  # (Hq+2Hkv)D x C
                wo=mk(matrix(b + "attn.wo.weight")),
                w13=mk(
                    _cat_rows([matrix(b + "mlp.w1.weight"), matrix(b + "mlp.w3.weight")]), gain(b + "mlp_norm.weight")
                ),
                w2=mk(matrix(b + "mlp.w2.weight")),
            )
        )
    return layers, mk(matrix("lm_head.weight"), gain("norm.weight"))


def gguf_weights(path, kernels: bool = True, q8_input: bool = True):
    """(config, layers, lm_head, embedding table, tokenizer) of a ``llama`` GGUF file with its quantized tensors kept
    as blocks: Q8_0 / Q4_0 / Q4_1 go to the kernels as stored, F32 / F16 ones become float matrices. The q/k rows are
    put back in our RoPE order by permuting whole rows (a block never spans two rows). The embedding table is a
    ``QuantWeight`` (rows dequantized on lookup) or a float tensor; the tokenizer is None for vocabularies ch01 does
    not read. Read with chapter 06's reader (a memmap; the
    ``gguf`` package's reader took 14 s on SmolLM2's 49k-token vocabulary here, ours 0.3 s)."""
    from ch01.gguf_loader import config_from_gguf, gguf_to_ours, unpermute_rope
    from ch01.gguf_tokenizer import tokenizer_from_gguf
    from ch06.gguf_reader import read_gguf

    f = read_gguf(path)
    fields = {k: SimpleNamespace(contents=lambda v=v: v) for k, v in f.metadata.items()}
    cfg = config_from_gguf(SimpleNamespace(fields=fields, tensors=[SimpleNamespace(name=n) for n in f.tensors]))
    tensors = {gguf_to_ours(name): t for name, t in f.tensors.items()}
    if cfg.tie_weights:
        tensors["lm_head.weight"] = tensors["tok_emb.weight"]

    def matrix(name):
        t = tensors[name]
        kind = t.type_name.lower()
        if kind in QTYPES:
            w = Blocks(np.asarray(f.raw(t.name)), kind)  # (N, bytes per row), still a memmap view
        elif kind in ("f32", "f16", "bf16"):
            w = f.tensor(t.name)  # (N, K) float32
        else:
            raise ValueError(f"{path}: tensor {t.name} is {t.type_name}; the kernels take Q8_0, Q4_0, Q4_1")
        heads = {"attn.wq": cfg.n_head, "attn.wk": cfg.n_kv_head}.get(name.split(".", 2)[-1].rsplit(".", 1)[0])
        if heads is not None:
            n = w.data.shape[0] if isinstance(w, Blocks) else w.shape[0]
            order = unpermute_rope(torch.arange(n)[:, None], heads)[:, 0].numpy()  # row order: llama.cpp's -> ours
            w = Blocks(w.data[order], w.qtype) if isinstance(w, Blocks) else w[order]
        return w

    def gain(name):
        return f.tensor(tensors[name].name)

    layers, lm_head = decoder_weights(cfg, matrix, gain, kernels=kernels, q8_input=q8_input)
    emb = matrix("tok_emb.weight")
    emb = QuantWeight(emb.data, emb.qtype, use_kernel=False) if isinstance(emb, Blocks) else emb
    try:
        tok = tokenizer_from_gguf(f.metadata)
    except ValueError:  # a vocabulary ch01 does not read (chapter 06's char-model exports): the weights still load
        tok = None
    return cfg, layers, lm_head, emb, tok


def weight_bytes(layers, lm_head) -> int:
    """Bytes of weights one decode step reads (every matrix once; the embedding lookup reads one row: not counted)."""
    mats = [w for layer in layers for w in layer.values()] + [lm_head]
    return sum(w.nbytes if isinstance(w, QuantWeight) else w.weight.numel() * 4 for w in mats)


def main(argv=None):
    """µs per call: float32 ``x @ W`` (MKL) vs the packed F32 kernel vs the quantized kernels, SmolLM2's shapes."""
    from common.bench import hardware_info, markdown_table, timeit
    from common.cli import base_parser

    p = base_parser(
        "quantized matmuls vs float32: microseconds per call, max error vs dequantize-then-matmul", seed=True
    )
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=100)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    decode_kernels.set_threads(args.threads)
    torch.manual_seed(args.seed)
    rows = []
    for N, K in [(576, 576), (3072, 576), (576, 1536)]:  # SmolLM2's o, gate+up, down projections
        W = torch.randn(N, K) * 0.05
        packed = decode_kernels.PackedWeight(W.t().contiguous())
        quants = {q: QuantWeight.from_float(W, q) for q in QTYPES}
        for M in args.rows:
            x = torch.randn(M, K)
            row = {"N x K": f"{N} x {K}", "rows": M}
            fns = {"torch F32": lambda x=x, W=W: x @ W.t(), "F32 kernel": lambda x=x, pw=packed: pw(x)}
            fns.update({q: (lambda x=x, qw=qw: qw(x)) for q, qw in quants.items()})
            for name, fn in fns.items():
                row[f"{name} us"] = timeit(fn, warmup=5, repeats=args.repeats).median * 1e6
            for q, qw in quants.items():
                ref = q8_round(x) @ qw.dequantized().t()
                row[f"{q} max err"] = (qw(x) - ref).abs().max().item()
            rows.append(row)
    print(hardware_info(), f"({args.threads} thread(s); median per call; kernels", end=" ")
    print("built)" if decode_kernels.load_library() is not None else "unavailable: torch fallback)")
    print(markdown_table(rows, floatfmt=".3g"))
    return rows


if __name__ == "__main__":
    main()
