"""Load a real pretrained Llama-architecture model (SmolLM2-135M-Instruct, or any ``llama`` GGUF / Hugging Face
checkpoint directory) into our from-scratch ``GPT``: the lesson is that the model we wrote *is* a real LLM.

    model, tok = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # float32 weights, our GGUF-built tokenizer
    model, tok = load_hf_dir("exports/hf")                       # config.json + model.safetensors + tokenizer.json

What loading a GGUF takes (the file format itself is taught in chapter 06, which writes and reads it by hand; here the
``gguf`` package reads and dequantizes it):
- Metadata -> ``GPTConfig``: ``llama.block_count`` layers, ``embedding_length`` width, ``attention.head_count`` /
  ``head_count_kv`` (grouped-query attention), ``feed_forward_length``, ``rope.freq_base``, ``layer_norm_rms_epsilon``,
  ``context_length``; no ``output.weight`` tensor means the LM head is tied to the embedding.
- Tensors -> our names (``blk.3.attn_q.weight`` -> ``blocks.3.attn.wq.weight`` …), dequantized to float32.
- llama.cpp's RoPE rotates adjacent pairs (2i, 2i+1), ours and HF's rotate (i, i + D/2): the converter permuted the rows
  of W_q and W_k inside every head to match, so loading undoes that permutation (``unpermute_rope``).
References: Touvron et al. 2023 (Llama); llama.cpp convert_hf_to_gguf.py (``LlamaModel.permute``); GGUF spec.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ch01.model import GPT, GPTConfig

# our parameter name (per layer) <- llama.cpp's tensor name
_LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "attn.wq",
    "attn_k": "attn.wk",
    "attn_v": "attn.wv",
    "attn_output": "attn.wo",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "mlp.w1",
    "ffn_up": "mlp.w3",
    "ffn_down": "mlp.w2",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "tok_emb.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_to_ours(name: str) -> str:
    """llama.cpp tensor name -> our parameter name (``blk.3.ffn_up.weight`` -> ``blocks.3.mlp.w3.weight``)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")  # blk, N, kind, weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"blocks.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"unexpected tensor {name!r} for the llama architecture")


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of W_q / W_k from rotate-half order (i, i + D/2) to llama.cpp's interleaved order (2i, 2i+1), per head —
    what the converter does when it writes a GGUF (chapter 06's writer too)."""
    rows, cols = w.shape
    d = rows // n_head
    return w.reshape(n_head, 2, d // 2, cols).transpose(1, 2).reshape(rows, cols)  # (H·D, C)


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: inside each head, rows (0, D/2, 1, D/2+1, …) -> (0 … D/2-1, D/2 … D-1)."""
    rows, cols = w.shape
    d = rows // n_head
    return w.reshape(n_head, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)  # (H·D, C)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader) -> GPTConfig:
    """``GPTConfig`` from a GGUF's metadata; anything but the plain ``llama`` architecture is refused by name."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported: the mini-GPT loads 'llama' models")

    def get(key, default=None):
        value = _field(reader, f"llama.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks llama.{key}")
        return value

    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = n_embd // n_head
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim or n_embd % n_head:
        raise ValueError(f"partial RoPE ({rope_dim} of {head_dim} dims) is not supported by the mini-GPT")
    if _field(reader, "llama.rope.scaling.type", "none") not in ("none", None):
        raise ValueError("RoPE scaling is not supported by the mini-GPT")
    names = {t.name for t in reader.tensors}
    return GPTConfig(
        vocab_size=int(get("vocab_size", len(_field(reader, "tokenizer.ggml.tokens", [])) or None)),
        block_size=int(get("context_length")),
        n_layer=int(get("block_count")),
        n_head=n_head,
        n_kv_head=int(get("attention.head_count_kv", n_head)),
        n_embd=n_embd,
        ffn_hidden=int(get("feed_forward_length")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_weights="output.weight" not in names,
    )


def state_dict_from_gguf(reader, cfg: GPTConfig, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor dequantized (``gguf.quants.dequantize``), renamed, Q/K un-permuted, cast to ``dtype``."""
    from gguf.quants import dequantize

    state = {}
    for t in reader.tensors:
        name = gguf_to_ours(t.name)
        try:
            w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))  # a copy: writable
        except NotImplementedError:
            raise ValueError(
                f"tensor {t.name}: type {t.tensor_type.name} is not supported for dequantization"
            ) from None
        w = w.reshape([int(n) for n in reversed(t.shape.tolist())] if w.dim() > 1 else -1)  # (rows, cols)
        if name.endswith("attn.wq.weight"):
            w = unpermute_rope(w, cfg.n_head)
        elif name.endswith("attn.wk.weight"):
            w = unpermute_rope(w, cfg.n_kv_head)
        state[name] = w.to(dtype)
    return state


def _materialize(cfg: GPTConfig, state: dict[str, torch.Tensor], source: str) -> GPT:
    """A GPT holding exactly ``state`` (built on the meta device: no time spent on a random init)."""
    if cfg.tie_weights:
        state.setdefault("lm_head.weight", state.get("tok_emb.weight"))
    with torch.device("meta"):
        model = GPT(cfg)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"{source}: missing tensors {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, assign=True)
    if cfg.tie_weights:
        model.lm_head.weight = model.tok_emb.weight
    return model.eval()


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32):
    """(GPT in eval mode, tokenizer) from a ``llama`` GGUF file (ours or llama.cpp's)."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, TypeError) as e:  # bad magic, truncated header or data, unknown types
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    cfg = config_from_gguf(reader)
    model = _materialize(cfg, state_dict_from_gguf(reader, cfg, dtype), str(path))
    from ch01.gguf_tokenizer import tokenizer_from_gguf

    return model, tokenizer_from_gguf(reader)


# ------------------------------------------------------------------------------------- Hugging Face checkpoint dirs
def load_hf_dir(directory: str | Path, dtype: torch.dtype = torch.float32):
    """(GPT, tokenizer) from a Hugging Face Llama directory: config.json + *.safetensors + tokenizer.json."""
    from safetensors import safe_open

    from ch01.hf_interop import config_from_hf, weight_map
    from ch01.tokenizer import load_tokenizer

    directory = Path(directory)
    weights = sorted(directory.glob("*.safetensors"))
    for needed, present in (("config.json", (directory / "config.json").exists()), ("*.safetensors", bool(weights))):
        if not present:
            raise FileNotFoundError(f"{directory} is not a Hugging Face model directory: {needed} is missing")
    cfg = config_from_hf(SimpleNamespace(**json.loads((directory / "config.json").read_text())))
    hf_to_ours = {theirs: ours for ours, theirs in weight_map(cfg).items()}
    state = {}
    for file in weights:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key in hf_to_ours:
                    state[hf_to_ours[key]] = f.get_tensor(key).to(dtype)
    model = _materialize(cfg, state, str(directory))
    return model, load_tokenizer(directory)
