"""Export the ch01 mini-GPT to ONNX and run it with onnxruntime: a full-sequence graph and a decode graph whose past
keys/values are explicit inputs and outputs (the KV cache lives outside the graph, owned by the serving engine).

    python 08_deployment/export_onnx.py                      # small char model: export, parity, ORT greedy, int8
    python 08_deployment/export_onnx.py --preset tiny --iters 200 --no-quantize

Graphs (opset 18, torch.export-based exporter ``torch.onnx.export(..., dynamo=True)`` with ``dynamic_shapes``):
  full:   input_ids (batch, seq) int64                               -> logits (batch, seq, vocab)
  decode: input_ids (batch, seq), attention_mask (batch, past+seq),
          past_key_i / past_value_i (batch, kv_heads, past, head_dim) -> logits, present_key_i / present_value_i
          (batch, kv_heads, past+seq, head_dim); past may be 0 (prefill), attention_mask 0 = left padding.
Checks: ORT logits vs torch (max |diff| <= 1e-4), ORT greedy decoding (with its own KV cache) == torch greedy, and
optionally ORT dynamic int8 quantization (weights int8, activations quantized on the fly) with its val-loss change.
References: ONNX (onnx.ai), onnxruntime (onnxruntime.ai), torch.onnx dynamo exporter docs (pytorch.org/docs/stable/onnx).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ch01.model import GPT, register_attention
from common.bench import markdown_table
from common.cli import base_parser
from common.data import keyed_cache_dir

OPSET = 18
GRAPHS_VERSION = 2  # 2: the decode graph through ch01's cache protocol (issue 18)


def graphs_dir(model: GPT, name: str) -> Path:
    """The cache folder for ``model``'s exported graphs, keyed by its config and weights (and the graphs' version)."""
    return keyed_cache_dir("onnx", name, key=(GRAPHS_VERSION, model.config.to_dict(), model))


class ExplicitPastCache:
    """ch01's cache protocol over caller-supplied past tensors (the decode graph's ``past_*`` inputs).

    ``length`` = the past length P, so ``GPT.forward`` places the new tokens at positions P … P+T-1 in every row and
    ``update`` is an append: past ⊕ new holds position j at index j, as the protocol asks. It records the result as the
    graph's ``present_*`` outputs."""

    def __init__(self, past_k: list[torch.Tensor], past_v: list[torch.Tensor]):
        self.past_k, self.past_v = past_k, past_v
        self.length = past_k[0].shape[2]
        self.present_k: list[torch.Tensor | None] = [None] * len(past_k)
        self.present_v: list[torch.Tensor | None] = [None] * len(past_v)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        self.present_k[layer] = torch.cat([self.past_k[layer], k], dim=2)  # (B, Hkv, P+T, D)
        self.present_v[layer] = torch.cat([self.past_v[layer], v], dim=2)
        return self.present_k[layer], self.present_v[layer]


class DecodeGraph(torch.nn.Module):
    """(input_ids, attention_mask, *past k/v per layer) -> (logits, *present k/v per layer): the exported decode step.

    ch01's own forward with an ``ExplicitPastCache``; ``attention_mask`` (B, P+T), 0 = a padding key, is ANDed into
    ch01's mask (a new token always sees itself, so a padded query has a key and gives no NaN). The serving engine also
    runs this module eagerly as its torch backend, so both backends share one signature.
    """

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        cache = ExplicitPastCache(list(past[0::2]), list(past[1::2]))
        P, T = past[0].shape[2], input_ids.shape[1]
        keys = torch.arange(P + T, device=input_ids.device)
        own = keys == torch.arange(P, P + T, device=input_ids.device)[:, None]  # (T, P+T): query t's own key
        visible = attention_mask.bool()[:, None, None, :] | own  # (B, 1, T, P+T)
        logits = self.model(input_ids, cache=cache, attn_mask=visible)  # (B, T, V)
        present = [t for kv in zip(cache.present_k, cache.present_v) for t in kv]
        return (logits, *present)


@register_attention("sdpa_export")
def sdpa_export(q, k, v, *, causal, attn_mask=None, dropout_p: float = 0.0):
    """SDPA for tracing: ``bool(causal)`` turns the model's symbolic ``T > 1`` into a guard that the export's
    ``Dim("seq", min=2)`` already proves, so the graph keeps SDPA's causal path instead of an explicit mask."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=bool(causal), dropout_p=dropout_p)


class FullGraph(torch.nn.Module):
    """input_ids -> logits (B, T, V); traced with ``sdpa_export`` in place of ch01's "sdpa" (same math)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)  # (B, T, V)


