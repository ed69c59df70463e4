"""``gla convert``: a pretrained softmax transformer as a GLA or hybrid GLA/softmax model.

Sources: a local Hugging Face directory of a Llama-family model (Llama, Qwen2, Qwen3 ForCausalLM: config.json and
safetensors weights; pickled .bin weights are refused, since loading them runs code), or a gla checkpoint of a
softmax model (`gla train --mixer softmax`). Layers chosen by the pattern become GLA layers built from the teacher's
projections, as in LoLCATs (Zhang et al., 2024) and Liger (Lan et al., 2025): q, k, v and o are copied (grouped-
query heads kept as GLA's shared k/v heads, RoPE dropped), the output is normalised per head (RMSNorm, weight 1) with
no output gate, and the forget gate starts near 1 (bias ``gate_bias_init``, low-rank weights 0) so each layer first
sees its whole context as softmax attention does. Norms, MLPs, embeddings and the head are copied; the remaining
layers stay softmax attention with the teacher's weights, so pattern "none" reproduces the teacher's logits.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from gla.models import GLAConfig, GLATransformer

HF_TYPES = ("llama", "qwen2", "qwen3")


def layer_pattern(pattern: str, n_layers: int) -> tuple:
    """The indices of the layers that become GLA. pattern: "all", "none", "G:S" (G GLA layers then S softmax layers,
    repeated: "3:1" keeps every 4th layer softmax, the last of each group) or explicit indices "0,1,2,4"."""
    p = pattern.strip().lower()
    if p == "all":
        return tuple(range(n_layers))
    if p == "none":
        return ()
    if ":" in p:
        try:
            g, s = (int(x) for x in p.split(":"))
        except ValueError:
            raise ValueError(f"--layers {pattern!r}: a ratio is two integers, e.g. 3:1") from None
        if g < 0 or s < 0 or g + s == 0:
            raise ValueError(f"--layers {pattern!r}: the ratio needs non-negative parts, not both 0")
        return tuple(i for i in range(n_layers) if i % (g + s) < g)
    try:
        idx = sorted({int(x) for x in p.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--layers {pattern!r}: use all, none, a ratio such as 3:1, or indices such as 0,1,2,4")
    bad = [i for i in idx if not 0 <= i < n_layers]
    if bad or not idx:
        raise ValueError(f"--layers {pattern!r}: indices must be in 0..{n_layers - 1}")
    return tuple(idx)


def _read_hf(src: str) -> tuple[dict, dict]:
    """(config.json, tensors) of a Hugging Face model directory, safetensors only."""
    from safetensors.torch import load_file
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    files = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))
    if not files:
        pickles = [n for n in os.listdir(src) if n.endswith((".bin", ".pt", ".pth"))]
        raise ValueError(f"{src} has no .safetensors weights" + (
            f" (only {pickles[0]}, a pickle: loading it would run code; convert it to safetensors first)"
            if pickles else ""))
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(src, name)))
    return cfg, tensors


def _rope_theta(cfg: dict) -> float:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):
        raise ValueError(f"RoPE scaling {kind!r} is not supported (plain RoPE only)")
    return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _hf_teacher(src: str) -> tuple[GLAConfig, dict]:
    """A Llama-family directory as (an all-softmax GLAConfig, its weights under our parameter names)."""
    cfg, t = _read_hf(src)
    kind = cfg.get("model_type")
    if kind not in HF_TYPES:
        raise ValueError(f"{src}: model_type {kind!r} is not supported; supported: {', '.join(HF_TYPES)} "
                         "(or a gla checkpoint)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{src}: hidden_act {cfg.get('hidden_act')!r}; the MLP here is SwiGLU (silu)")
    H, d = cfg["num_attention_heads"], cfg["hidden_size"]
    n = cfg["num_hidden_layers"]
    tie = bool(cfg.get("tie_word_embeddings", False))
    gc = GLAConfig(vocab_size=cfg["vocab_size"], d_model=d, n_heads=H, d_ff=cfg["intermediate_size"], n_layers=n,
                   max_seq_len=cfg.get("max_position_embeddings", 32768), dropout=0.0, norm_eps=cfg["rms_norm_eps"],
                   tie_embeddings=tie, attn_layers=tuple(range(n)), attn_heads=H,
                   attn_kv_heads=cfg.get("num_key_value_heads", H), attn_head_dim=cfg.get("head_dim") or d // H,
                   attn_qkv_bias=kind == "qwen2" or bool(cfg.get("attention_bias", False)),
                   attn_qk_norm=kind == "qwen3",
                   rope_theta=_rope_theta(cfg), bos_token_id=cfg.get("bos_token_id"),
                   eos_token_id=cfg.get("eos_token_id") if isinstance(cfg.get("eos_token_id"), int) else None)
    ours = {"embeddings.weight": t["model.embed_tokens.weight"], "norm.weight": t["model.norm.weight"]}
    if not tie:
        ours["lm_head.weight"] = t["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm", "self_attn": "attn"}
    for key, value in t.items():
        if key.startswith("model.layers."):
            parts = key.split(".")[2:]
            ours["layers." + ".".join(names.get(p, p) for p in parts)] = value
    return gc, ours


def _gla_teacher(src: str) -> tuple[GLAConfig, dict]:
    from gla.models import from_pretrained
    teacher = from_pretrained(src)
    cfg = teacher.config
    if any(cfg.mixer_of(i) != "softmax" for i in range(cfg.n_layers)):
        raise ValueError(f"{src} has non-softmax layers: convert starts from a softmax model")
    return cfg, teacher.state_dict()


def student_config(teacher: GLAConfig, gla_layers: tuple, gate_bias_init: float) -> GLAConfig:
    """The teacher's config with ``gla_layers`` as GLA layers shaped like its attention."""
    d, H = teacher.d_model, teacher.attn_heads or teacher.n_heads
    D = teacher.attn_head_dim or d // H
    fields = {**teacher.to_dict(), "attn_layers": tuple(i for i in range(teacher.n_layers) if i not in gla_layers),
              "layer_mixers": (), "mixer": "gla", "n_heads": H, "num_kv_heads": teacher.attn_kv_heads,
              "expand_k": H * D / d, "expand_v": H * D / d, "output_gate": None, "feature_map": None,
              "qkv_bias": teacher.attn_qkv_bias, "qk_norm": teacher.attn_qk_norm, "gate_bias_init": gate_bias_init}
    return GLAConfig(**fields)


