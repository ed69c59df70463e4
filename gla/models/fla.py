"""Import FLA GLA checkpoints (flash-linear-attention's ``GLAForCausalLM.save_pretrained``, config model_type "gla").

FLA's GLA (checked against FLA 0.6.0) computes what our GLATransformer computes, with the same module layout:
pre-RMSNorm blocks, q/k to d*expand_k, v and the output gate to d*expand_v, forget gate
g = logsigmoid(x W1 W2 + b) / 16 (optionally clamped below), GLA with scale head_k^-1/2, per-head RMSNorm of the output
times swish(x W_r) (FusedRMSNormGated: norm first, then the gate), o_proj, SwiGLU MLP; hybrid softmax layers use
half-split (GPT-NeoX style) rotary embeddings with head_dim = hidden_size / num_heads. Only names differ:

    FLA                                         ours
    model.<rest>                                <rest>
    layers.{i}.attn.g_norm_swish_gate.weight    layers.{i}.attn.g_norm.weight   (fuse_norm=False: already g_norm)
    layers.{i}.attn.{q,k,v}_conv1d.weight       layers.{i}.attn.convs.{0,1,2}.weight
"""
from __future__ import annotations

import json
import os
import re
import warnings

import torch

from .config import GLAConfig, ffn_size, is_real
from .transformer import GLATransformer, read_config

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

FEATURE_MAPS = {None: None, "relu": "relu", "silu": "silu", "swish": "silu"}  # FLA's ACT2FN name -> ours
# Keys that only pick kernels, fusions, losses or generation defaults: no effect on the logits.
IGNORED = {"attn_mode", "fuse_norm", "fuse_swiglu", "fuse_cross_entropy", "fuse_linear_cross_entropy", "use_l2warp",
           "use_cache", "pad_token_id", "use_gk", "use_gv",  # use_gk / use_gv: stored but unused by FLA 0.6.0's layer
           "model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
           "return_dict", "output_hidden_states", "output_attentions", "is_encoder_decoder", "id2label", "label2id",
           "problem_type", "chunk_size_feed_forward", "tie_encoder_decoder", "keys_to_ignore_at_inference"}
KNOWN = {"hidden_size", "expand_k", "expand_v", "hidden_ratio", "intermediate_size", "num_hidden_layers", "num_heads",
         "num_kv_heads", "feature_map", "use_short_conv", "conv_size", "conv_bias", "use_output_gate", "clamp_min",
         "hidden_act", "max_position_embeddings", "elementwise_affine", "norm_eps", "attn", "bos_token_id",
         "eos_token_id", "tie_word_embeddings", "initializer_range", "vocab_size", "attnres_block_size",
         "gate_logit_normalizer", "gate_low_rank_dim"}


