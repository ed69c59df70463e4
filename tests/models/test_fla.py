"""FLA checkpoint import: synthetic FLA-layout directories (FLA's config names, key names and shapes) load and give
the logits of our model with the same weights mapped by hand. FLA's own forward is checked by
benchmarks/fla_parity.py."""
import json
import os

import pytest
import torch

pytest.importorskip("safetensors")
from safetensors.torch import save_file

import gla
from gla.models.fla import config_from_fla
from tests.utils import rel_err

D, V, L = 64, 97, 3


def fla_config(**kw):
    """config.json as FLA's GLAConfig.save_pretrained writes it (a subset of its keys, FLA's names)."""
    return {"model_type": "gla", "architectures": ["GLAForCausalLM"], "hidden_size": D, "num_heads": 2,
            "num_kv_heads": None, "expand_k": 0.5, "expand_v": 1.0, "hidden_ratio": 4, "intermediate_size": None,
            "num_hidden_layers": L, "vocab_size": V, "norm_eps": 1e-6, "attn": None, "attn_mode": "chunk",
            "use_short_conv": False, "conv_size": 4, "feature_map": None, "use_output_gate": True,
            "clamp_min": None, "hidden_act": "swish", "elementwise_affine": True, "fuse_norm": True,
            "tie_word_embeddings": False, "use_gk": True, "use_gv": False, "torch_dtype": "float32", **kw}