def convert(src: str, out: str, layers: str = "3:1", gate_bias_init: float = 4.0) -> GLATransformer:
    """Write the converted model to ``out`` (a new directory; save_pretrained's files plus the source's
    tokenizer.json when it has one) and return it."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"--from {src}: no such directory")
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; choose a new --out")
    with open(os.path.join(src, "config.json")) as f:
        is_gla = json.load(f).get("model_type") in ("gla_lm", "gla")
    tcfg, weights = _gla_teacher(src) if is_gla else _hf_teacher(src)
    scfg = student_config(tcfg, layer_pattern(layers, tcfg.n_layers), gate_bias_init)
    with torch.random.fork_rng():  # the new parameters' initial values, without moving the caller's RNG
        torch.manual_seed(0)
        student = GLATransformer.from_config(scfg)
    own = student.state_dict()
    for name, value in weights.items():
        if name not in own:
            raise ValueError(f"{src}: weight {name} has no place in the converted model")
        if own[name].shape != value.shape:
            raise ValueError(f"{src}: weight {name} is {tuple(value.shape)}, expected {tuple(own[name].shape)}")
    tied = {"lm_head.weight"} if scfg.tie_embeddings else set()
    missing = [k for k in own if k not in weights and k not in tied and not _new_in_gla(k)]
    if missing:
        raise ValueError(f"{src}: weights missing for {missing[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            own[name].copy_(value.to(own[name].dtype))
        for layer in student.layers:
            if layer.mixer == "gla":  # the gate starts from its bias alone: near 1, the same for every token
                layer.attn.gk_proj[1].weight.zero_()
    student.save_pretrained(out)
    tok = os.path.join(src, "tokenizer.json")
    if os.path.isfile(tok):
        shutil.copyfile(tok, os.path.join(out, "tokenizer.json"))
    return student


def _new_in_gla(name: str) -> bool:
    """Parameters a GLA layer has and softmax attention does not: trained from their initial values."""
    return ".attn.gk_proj." in name or ".attn.g_norm." in name