def past_names(n_layer: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]


def empty_past(model: GPT, batch: int) -> list[torch.Tensor]:
    cfg = model.config
    return [torch.zeros(batch, cfg.n_kv_head, 0, cfg.head_dim) for _ in range(2 * cfg.n_layer)]


def export_full(model: GPT, path: str | Path) -> Path:
    """Full-sequence graph via torch.export (the legacy TorchScript tracer, ``dynamo=False``, exports ~10x faster but
    emits a boolean EyeLike node that onnxruntime's CPU provider does not implement)."""
    from torch.export import Dim

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    T = model.config.block_size
    example = torch.zeros(2, min(8, T), dtype=torch.long)
    shapes = {"input_ids": {0: Dim("batch", max=4096), 1: Dim("seq", min=2, max=T)}}
    impl = model.config.attn_impl
    if impl == "sdpa":
        model.config.attn_impl = "sdpa_export"
    try:
        torch.onnx.export(
            FullGraph(model).eval(),
            (example,),
            str(path),
            dynamo=True,
            dynamic_shapes=shapes,
            opset_version=OPSET,
            input_names=["input_ids"],
            output_names=["logits"],
            verbose=False,
        )
    finally:
        model.config.attn_impl = impl
    return path


def export_decode(model: GPT, path: str | Path) -> Path:
    """Decode graph; the example uses past=3, seq=2 so neither axis is specialised to 0/1 during tracing."""
    from torch.export import Dim

    cfg = model.config
    if cfg.mla_kv_rank:
        raise ValueError("the decode graph passes per-head past keys/values; an MLA model caches a latent: export_full")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    B, P, T = 2, 3, 2
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.ones(B, P + T, dtype=torch.long)
    past = [torch.zeros(B, cfg.n_kv_head, P, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    in_names = ["input_ids", "attention_mask", *past_names(cfg.n_layer, "past")]
    out_names = ["logits", *past_names(cfg.n_layer, "present")]
    # torch.export: symbolic dims need upper bounds (the model checks past + T <= block_size)
    batch, seq, plen = Dim("batch", max=4096), Dim("seq", max=cfg.block_size), Dim("past", max=cfg.block_size)
    shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: Dim.DYNAMIC},
        "past": tuple({0: batch, 2: plen} for _ in past),
    }
    torch.onnx.export(
        DecodeGraph(model).eval(),
        (ids, mask, *past),
        str(path),
        dynamo=True,
        dynamic_shapes=shapes,
        opset_version=OPSET,
        input_names=in_names,
        output_names=out_names,
        verbose=False,
    )
    return path


def ort_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_decode(session, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray]):
    """One decode-graph call: returns (logits (B, T, V), present list)."""
    names = [i.name for i in session.get_inputs()]
    out = session.run(None, dict(zip(names, [input_ids, attention_mask, *past])))
    return out[0], out[1:]


@dataclass
class OrtPast:
    """The caller-held KV cache of the decode graph: the previous call's ``present_*`` arrays, fed back as ``past_*``."""

    arrays: list[np.ndarray]

    @classmethod
    def empty(cls, cfg, batch: int) -> OrtPast:
        return cls([np.zeros((batch, cfg.n_kv_head, 0, cfg.head_dim), np.float32) for _ in range(2 * cfg.n_layer)])

    @property
    def length(self) -> int:
        return self.arrays[0].shape[2]


class OrtDecoder:
    """The decode graph in onnxruntime as a model for ch01's decoding loop (``ch01.generate``): ``__call__(idx,
    cache=OrtPast)`` runs one graph call, continuing every row from the past length (the graph's semantics)."""

    def __init__(self, session, config):
        self.session, self.config = session, config

    def parameters(self):  # ch01.generate reads the device from here
        yield torch.empty(0)

    def __call__(self, idx: torch.Tensor, *, positions=None, cache: OrtPast | None = None) -> torch.Tensor:
        if positions is not None:
            raise ValueError("the decode graph continues all rows from the past length: no per-row positions")
        cache = cache if cache is not None else OrtPast.empty(self.config, idx.shape[0])
        ids = idx.cpu().numpy().astype(np.int64)  # (B, T)
        mask = np.ones((ids.shape[0], cache.length + ids.shape[1]), dtype=np.int64)
        logits, cache.arrays = ort_decode(self.session, ids, mask, cache.arrays)
        return torch.from_numpy(logits)  # (B, T, V)