def config_from_fla(fla: dict) -> GLAConfig:
    """Our GLAConfig for an FLA GLAConfig dict (FLA's defaults where a key is absent).

    Raises ValueError naming every option whose value we cannot reproduce exactly.
    """
    get = fla.get
    bad = []
    if get("hidden_act", "swish") not in ("swish", "silu"):
        bad.append(f"hidden_act={get('hidden_act')!r} (only swish/silu: it is both the MLP and output-gate activation)")
    if not isinstance(get("feature_map"), (str, type(None))) or get("feature_map") not in FEATURE_MAPS:
        bad.append(f"feature_map={get('feature_map')!r} (supported: {sorted(k for k in FEATURE_MAPS if k)} or null)")
    if get("attnres_block_size") is not None:
        bad.append(f"attnres_block_size={get('attnres_block_size')!r} (attention residuals)")
    if get("conv_bias", False):
        bad.append("conv_bias=true (short convolutions with bias)")
    clamp_min = get("clamp_min")
    if clamp_min is not None and not is_real(clamp_min):
        bad.append(f"clamp_min={clamp_min!r} (a number or null)")
    elif clamp_min is not None and clamp_min >= 0:
        bad.append(f"clamp_min={clamp_min} (>= 0 removes all decay; our layer needs a negative bound)")
    attn_kw = {}
    specs = get("attn") or None  # FLA: None, one spec dict, or a list of them
    if specs is not None and not (isinstance(specs, dict) or (isinstance(specs, (list, tuple))
                                                             and all(isinstance(x, dict) for x in specs))):
        bad.append(f"attn={specs!r} (null, one spec dict, or a list of them)")
    elif specs is not None:
        specs = [specs] if isinstance(specs, dict) else specs
        shared = {(s.get("num_heads"), s.get("num_kv_heads") or s.get("num_heads"), float(s.get("rope_theta", 1e4)),
                   bool(s.get("qkv_bias", False))) for s in specs}
        if len(shared) > 1:
            bad.append(f"attn specs with different heads, rope_theta or qkv_bias {sorted(shared)} "
                       "(one softmax shape only)")
        for s in specs:
            if s.get("window_size") is not None:
                bad.append(f"attn.window_size={s['window_size']} (sliding-window softmax layers)")
            if s.get("num_heads") is None or "layers" not in s:
                bad.append("attn spec without 'layers' and 'num_heads'")
        if not bad:
            heads, kv_heads, theta, bias = shared.pop()
            attn_kw = dict(attn_layers=tuple(sorted(i for s in specs for i in s["layers"])), attn_heads=heads,
                           attn_kv_heads=kv_heads, rope_theta=theta, attn_qkv_bias=bias)
    if bad:
        raise ValueError("unsupported FLA GLA options: " + "; ".join(bad))
    unknown = sorted(set(fla) - KNOWN - IGNORED)
    if unknown:
        warnings.warn(f"ignoring FLA config keys we do not know: {unknown}")
    hidden = get("hidden_size", 2048)
    ratio = get("hidden_ratio") or 4
    if get("intermediate_size") is None and not (is_real(hidden) and is_real(ratio)):
        raise ValueError(f"FLA config: hidden_size and hidden_ratio must be numbers, got {hidden!r}, {ratio!r}")
    d_ff = get("intermediate_size") or ffn_size(hidden, ratio)
    feature_map = FEATURE_MAPS[get("feature_map")]
    return GLAConfig(
        vocab_size=get("vocab_size", 32000), d_model=hidden, n_heads=get("num_heads", 4), d_ff=d_ff,
        n_layers=get("num_hidden_layers", 24), max_seq_len=get("max_position_embeddings") or 2048, dropout=0.0,
        mlp="swiglu", norm="rms", norm_eps=get("norm_eps", 1e-6), tie_embeddings=get("tie_word_embeddings", False),
        initializer_range=get("initializer_range", 0.02), expand_k=get("expand_k", 0.5),
        expand_v=get("expand_v", 1.0), num_kv_heads=get("num_kv_heads"), feature_map=feature_map,
        output_gate="swish" if get("use_output_gate", True) else None,
        gate_low_rank_dim=get("gate_low_rank_dim", 16), gate_logit_normalizer=get("gate_logit_normalizer", 16.0),
        clamp_min=clamp_min, use_short_conv=get("use_short_conv", False), conv_size=get("conv_size", 4),
        bos_token_id=get("bos_token_id", 1),
        eos_token_id=None if isinstance(get("eos_token_id", 2), list) else get("eos_token_id", 2), **attn_kw)


_RENAMES = [(re.compile(r"\.attn\.g_norm_swish_gate\."), ".attn.g_norm."),
            (re.compile(r"\.attn\.q_conv1d\."), ".attn.convs.0."),
            (re.compile(r"\.attn\.k_conv1d\."), ".attn.convs.1."),
            (re.compile(r"\.attn\.v_conv1d\."), ".attn.convs.2.")]


