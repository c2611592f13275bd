"""Our mini-GPT <-> Hugging Face ``LlamaForCausalLM``: same architecture, so the mapping is a table of names.

    hf = to_hf(model)                 # a transformers LlamaForCausalLM with our weights (same logits)
    model = from_hf(hf)               # and back
    save_hf(model, "out/hf", tok)     # AutoModelForCausalLM / AutoTokenizer.from_pretrained("out/hf") load it (offline)

Both use the rotate-half RoPE layout, so q/k need no permutation here (llama.cpp's GGUF does; see chapter 06).
Only the Llama-style variant maps (RoPE + RMSNorm + SwiGLU); the GPT-2-style ablation variant is refused clearly.
Reference: Touvron et al. 2023 (Llama); transformers' modeling_llama.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ch01.model import GPT, GPTConfig
from common.cli import base_parser


def _layer_map(i: int, qk_norm: bool = False) -> dict[str, str]:
    ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
    norms = {ours + f"attn.{n}.weight": theirs + f"self_attn.{n}.weight" for n in ("q_norm", "k_norm")}  # Qwen3
    return (norms if qk_norm else {}) | {
        ours + "attn_norm.weight": theirs + "input_layernorm.weight",
        ours + "attn.wq.weight": theirs + "self_attn.q_proj.weight",
        ours + "attn.wk.weight": theirs + "self_attn.k_proj.weight",
        ours + "attn.wv.weight": theirs + "self_attn.v_proj.weight",
        ours + "attn.wo.weight": theirs + "self_attn.o_proj.weight",
        ours + "mlp_norm.weight": theirs + "post_attention_layernorm.weight",
        ours + "mlp.w1.weight": theirs + "mlp.gate_proj.weight",
        ours + "mlp.w3.weight": theirs + "mlp.up_proj.weight",
        ours + "mlp.w2.weight": theirs + "mlp.down_proj.weight",
    }


def weight_map(cfg: GPTConfig) -> dict[str, str]:
    """Our parameter name -> Hugging Face Llama parameter name."""
    table = {
        "tok_emb.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    for i in range(cfg.n_layer):
        table.update(_layer_map(i, cfg.qk_norm))
    return table


def _rope_parameters(cfg: GPTConfig) -> dict:
    """Hugging Face ``rope_parameters`` of our RoPE (chapter 04's scaling maps for linear and YaRN)."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "ntk":
        raise ValueError(
            "static NTK-aware RoPE has no Hugging Face rope_type ('dynamic' changes with the sequence length): "
            "export with rope_scaling='linear' or 'yarn'"
        )
    if cfg.rope_scaling != "none":
        rope |= {"rope_type": cfg.rope_scaling, "factor": cfg.rope_factor}
    if cfg.rope_scaling == "yarn":
        rope["original_max_position_embeddings"] = cfg.original_block
    return rope


def hf_config(cfg: GPTConfig):
    """LlamaConfig; with qk_norm a Qwen3Config (Qwen3 = Llama + q/k RMSNorm per head), with only a sliding window a
    MistralConfig. MLA and attention sinks have no Llama-family equivalent and are refused."""
    from transformers import LlamaConfig, MistralConfig, Qwen3Config

    if (cfg.pos_emb, cfg.norm, cfg.mlp) != ("rope", "rmsnorm", "swiglu"):
        raise ValueError("only the Llama-style model (pos_emb=rope, norm=rmsnorm, mlp=swiglu) maps to LlamaForCausalLM")
    if cfg.mla_kv_rank or cfg.attn_sinks:
        raise ValueError(
            "multi-head latent attention and attention sinks have no Hugging Face Llama/Qwen3/Mistral equivalent: "
            "this model cannot be exported (use GPT.save)"
        )
    if cfg.layer_pattern and set(cfg.layer_pattern) != {"A"}:
        raise ValueError(f"layer_pattern={cfg.layer_pattern!r}: linear-time mixer layers (chapter 05) have no Hugging "
                         "Face Llama-family equivalent: this model cannot be exported (use GPT.save)")  # fmt: skip
    if cfg.qk_norm:
        window = dict(use_sliding_window=cfg.sliding_window is not None, max_window_layers=0)
        return Qwen3Config(**_hf_kwargs(cfg), **window, sliding_window=cfg.sliding_window)
    if cfg.sliding_window is not None:
        return MistralConfig(**_hf_kwargs(cfg), sliding_window=cfg.sliding_window)
    return LlamaConfig(**_hf_kwargs(cfg), mlp_bias=False)


def _hf_kwargs(cfg: GPTConfig) -> dict:
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=_rope_parameters(cfg),
        tie_word_embeddings=cfg.tie_weights,
        attention_bias=False,
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def to_hf(model: GPT):
    """A ``LlamaForCausalLM`` (float32, eval mode) holding a copy of ``model``'s weights (``Qwen3ForCausalLM`` with
    qk_norm, ``MistralForCausalLM`` with a sliding window)."""
    from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen3ForCausalLM

    cfg = model.config
    hf_cfg = hf_config(cfg)
    classes = {"llama": LlamaForCausalLM, "qwen3": Qwen3ForCausalLM, "mistral": MistralForCausalLM}
    hf = classes[hf_cfg.model_type](hf_cfg)
    ours = model.state_dict()
    mapped = {theirs: ours[name].detach().clone().float() for name, theirs in weight_map(cfg).items()}
    missing, unexpected = hf.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not (cfg.tie_weights and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    if cfg.tie_weights:
        hf.tie_weights()
    return hf.eval()


def config_from_hf(c) -> GPTConfig:
    """``GPTConfig`` from a Llama ``config.json`` (a dict-like namespace or a transformers ``LlamaConfig``)."""
    if getattr(c, "model_type", "llama") != "llama":
        raise ValueError(f"model_type {c.model_type!r} is not supported: the mini-GPT loads 'llama' checkpoints")
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"RoPE type {rope_type!r} is not supported by the mini-GPT (only 'default')")
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        raise ValueError("head_dim * num_attention_heads != hidden_size is not supported by the mini-GPT")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError("biases in attention/MLP are not supported by the mini-GPT")
    return GPTConfig(
        vocab_size=c.vocab_size,
        block_size=c.max_position_embeddings,
        n_layer=c.num_hidden_layers,
        n_head=c.num_attention_heads,
        n_kv_head=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        n_embd=c.hidden_size,
        ffn_hidden=c.intermediate_size,
        rope_theta=float(theta),
        norm_eps=c.rms_norm_eps,
        tie_weights=bool(getattr(c, "tie_word_embeddings", False)),
    )


def from_hf(hf) -> GPT:
    """A GPT built from a ``LlamaForCausalLM`` (any size; RoPE scaling variants are refused)."""
    cfg = config_from_hf(hf.config)
    model = GPT(cfg)
    theirs = hf.state_dict()
    state = {
        name: theirs[hf_name].detach().clone().float() for name, hf_name in weight_map(cfg).items() if hf_name in theirs
    }
    if cfg.tie_weights:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_hf(model: GPT, directory: str | Path, tokenizer=None) -> Path:
    """Write a Hugging Face model directory (config.json + model.safetensors) loadable with AutoModelForCausalLM; with
    ``tokenizer`` also tokenizer.json + tokenizer_config.json (chat template included) + generation_config.json, so
    ``AutoTokenizer`` and ``transformers.pipeline("text-generation", model=directory)`` work and give our tokens."""
    directory = Path(directory)
    hf = to_hf(model)
    if tokenizer is not None:
        from transformers import GenerationConfig

        from ch01.gguf_tokenizer import save_hf_tokenizer

        ids = {k: getattr(tokenizer, f"{k}_id", None) for k in ("bos", "eos")}
        hf.config.bos_token_id, hf.config.eos_token_id = ids["bos"], ids["eos"]
        hf.generation_config = GenerationConfig(
            bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["eos"]
        )
        save_hf_tokenizer(
            tokenizer,
            directory,
            chat_template=getattr(tokenizer, "chat_template", None),
            model_max_length=model.config.block_size,
        )
    hf.save_pretrained(directory, safe_serialization=True)
    return directory


@torch.no_grad()
def max_logit_diff(model: GPT, hf, idx: torch.Tensor) -> float:
    return (model(idx) - hf(input_ids=idx).logits).abs().max().item()


def main(argv=None) -> dict:
    p = base_parser(__doc__, seed=True)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--n-kv-head", type=int, default=2, help="grouped-query heads (exercise the GQA mapping)")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    cfg = GPTConfig.preset(args.preset, vocab_size=97, n_kv_head=args.n_kv_head, init_std=0.3)  # large init: a
    model = GPT(cfg).eval()  # wrong permutation or mapping cannot hide behind tiny activations
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    hf = to_hf(model)
    back = from_hf(hf)
    to_diff = max_logit_diff(model, hf, idx)
    back_diff = (back(idx) - model(idx)).abs().max().item()
    print("| direction | max abs logit diff |\n|---|---|")
    print(f"| ours -> HF LlamaForCausalLM | {to_diff:.2e} |\n| HF -> ours | {back_diff:.2e} |")
    return {"to_hf_diff": to_diff, "from_hf_diff": back_diff}


if __name__ == "__main__":
    main()