def ort_greedy(session, model: GPT, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding with the decode graph and a caller-held KV cache, by ch01's decoding loop: (B, T0 + n) ids."""
    from ch01.generate import generate

    B = prompt.shape[0]
    new = generate(
        OrtDecoder(session, model.config), prompt, max_new_tokens, temperature=0.0, cache=OrtPast.empty(model.config, B)
    )
    return torch.cat([prompt, torch.tensor(new, dtype=torch.long).reshape(B, max_new_tokens)], dim=1)


def ort_val_loss(session, val_ids: torch.Tensor, block_size: int, batch_size: int = 32, max_batches: int = 20) -> float:
    """``ch01.evaluate.evaluate_loss`` (the same windows as for the torch model), scored with the full-sequence graph."""
    from ch01.evaluate import evaluate_loss

    def logits(x: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        return torch.from_numpy(session.run(None, {"input_ids": x.long().cpu().numpy()})[0])

    return evaluate_loss(logits, val_ids, batch_size, max_batches, block_size=block_size)


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return Path(dst)


def parse_args(argv=None):
    p = base_parser(__doc__.split("\n\n")[0], seed=True, out=True)
    p.add_argument("--preset", default="small", help="ch01 preset of the pretrained char model")
    p.add_argument("--iters", type=int, default=2000, help="training iterations of the cached pretrained model")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens compared between ORT and torch")
    p.add_argument("--no-quantize", action="store_true", help="skip the int8 dynamic quantization step")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from ch01.evaluate import evaluate_loss
    from ch01.pretrained import pretrained_char_model

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model, tok, (_, val_ids) = pretrained_char_model(args.preset, args.iters)
    model = model.float().eval()
    out = Path(args.out) if args.out else graphs_dir(model, f"{args.preset}-{args.iters}")
    t0 = time.perf_counter()
    full_path, dec_path = export_full(model, out / "model.onnx"), export_decode(model, out / "decode.onnx")
    export_s = time.perf_counter() - t0
    full, dec = ort_session(full_path), ort_session(dec_path)

    x = torch.randint(0, model.config.vocab_size, (4, model.config.block_size))
    with torch.no_grad():
        ref = model(x)
    full_diff = float(np.abs(full.run(None, {"input_ids": x.numpy()})[0] - ref.numpy()).max())
    prompt = torch.tensor([tok.encode("ROMEO:\n"), tok.encode("JULIET:")[:7]])
    n_new = min(args.new_tokens, model.config.block_size - prompt.shape[1])
    with torch.no_grad():
        torch_greedy = model.generate(prompt, n_new, temperature=0.0)
    onnx_greedy = ort_greedy(dec, model, prompt, n_new)
    rows = [
        {"check": "export time (s, both graphs)", "value": f"{export_s:.1f}"},
        {"check": "full graph max |logits diff|", "value": f"{full_diff:.2e}"},
        {
            "check": f"ORT greedy == torch greedy ({n_new} tokens x 2)",
            "value": str(bool(torch.equal(torch_greedy, onnx_greedy))),
        },
    ]
    result = {
        "full_max_diff": full_diff,
        "greedy_equal": bool(torch.equal(torch_greedy, onnx_greedy)),
        "sample": tok.decode(onnx_greedy[0].tolist()),
        "paths": {"full": str(full_path), "decode": str(dec_path)},
    }
    if not args.no_quantize:
        q_path = quantize_int8(full_path, out / "model.int8.onnx")
        fp32_loss, ort_loss = evaluate_loss(model, val_ids), ort_val_loss(full, val_ids, model.config.block_size)
        int8_loss = ort_val_loss(ort_session(q_path), val_ids, model.config.block_size)
        # the dynamo exporter stores weights as external data (model.onnx.data next to model.onnx): count both
        size = lambda p: sum(f.stat().st_size for f in (Path(p), Path(f"{p}.data")) if f.exists()) / 2**20
        rows += [
            {
                "check": "val loss torch fp32 / ORT fp32 / ORT int8",
                "value": f"{fp32_loss:.4f} / {ort_loss:.4f} / {int8_loss:.4f} ({int8_loss - fp32_loss:+.4f})",
            },
            {"check": "file size fp32 / int8 (MiB)", "value": f"{size(full_path):.2f} / {size(q_path):.2f}"},
        ]
        result.update(val_loss_fp32=fp32_loss, val_loss_ort=ort_loss, val_loss_int8=int8_loss, int8_path=str(q_path))
    print(markdown_table(rows))
    print(f"\nORT greedy sample: {result['sample']!r}")
    return result


if __name__ == "__main__":
    main()
