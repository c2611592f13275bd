"""LoRA from scratch: train a low-rank update ΔW = (α/r)·B·A beside frozen linear layers, merge it back, ship only it.

Hu et al. 2021 (LoRA): a pretrained weight W (out × in) stays frozen; each chosen layer learns A (r × in, random) and
B (out × r, zeros, so training starts exactly at the base model), and computes  y = W·x + (α/r)·B·A·dropout(x).
With r ≪ min(in, out) the trainable parameters and optimizer state shrink by orders of magnitude; after training
``merge`` folds ΔW into W, so inference costs nothing extra, and ``unmerge`` takes it out again.

    from ch03.lora import apply_lora, save_adapter, load_adapter, merge_and_unload
    apply_lora(model, ["wq", "wv"], rank=8, alpha=16)      # names (suffixes) or regexes; freezes everything else
    ...train...                                            # only lora_A / lora_B have requires_grad
    save_adapter(model, "out/adapter")                     # adapter.safetensors + adapter_config.json (KB, not MB)
    load_adapter(base_model, "out/adapter")                # refuses an adapter trained on another base model
    merge_and_unload(model)                                # plain nn.Linear layers again, W + ΔW

    python 03_rlhf/lora.py            # tiny GPT: trainable parameters, merge/unmerge round trip

Parity: ``to_peft_state`` names our A/B the way PEFT does on ch01's Hugging Face export, so PEFT's ``LoraModel`` gives
the same logits and its ``merge_and_unload`` the same weights (tests/test_03_lora.py). QLoRA (a 4-bit NF4 base under
the same adapters) is in ``nf4.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from common.cli import base_parser

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"


@dataclass
class LoRAConfig:
    targets: list[str]
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    base_fingerprint: str = ""

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target layer name or pattern")


class LoRALinear(nn.Module):
    """A frozen base layer (``nn.Linear``, or anything with in/out_features, e.g. nf4.NF4Linear) + (α/r)·B·A."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.scaling, self.merged = rank, alpha / rank, False
        ref = next(base.parameters(), None)  # NF4 keeps its weight in buffers: create A/B in float32 then
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype))  # (out, r): ΔW = 0 at start
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's (and nn.Linear's) default init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        if self.merged:
            return y
        update = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T  # (..., r) -> (..., out)
        return y + (update * self.scaling).to(y.dtype)

    def merge(self) -> None:
        if not isinstance(self.base, nn.Linear):
            raise ValueError("cannot merge into a quantized base in place; use merge_and_unload (dequantizes first)")
        if not self.merged:
            self.base.weight.data += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self.base.weight.data -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def dense_weight(self) -> torch.Tensor:
        """W + ΔW in float32 (dequantizing a quantized base)."""
        base = self.base.weight if isinstance(self.base, nn.Linear) else self.base.dequantize()
        w = base.detach().float()
        return w if self.merged else w + self.delta_weight().detach().float()


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of names — the full name or a ``.``-suffix of it — plus full-name regexes."""
    if name == target or name.endswith("." + target):
        return True
    try:
        return re.fullmatch(target, name) is not None
    except re.error:  # not a regex (e.g. "w["): only the name rule applies
        return False


def _is_wrappable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or getattr(m, "is_quantized_linear", False)


def match_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the linear layers that the targets select; a target that selects none is an error, not a no-op."""
    linears = [n for n, m in model.named_modules() if _is_wrappable(m) and ".lora_" not in n]
    chosen = []
    for t in targets:
        hits = [n for n in linears if _matches(n, t)]
        if not hits:
            some = ", ".join(linears[:6]) + (" ..." if len(linears) > 6 else "")
            raise ValueError(f"LoRA target {t!r} matches no linear layer of {type(model).__name__} (layers: {some})")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def base_fingerprint(model: nn.Module) -> str:
    """sha256 (16 hex) over the base weights' names, shapes and float32 values; LoRA factors excluded, and a model
    that already carries adapters reports the fingerprint recorded when they were applied."""
    cfg = getattr(model, "lora_config", None)
    if cfg is not None:
        return cfg.base_fingerprint
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def apply_lora(
    model: nn.Module,
    targets: list[str],
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    fingerprint: str | None = None,
) -> nn.Module:
    """Wrap every selected linear layer in ``LoRALinear`` (in place), freeze everything but the LoRA factors, and
    record the config on ``model.lora_config``. Returns the model."""
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("this model already has LoRA adapters; merge_and_unload it first")
    cfg = LoRAConfig(list(targets), rank, float(alpha), float(dropout), fingerprint or base_fingerprint(model))
    names = match_targets(model, cfg.targets)
    model.requires_grad_(False)
    for name in names:
        set_module(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    model.lora_config = cfg
    return model


def merge(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace each LoRALinear by a plain float ``nn.Linear`` holding W + ΔW (a quantized base is dequantized)."""
    for name, layer in lora_layers(model).items():
        dense = nn.Linear(layer.in_features, layer.out_features, bias=False)
        dense.weight.data = layer.dense_weight()
        bias = getattr(layer.base, "bias", None)
        if bias is not None:
            dense.bias = nn.Parameter(bias.detach().float().clone())
        set_module(model, name, dense)
    model.lora_config = None
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_A"] = layer.lora_A.detach().contiguous()
        state[f"{name}.lora_B"] = layer.lora_B.detach().contiguous()
    return state


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Only the adapter: ``adapter.safetensors`` (A and B of every layer) + ``adapter_config.json``."""
    from safetensors.torch import save_file

    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("the model has no LoRA adapters to save (call apply_lora first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), str(directory / ADAPTER_WEIGHTS))
    (directory / ADAPTER_CONFIG).write_text(json.dumps(asdict(cfg), indent=2))
    return directory


def read_adapter_config(directory: str | Path) -> LoRAConfig:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {directory}: not a LoRA adapter directory")
    return LoRAConfig(**json.loads(path.read_text()))


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply the saved adapter to ``model`` (the same base model it was trained on, without adapters)."""
    from safetensors.torch import load_file

    cfg = read_adapter_config(directory)
    have = base_fingerprint(model)
    if have != cfg.base_fingerprint:
        raise ValueError(
            f"adapter in {directory} was trained on base model {cfg.base_fingerprint}, this model is {have}: "
            "load it onto the model it was trained on"
        )
    apply_lora(model, cfg.targets, cfg.rank, cfg.alpha, cfg.dropout, fingerprint=cfg.base_fingerprint)
    state = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
    for name, layer in lora_layers(model).items():
        layer.lora_A.data.copy_(state[f"{name}.lora_A"])
        layer.lora_B.data.copy_(state[f"{name}.lora_B"])
    return model


# ------------------------------------------------------------------------------------------------ PEFT interop
def peft_target_names(model: nn.Module) -> list[str]:
    """Hugging Face module names (``model.layers.0.self_attn.q_proj``) of our LoRA layers on ch01's Llama export."""
    from ch01.hf_interop import weight_map

    table = weight_map(model.config)
    return [table[f"{name}.weight"].removesuffix(".weight") for name in lora_layers(model)]


def to_peft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our A/B under PEFT's saved names (``base_model.model.<hf name>.lora_A.weight``), for
    ``peft.set_peft_model_state_dict`` on ``get_peft_model(to_hf(base), LoraConfig(...))``."""
    state = {}
    for name, hf_name in zip(lora_layers(model), peft_target_names(model), strict=True):
        layer = lora_layers(model)[name]
        state[f"base_model.model.{hf_name}.lora_A.weight"] = layer.lora_A.detach().float().clone()
        state[f"base_model.model.{hf_name}.lora_B.weight"] = layer.lora_B.detach().float().clone()
    return state


def main(argv=None) -> dict:
    from ch01.model import GPT, GPTConfig

    p = base_parser(__doc__, seed=True)
    p.add_argument("--preset", default="tiny", help="ch01 GPTConfig preset")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--targets", nargs="+", default=["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig.preset(args.preset, vocab_size=97)).eval()
    full = trainable_parameters(model)
    apply_lora(model, args.targets, args.rank, args.alpha)
    for layer in lora_layers(model).values():  # a nonzero B, as after training, so merging changes something
        nn.init.normal_(layer.lora_B, std=0.02)
    idx = torch.randint(0, 97, (2, 16))  # (B, T)
    with torch.no_grad():
        before = model(idx)
        merge(model)
        merged_diff = (model(idx) - before).abs().max().item()
        unmerge(model)
        roundtrip = (model(idx) - before).abs().max().item()
    lora = trainable_parameters(model)
    print(f"| | trainable parameters |\n|---|---|\n| full fine-tuning | {full:,} |")
    print(f"| LoRA r={args.rank} on {', '.join(args.targets)} | {lora:,} ({100 * lora / full:.2f}%) |")
    print(f"merged vs unmerged max |Δlogit| = {merged_diff:.2e}; after unmerge = {roundtrip:.2e}")
    return {"full": full, "lora": lora, "merged_diff": merged_diff, "unmerge_diff": roundtrip}


if __name__ == "__main__":
    main()