def fla_weights(cfg, seed=0):
    """Random tensors with FLA's GLAForCausalLM names and shapes for the FLA config dict ``cfg``."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.1):
        return torch.randn(*shape, generator=gen) * scale

    H, Hkv = cfg["num_heads"], cfg["num_kv_heads"] or cfg["num_heads"]
    dk, dv = int(D * cfg["expand_k"]), int(D * cfg["expand_v"])
    dk_kv, dv_kv = dk * Hkv // H, dv * Hkv // H
    ff = cfg["intermediate_size"] or 256 * -(-int(D * cfg["hidden_ratio"] * 2 / 3) // 256)
    attn = cfg["attn"] or {"layers": []}
    t = {"model.embeddings.weight": rnd(V, D, scale=1.0), "model.norm.weight": 1 + rnd(D)}
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = rnd(V, D)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "attn_norm.weight": 1 + rnd(D), p + "mlp_norm.weight": 1 + rnd(D),
                  p + "mlp.gate_proj.weight": rnd(ff, D), p + "mlp.up_proj.weight": rnd(ff, D),
                  p + "mlp.down_proj.weight": rnd(D, ff)})
        if i in attn["layers"]:
            hd, kvh = D // attn["num_heads"], attn.get("num_kv_heads") or attn["num_heads"]
            t.update({p + "attn.q_proj.weight": rnd(D, D), p + "attn.k_proj.weight": rnd(kvh * hd, D),
                      p + "attn.v_proj.weight": rnd(kvh * hd, D), p + "attn.o_proj.weight": rnd(D, D)})
            if attn.get("qkv_bias"):
                t.update({p + f"attn.{n}_proj.bias": rnd(d) for n, d in (("q", D), ("k", kvh * hd), ("v", kvh * hd))})
            continue
        t.update({p + "attn.q_proj.weight": rnd(dk, D), p + "attn.k_proj.weight": rnd(dk_kv, D),
                  p + "attn.v_proj.weight": rnd(dv_kv, D), p + "attn.o_proj.weight": rnd(D, dv),
                  p + "attn.gk_proj.0.weight": rnd(16, D), p + "attn.gk_proj.1.weight": rnd(dk_kv, 16),
                  p + "attn.gk_proj.1.bias": rnd(dk_kv, scale=1.0)})
        if cfg["use_output_gate"]:
            t[p + "attn.g_proj.weight"] = rnd(dv, D)
        if cfg["elementwise_affine"]:
            fused = cfg["fuse_norm"] and cfg["use_output_gate"]
            t[p + ("attn.g_norm_swish_gate.weight" if fused else "attn.g_norm.weight")] = 1 + rnd(dv // H)
        if cfg["use_short_conv"]:
            for n, c in (("q", dk), ("k", dk_kv), ("v", dv_kv)):
                t[p + f"attn.{n}_conv1d.weight"] = rnd(c, 1, cfg["conv_size"], scale=0.5)
    return t


def write(path, cfg, tensors, fmt="safetensors"):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    if fmt == "safetensors":
        save_file(tensors, os.path.join(path, "model.safetensors"))
    elif fmt == "bin":
        torch.save(tensors, os.path.join(path, "pytorch_model.bin"))
    else:  # two shards with an index, as save_pretrained writes large models
        keys = sorted(tensors)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, ks in shards.items():
            save_file({k: tensors[k] for k in ks}, os.path.join(path, name))
        index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f)
    return str(path)


def by_hand(cfg, tensors, **ours):
    """Our model with an explicitly written GLAConfig, loaded with the FLA weights renamed by hand."""
    attn = cfg["attn"]
    hybrid = {} if attn is None else dict(attn_layers=tuple(attn["layers"]), attn_heads=attn["num_heads"],
                                          attn_kv_heads=attn.get("num_kv_heads"),
                                          rope_theta=attn.get("rope_theta", 10000.0),
                                          attn_qkv_bias=attn.get("qkv_bias", False))
    m = gla.GLATransformer(V, D, cfg["num_heads"], cfg["intermediate_size"] or 256, L, dropout=0.0,
                           num_kv_heads=cfg["num_kv_heads"], tie_embeddings=cfg["tie_word_embeddings"],
                           use_short_conv=cfg["use_short_conv"], clamp_min=cfg["clamp_min"],
                           output_gate="swish" if cfg["use_output_gate"] else None, **hybrid, **ours)
    state = {}
    for k, v in tensors.items():
        k = k.replace("model.", "", 1).replace("g_norm_swish_gate", "g_norm")
        for i, n in enumerate("qkv"):
            k = k.replace(f"attn.{n}_conv1d", f"attn.convs.{i}")
        state[k] = v
    if cfg["tie_word_embeddings"]:
        state["lm_head.weight"] = state["embeddings.weight"]
    if not cfg["elementwise_affine"]:
        state.update({k: torch.ones_like(v) for k, v in m.state_dict().items() if "g_norm" in k})
    m.load_state_dict(state)
    return m.eval()


CASES = {
    "plain": {},
    "hybrid": dict(attn={"layers": [1], "num_heads": 4, "num_kv_heads": 2, "qkv_bias": False,
                         "window_size": None, "rope_theta": 500000.0}),
    "hybrid_bias": dict(attn={"layers": [0], "num_heads": 2, "qkv_bias": True}),
    "tied": dict(tie_word_embeddings=True),
    "conv_gqa_clamp": dict(use_short_conv=True, num_kv_heads=1, clamp_min=-0.05),
    "no_gate_no_affine": dict(use_output_gate=False, elementwise_affine=False, intermediate_size=160),
    "unfused_norm": dict(fuse_norm=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fla_checkpoint_gives_the_hand_mapped_logits(tmp_path, case):
    cfg = fla_config(**CASES[case])
    tensors = fla_weights(cfg)
    m = gla.from_pretrained(write(tmp_path, cfg, tensors))
    ref = by_hand(cfg, tensors)
    assert m.config.mixer_of(1) == ("softmax" if case == "hybrid" else "gla")
    x = torch.randint(0, V, (2, 37))
    with torch.no_grad():
        assert rel_err(m.eval()(x)[0], ref(x)[0]) < 1e-6
    if cfg["tie_word_embeddings"]:
        assert m.lm_head.weight is m.embeddings.weight


@pytest.mark.parametrize("fmt", ["bin", "sharded"])
def test_weight_file_formats(tmp_path, fmt):
    cfg = fla_config(**CASES["hybrid"])
    tensors = {k: v.to(torch.bfloat16) for k, v in fla_weights(cfg).items()}  # FLA often saves bf16
    m = gla.from_pretrained(write(tmp_path, cfg, tensors, fmt))
    assert all(p.dtype == torch.float32 for p in m.parameters())
    x = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        ref = by_hand(cfg, {k: v.float() for k, v in tensors.items()})(x)[0]
        assert rel_err(m(x)[0], ref) < 1e-6


def test_config_mapping():
    c = config_from_fla(fla_config(hidden_size=1024, num_hidden_layers=24, vocab_size=32000, hidden_ratio=4,
                                   feature_map="swish", max_position_embeddings=4096))
    assert (c.d_model, c.n_layers, c.d_ff, c.n_heads, c.feature_map, c.max_seq_len) == \
        (1024, 24, 2816, 2, "silu", 4096)  # 1024 * 4 * 2/3 = 2730 -> 2816 (multiple of 256), as FLA's GatedMLP
    assert (c.gate_logit_normalizer, c.gate_low_rank_dim, c.dropout, c.expand_k) == (16.0, 16, 0.0, 0.5)
    assert config_from_fla({"model_type": "gla"}).d_model == 2048  # FLA's defaults for absent keys


@pytest.mark.parametrize("option,match", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(feature_map="sqrelu"), "feature_map"),
    (dict(attn={"layers": [0], "num_heads": 2, "window_size": 64}), "window_size"),
    (dict(attn=[{"layers": [0], "num_heads": 2}, {"layers": [1], "num_heads": 4}]), "different heads"),
    (dict(attnres_block_size=2), "attnres_block_size"),
    (dict(clamp_min=0.0), "clamp_min"),
    # values of the wrong type (a config edited by hand): named, not a TypeError from inside the conversion
    (dict(attn="abc"), "attn='abc'"), (dict(attn=5), "attn=5"), (dict(clamp_min="x"), "clamp_min='x'"),
    (dict(feature_map=["relu"]), "feature_map"), (dict(hidden_size="32", intermediate_size=None), "hidden_size"),
    (dict(vocab_size=None), "vocab_size must be int"), (dict(gate_logit_normalizer="x"), "gate_logit_normalizer"),
])
def test_unsupported_options_are_named(option, match):
    with pytest.raises(ValueError, match=match):
        config_from_fla(fla_config(**option))


def test_unknown_keys_warn():
    with pytest.warns(UserWarning, match="use_fancy_thing"):
        config_from_fla(fla_config(use_fancy_thing=True))


def test_bad_checkpoints_give_clear_errors(tmp_path):
    cfg = fla_config()
    tensors = fla_weights(cfg)
    with pytest.raises(FileNotFoundError, match="config.json"):
        gla.from_pretrained(str(tmp_path / "nothing"))
    path = write(tmp_path / "no_weights", cfg, tensors)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no weights"):
        gla.from_pretrained(path)
    path = write(tmp_path / "corrupt", cfg, tensors)
    with open(os.path.join(path, "model.safetensors"), "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        gla.from_pretrained(path)
    path = write(tmp_path / "corrupt_bin", cfg, tensors, "bin")
    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        gla.from_pretrained(path)
    path = write(tmp_path / "shard_missing", cfg, tensors, "sharded")
    os.remove(os.path.join(path, "model-00002-of-00002.safetensors"))
    with pytest.raises(FileNotFoundError, match="00002"):
        gla.from_pretrained(path)
    missing = dict(tensors)
    del missing["model.layers.1.attn.gk_proj.1.bias"]
    with pytest.raises(ValueError, match="missing.*gk_proj.1.bias"):
        gla.from_pretrained(write(tmp_path / "missing_key", cfg, missing))
    wrong = {**tensors, "model.layers.0.attn.q_proj.weight": torch.zeros(8, D)}
    with pytest.raises(ValueError, match="wrong shapes.*q_proj"):
        gla.from_pretrained(write(tmp_path / "wrong_shape", cfg, wrong))
    with pytest.raises(ValueError, match="unsupported FLA GLA options: hidden_act"):
        gla.from_pretrained(write(tmp_path / "gelu", fla_config(hidden_act="gelu"), tensors))
