"""Low-rank adapters for stage 2 of distillation (LoRA, Hu et al. 2021; LoLCATs' second stage), through peft.

The projections of the student's GLA layers (q, k, v, output gate, o) get adapters W + (alpha / r) B A with B
starting at zero, so training starts from the converted model; the rest of the model is frozen except the forget
gates and output norms that conversion added (a few thousand values per layer). A checkpoint stays an ordinary one:
model.safetensors holds the merged weights (what ``gla generate``, ``gla eval ppl`` and ``from_pretrained`` read),
and lora.safetensors beside it the adapters and the frozen weights under them, from which a resume rebuilds the
training state exactly (merged minus delta would not be the same bits).
"""
from __future__ import annotations

import os

import torch.nn as nn

from gla.layers.block import LINEAR_MIXERS

TARGETS = ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj")
FILE = "lora.safetensors"


def add_lora(model: nn.Module, rank: int, alpha: float | None = None) -> None:
    """Inject adapters of ``rank`` (scale alpha / rank; alpha defaults to 2 * rank) into ``model``'s GLA layers,
    in place, and leave only them, the forget gates and the output norms trainable."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("--lora needs peft: pip install 'gla[distill]' (or pip install peft)") from None
    layers = [str(i) for i, layer in enumerate(model.layers) if layer.mixer in LINEAR_MIXERS]
    if not layers:
        raise ValueError("--lora adapts GLA layers and the student has none")
    pattern = rf"layers\.({'|'.join(layers)})\.attn\.({'|'.join(TARGETS)})"
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=pattern,
                                       lora_dropout=0.0), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or ".gk_proj." in name or ".g_norm." in name)


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def _adapted(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if hasattr(m, "get_delta_weight")}


def merged_state(model: nn.Module) -> dict:
    """The state dict of the plain model (peft's names undone) with every adapter merged into its weight."""
    state = {name.replace(".base_layer.", "."): t for name, t in model.state_dict().items() if "lora_" not in name}
    for name, m in _adapted(model).items():
        state[f"{name}.weight"] = (m.base_layer.weight + m.get_delta_weight("default")).detach()
    return state


def save_adapters(model: nn.Module, directory: str) -> None:
    """Write lora.safetensors: the adapters and the frozen weights of the adapted projections, by peft's names."""
    from safetensors.torch import save_file
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()
               if "lora_" in name or ".base_layer." in name}
    save_file(tensors, os.path.join(directory, FILE))


def training_state(names, plain: dict, directory: str) -> dict:
    """The adapted model's full state dict for resuming, for its parameter ``names``: ``plain`` (the checkpoint's
    merged weights) for what was not adapted, lora.safetensors of ``directory`` for the adapters and the weights
    under them."""
    from safetensors.torch import load_file
    path = os.path.join(directory, FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {FILE} in {directory}: the run was not trained with --lora")
    try:
        adapters = load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated or corrupted files
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    missing = [name for name in names if name not in adapters and name not in plain]
    if missing:
        raise ValueError(f"{directory} lacks {missing[:4]} of the adapted model (another --lora rank or pattern?)")
    return {name: adapters[name] if name in adapters else plain[name] for name in names}