def state_dict_from_fla(tensors: dict, cfg: GLAConfig) -> dict:
    """FLA GLAForCausalLM keys -> GLATransformer keys (tensors unchanged; see the table in the module docstring).

    Fills what FLA does not store: lm_head.weight when embeddings are tied, and unit g_norm weights when FLA's
    elementwise_affine=False.
    """
    out = {}
    for key, t in tensors.items():
        name = key.removeprefix("model.")
        for pat, rep in _RENAMES:
            name = pat.sub(rep, name)
        out[name] = t
    if cfg.tie_embeddings and "embeddings.weight" in out:
        out["lm_head.weight"] = out["embeddings.weight"]
    for i in range(cfg.n_layers):
        gate = f"layers.{i}.attn.gk_proj.0.weight"
        if cfg.mixer_of(i) == "gla" and gate in out and f"layers.{i}.attn.g_norm.weight" not in out:
            head_v = int(cfg.d_model * cfg.expand_v) // cfg.n_heads
            out[f"layers.{i}.attn.g_norm.weight"] = torch.ones(head_v, dtype=out[gate].dtype)
    return out


def read_fla_weights(path: str, map_location="cpu") -> dict:
    """All tensors of a checkpoint directory: model.safetensors, sharded safetensors (with their index),
    pytorch_model.bin or sharded .bin files. Clear errors for missing, truncated or corrupted files."""
    for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS), (TORCH_BIN_INDEX, TORCH_BIN)):
        if os.path.isfile(os.path.join(path, single)):
            return _load_file(os.path.join(path, single), map_location)
        ipath = os.path.join(path, index_name)
        if os.path.isfile(ipath):
            try:
                with open(ipath) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
                raise ValueError(f"{ipath} is not a valid weight index (needs a 'weight_map'): {e}") from e
            tensors = {}
            for shard in shards:
                spath = os.path.join(path, shard)
                if not os.path.isfile(spath):
                    raise FileNotFoundError(f"{ipath} lists {shard}, which is missing from {path}")
                tensors.update(_load_file(spath, map_location))
            return tensors
    raise FileNotFoundError(f"no weights in {path!r}: expected {SAFETENSORS}, {SAFETENSORS_INDEX} with its shards, "
                            f"{TORCH_BIN} or {TORCH_BIN_INDEX}")


def _load_file(fpath: str, map_location) -> dict:
    try:
        if fpath.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(fpath, device=str(map_location))
        state = torch.load(fpath, map_location=map_location, weights_only=True)
    except ImportError as e:
        raise ImportError("reading safetensors checkpoints needs safetensors: pip install 'gla[hf]'") from e
    except Exception as e:  # safetensors and torch raise their own types for truncated or corrupted files
        raise ValueError(f"{fpath} is not a readable checkpoint file: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{fpath} does not hold a flat state dict of tensors")
    return state


def load_fla(path: str, map_location="cpu") -> GLATransformer:
    """A float32 GLATransformer from an FLA GLA checkpoint directory. path: directory with config.json
    (model_type "gla") and the weights; map_location: device of the returned model."""
    fla = read_config(path)
    if fla.get("model_type") != "gla":
        raise ValueError(f"{path}/config.json has model_type {fla.get('model_type')!r}, expected FLA's 'gla'")
    cfg = config_from_fla(fla)
    state = state_dict_from_fla(read_fla_weights(path, "cpu"), cfg)
    ranks = {t.shape[0] for k, t in state.items() if k.endswith(".attn.gk_proj.0.weight")}
    if len(ranks) == 1 and ranks != {cfg.gate_low_rank_dim}:
        if "gate_low_rank_dim" in fla:
            raise ValueError(f"gate_low_rank_dim={cfg.gate_low_rank_dim} in config.json but the checkpoint's "
                             f"gk_proj.0 weights have rank {ranks.pop()}")
        cfg.gate_low_rank_dim = ranks.pop()  # FLA fixes it in code (16), not in its config: trust the weights
    return GLATransformer.from_state(cfg, state, what=f"{path}: FLA weights").to(map_location)
