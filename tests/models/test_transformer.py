"""GLATransformer: state per layer, pieces == whole, padding == packing == separate, presets, checkpoints."""
import json
import os

import pytest
import torch

import gla
from gla import GLAConfig, GLATransformer
from gla.layers.gla_attention import GatedLinearAttention
from gla.models.state import map_tensors, state_bytes
from tests.utils import rel_err

KINDS = {"gla": {}, "hybrid": {"attn_layers": (1,)}, "conv": {"use_short_conv": True, "attn_layers": (2,)},
         "no_mlp": {"mlp": "none", "attn_layers": (1,)}, "retnet": {"mixer": "retnet"}}


def model(kind="gla", **kw):
    torch.manual_seed(0)
    return GLATransformer(101, 48, 4, 96, 3, dropout=0.0, **{**KINDS[kind], **kw}).eval()


def test_seed_signature_and_from_config():
    m = GLATransformer(256)
    assert m.config.d_model == 512 and m.config.n_layers == 6 and m.config.dropout == 0.1
    m2 = GLATransformer.from_config(GLAConfig.preset("tiny"))
    assert m2.config == GLAConfig.preset("tiny")


@pytest.mark.parametrize("name,params,head_k,head_v", [("gla-340m", 340e6, 128, 256),
                                                        ("gla-1.3b", 1.3e9, 256, 512)])
def test_paper_presets(name, params, head_k, head_v):
    with torch.device("meta"):
        m = GLATransformer.from_config(GLAConfig.preset(name))
    attn = m.layers[0].attn
    assert (attn.head_k, attn.head_v, attn.n_heads) == (head_k, head_v, 4)
    assert abs(m.num_parameters() - params) / params < 0.15


def test_each_layer_has_its_own_state():
    m = model("hybrid")
    _, s = m(torch.randint(0, 101, (2, 12)))
    assert len(s.layers) == 3
    assert s.layers[0].recurrent.data_ptr() != s.layers[2].recurrent.data_ptr()
    assert not torch.allclose(s.layers[0].recurrent, s.layers[2].recurrent)
    assert s.layers[1].k.shape[2] == 12  # the softmax layer's KV cache


def test_state_walker_reaches_every_tensor_of_the_state():
    """state_bytes and select go through GLA states with conv caches, a KV cache, seen and the key mask."""
    m = model("conv")  # layers 0, 1: GLA with short-conv caches; layer 2: softmax
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :4] = 0
    _, s = m(torch.randint(0, 101, (3, 12)), attention_mask=mask)
    gla0, gla1, kv = s.layers
    every = [gla0.recurrent, *gla0.conv, gla1.recurrent, *gla1.conv, kv.k, kv.v, s.seen, s.key_mask]
    assert state_bytes(s) == sum(t.numel() * t.element_size() for t in every) > 0
    rows = torch.tensor([2, 0])
    picked = s.select(rows)
    got = [picked.layers[0].recurrent, *picked.layers[0].conv, picked.layers[1].recurrent, *picked.layers[1].conv,
           picked.layers[2].k, picked.layers[2].v, picked.seen, picked.key_mask]
    assert all(torch.equal(a, b[rows]) for a, b in zip(got, every, strict=True))
    nested = {"a": (torch.ones(2, 3), None, 7), "b": [torch.zeros(4, dtype=torch.int64)]}
    assert state_bytes(nested) == 2 * 3 * 4 + 4 * 8
    doubled = map_tensors(lambda t: t * 2, nested)
    assert doubled["a"][1:] == (None, 7) and torch.equal(doubled["a"][0], torch.full((2, 3), 2.0))


@pytest.mark.parametrize("kind", list(KINDS))
def test_pieces_with_state_equal_whole(kind):
    m = model(kind)
    x = torch.randint(0, 101, (2, 50))
    logits, _ = m(x)
    state, outs = None, []
    for a, b in ((0, 20), (20, 21), (21, 50)):
        out, state = m(x[:, a:b], state)
        outs.append(out)
    assert rel_err(torch.cat(outs, 1), logits) < 1e-5


@pytest.mark.parametrize("kind", list(KINDS))
def test_padded_batch_equals_packed_equals_separate(kind):
    m = model(kind)
    seqs = [torch.randint(0, 101, (n,)) for n in (7, 30, 19)]
    separate = [m(s.unsqueeze(0))[0][0] for s in seqs]
    T = max(len(s) for s in seqs)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):], mask[i, T - len(s):] = s, 1
    padded, _ = m(ids, attention_mask=mask)
    cu = torch.tensor([0, 7, 37, 56])
    packed, state = m(torch.cat(seqs).unsqueeze(0), cu_seqlens=cu)
    for i, s in enumerate(seqs):
        assert rel_err(padded[i, T - len(s):], separate[i]) < 1e-5
        assert rel_err(packed[0, cu[i]:cu[i + 1]], separate[i]) < 1e-5
    assert state.layers[0].recurrent.shape[0] == 3


def test_padded_batch_continues_with_state():
    m = model("hybrid")
    a, b = torch.randint(0, 101, (5,)), torch.randint(0, 101, (9,))
    ids = torch.stack([torch.cat([torch.zeros(4, dtype=torch.long), a]), b])
    mask = (torch.arange(9) >= torch.tensor([[4], [0]])).long()
    _, state = m(ids, attention_mask=mask)
    nxt = torch.randint(0, 101, (2, 3))
    out, _ = m(nxt, state)
    ref_a, _ = m(torch.cat([a, nxt[0]]).unsqueeze(0))
    ref_b, _ = m(torch.cat([b, nxt[1]]).unsqueeze(0))
    assert rel_err(out[0], ref_a[0, -3:]) < 1e-5 and rel_err(out[1], ref_b[0, -3:]) < 1e-5


def test_packed_batch_is_validated_once_per_forward_not_per_layer(monkeypatch):
    """Each value check stalls a GPU: the model checks cu_seqlens once, and the layers read no gate values."""
    import gla.layers.gla_attention as layer_mod
    import gla.models.transformer as model_mod
    import gla.ops as ops

    m = model()
    calls = []
    real = model_mod.validate_cu_seqlens
    monkeypatch.setattr(model_mod, "validate_cu_seqlens", lambda cu, T: (calls.append("model"), real(cu, T)))
    monkeypatch.setattr(layer_mod, "validate_cu_seqlens", lambda cu, T: calls.append("layer"))
    monkeypatch.setattr(ops, "_gate_ok", lambda g: pytest.fail("the layer's gate was value-checked"))
    m(torch.randint(0, 101, (1, 12)), cu_seqlens=torch.tensor([0, 5, 12]))
    assert calls == ["model"]
    with pytest.raises(ValueError, match="non-decreasing"):
        m(torch.randint(0, 101, (1, 12)), cu_seqlens=torch.tensor([0, 7, 5, 12]))


def test_layer_alone_validates_its_packed_batch():
    from gla.layers.gla_attention import GatedLinearAttention
    layer = GatedLinearAttention(32, 2)
    with pytest.raises(ValueError, match="end at"):
        layer(torch.randn(1, 10, 32), cu_seqlens=torch.tensor([0, 4, 9]))


def test_bad_inputs():
    m = model()
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        m(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="attn_layers"):
        GLAConfig(n_layers=2, attn_layers=(5,))
    with pytest.raises(ValueError, match="preset"):
        GLAConfig.preset("gla-7b")
    with pytest.raises(ValueError, match="no tokens"):
        m(torch.zeros(2, 0, dtype=torch.long))


@pytest.mark.parametrize("field,value,message", [
    ("vocab_size", "abc", "vocab_size must be int, got 'abc'"), ("d_model", None, "d_model must be int"),
    ("attn_layers", 5, "attn_layers must be tuple"), ("gate_logit_normalizer", 0.0, "finite positive"),
    ("gate_logit_normalizer", float("nan"), "finite positive"), ("norm_eps", -1.0, "finite positive"),
    ("rope_theta", 0.0, "finite positive"), ("expand_k", -1, "finite positive"), ("conv_size", 0, "positive"),
    ("clamp_min", float("nan"), "clamp_min"), ("clamp_min", 0.5, "clamp_min"), ("dropout", 1.0, "dropout"),
    ("n_layers", True, "n_layers must be int")])
def test_config_values_that_would_break_the_model_are_refused(field, value, message):
    """Each of these gave NaN logits, a layer that cannot be built, or a TypeError deep inside (a config.json
    edited by hand): now a ValueError naming the field."""
    with pytest.raises(ValueError, match=message):
        GLAConfig(**{field: value})


def test_a_state_continues_only_the_model_that_made_it():
    """A state from a model of another layout (depth, layer kinds, convolution caches, batch) is refused by
    shape, before any layer reads it: it had been ignored in part or failed deep inside a layer."""
    ids = torch.randint(0, 101, (2, 5))
    base = model()
    others = {"deeper": GLATransformer(101, 48, 4, 96, 4, dropout=0.0), "hybrid": model("hybrid"),
              "conv": model("conv")}
    messages = {"deeper": "state has 4 layers, this model 3", "hybrid": "layer 1 .gla. must be a GLAState",
                "conv": "layer 0 .gla. must be a GLAState without convolution caches"}
    for name, other in others.items():
        _, state = other(ids)
        with pytest.raises(ValueError, match=messages[name]):
            base(ids, state)
    _, state = base(ids)
    with pytest.raises(ValueError, match="state is for 2 sequences, the input has 1"):
        base(ids[:1], state)
    with pytest.raises(ValueError, match="must be the ModelState"):
        base(ids, [state.layers])
    with pytest.raises(ValueError, match=r"layer 1 \(softmax\) must be a KV cache"):
        model("hybrid")(ids, state)
    assert rel_err(base(ids[:, :1], state)[0], base(torch.cat([ids, ids[:, :1]], 1))[0][:, -1:]) < 1e-5


@pytest.mark.parametrize("kind", ["gla", "hybrid", "no_mlp", "retnet"])
def test_save_and_load_round_trip(tmp_path, kind):
    """Loading draws no random numbers (exact resume relies on it), also for RetNet's fixed-decay buffers, which
    no checkpoint holds; weights saved in bf16 load as fp32."""
    m = model(kind, tie_embeddings=True)
    m.save_pretrained(str(tmp_path))
    rng = torch.get_rng_state()
    m2 = gla.from_pretrained(str(tmp_path))
    assert torch.equal(torch.get_rng_state(), rng)
    x = torch.randint(0, 101, (1, 9))
    assert torch.equal(m(x)[0], m2(x)[0])
    assert m2.lm_head.weight is m2.embeddings.weight
    assert not any(t.is_meta for t in [*m2.parameters(), *m2.buffers()])
    assert json.load(open(tmp_path / "config.json"))["model_type"] == "gla_lm"
    m.to(torch.bfloat16).save_pretrained(str(tmp_path))
    m3 = gla.from_pretrained(str(tmp_path))
    assert {p.dtype for p in m3.parameters()} == {torch.float32}
    assert torch.equal(m3.embeddings.weight, m.embeddings.weight.float())


def test_loading_bad_checkpoints_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        gla.from_pretrained(str(tmp_path / "missing"))
    model().save_pretrained(str(tmp_path))
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="safetensors"):
        gla.from_pretrained(str(tmp_path))
    model().save_pretrained(str(tmp_path))
    cfg = json.load(open(tmp_path / "config.json"))
    json.dump({**cfg, "n_layers": 4}, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=r"model.safetensors do not match the config: missing \[.layers.3"):
        gla.from_pretrained(str(tmp_path))
    json.dump({**cfg, "d_ff": 64}, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="wrong shapes for the config.*mlp"):
        gla.from_pretrained(str(tmp_path))
    with open(tmp_path / "config.json", "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="JSON"):
        gla.from_pretrained(str(tmp_path))
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError):
        gla.from_pretrained(str(tmp_path))


def test_config_backend_reaches_the_gla_layers_and_checkpoints(tmp_path, monkeypatch):
    """backend="recurrent" from the config runs the recurrent operator even for T > 1 (where "auto" would take the
    chunk path), in every GLA layer, and survives save / load."""
    m = model("hybrid", backend="recurrent")
    m.save_pretrained(str(tmp_path))
    loaded = gla.from_pretrained(str(tmp_path))
    assert loaded.config.backend == "recurrent"
    assert [layer.attn.backend for layer in loaded.layers if layer.mixer != "softmax"] == ["recurrent"] * 2
    calls = []
    recurrent = gla.ops.recurrent_gla
    monkeypatch.setattr(gla.ops, "recurrent_gla", lambda *a: calls.append(a[0].shape[1]) or recurrent(*a))
    x = torch.randint(0, 101, (2, 30))
    logits = loaded(x)[0]
    assert calls == [30, 30]
    assert rel_err(logits, model("hybrid")(x)[0]) < 1e-5  # same weights, the chunk path
    with pytest.raises(ValueError, match="backend"):
        GLAConfig(backend="cuda")


@pytest.mark.parametrize("mixer", ["linear", "retnet", "seed"])
def test_baseline_mixers_chunk_equals_recurrent_and_continue(mixer):
    torch.manual_seed(0)
    m = GLATransformer(50, 32, 2, 64, 2, dropout=0.0, mixer=mixer).eval()
    attn = m.layers[0].attn
    assert attn.decay == {"linear": "none", "retnet": "fixed", "seed": "data"}[mixer]
    if mixer == "seed":
        assert (attn.feature_map, attn.output_gate) == ("elu1", "sigmoid")
    x = torch.randint(0, 50, (2, 40))
    logits, _ = m(x)
    out1, s = m(x[:, :25])
    out2, _ = m(x[:, 25:], s)
    assert rel_err(torch.cat([out1, out2], 1), logits) < 1e-5
    for layer in m.layers:
        layer.attn.backend = "recurrent"
    assert rel_err(m(x)[0], logits) < 1e-5


def test_blocks_without_mlp_are_the_mixer_alone():
    m = model("no_mlp")
    assert not any("mlp" in name for name, _ in m.named_parameters())
    x = torch.randn(2, 7, 48)
    for layer in m.layers:
        assert torch.equal(layer(x)[0], x + layer.attn(layer.attn_norm(x))[0])
    with pytest.raises(ValueError, match="'swiglu', 'gelu' or 'none'"):
        model(mlp="relu")


def test_gate_bias_init_sets_the_starting_decay_and_checkpoints_keep_trained_biases(tmp_path):
    """gate_bias_init b starts GLA's log forget gate near logsigmoid(b) / 16 in every layer with that gate
    (standalone layer too); it is only an initialisation: a checkpoint keeps the bias it trained to."""
    torch.manual_seed(0)
    m = GLATransformer(101, 48, 4, 96, 4, dropout=0.0, gate_bias_init=3.0,
                       layer_mixers=("gla", "retnet", "seed", "softmax")).eval()
    biases = [layer.attn.gk_proj[1].bias for layer in m.layers if getattr(layer.attn, "decay", None) == "data"]
    assert len(biases) == 2 and all(torch.equal(b, torch.full_like(b, 3.0)) for b in biases)
    assert torch.equal(model().layers[0].attn.gk_proj[1].bias, torch.zeros(24))  # the default is FLA's zero bias
    x = torch.randn(2, 7, 48)
    g = torch.nn.functional.logsigmoid(m.layers[0].attn.gk_proj(x)) / 16
    assert (g.mean() - torch.nn.functional.logsigmoid(torch.tensor(3.0)) / 16).abs() < 3e-4  # ~ -0.0030
    alone = GatedLinearAttention(48, 4, gate_bias_init=-1.5)
    assert torch.equal(alone.gk_proj[1].bias, torch.full((24,), -1.5))
    alone.gk_proj[1].reset_parameters()  # as after building on the meta device, then to_empty()
    assert torch.equal(alone.gk_proj[1].bias, torch.full((24,), -1.5))
    with torch.no_grad():
        for b in biases:
            b.copy_(torch.randn_like(b))
    m.save_pretrained(str(tmp_path))
    m2 = gla.from_pretrained(str(tmp_path))
    assert m2.config.gate_bias_init == 3.0
    assert torch.equal(m2.layers[2].attn.gk_proj[1].bias, biases[1])
    ids = torch.randint(0, 101, (1, 9))
    assert torch.equal(m(ids)[0], m2(ids)[0])
    for bad, message in ((float("inf"), "a finite number"), (None, "float, got None"), ("3", "float, got '3'")):
        with pytest.raises(ValueError, match="gate_bias_init must be " + message):
            GLAConfig(gate_bias_init=bad)


def test_layer_mixers_per_layer():
    cfg = GLAConfig.preset("tiny", n_layers=4, layer_mixers=("gla", "softmax", "retnet", "linear"))
    m = GLATransformer.from_config(cfg)
    assert [layer.mixer for layer in m.layers] == ["gla", "softmax", "retnet", "linear"]
    _, s = m(torch.randint(0, 256, (1, 5)))
    assert s.layers[1].k.shape[2] == 5
    with pytest.raises(ValueError, match="one entry per layer"):
        GLAConfig.preset("tiny", layer_mixers=("gla",))
    with pytest.raises(ValueError, match="unknown mixer"):
        GLAConfig.preset("tiny", mixer="mamba")


AUTOCAST_DEVICES = ["cpu"] + (["cuda"] if os.environ.get("GLA_TEST_GPU") == "1" and torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", AUTOCAST_DEVICES)
@pytest.mark.parametrize("mixer", ["gla", "retnet", "linear"])
def test_bf16_autocast_training_step_matches_fp32(device, mixer):
    """The `gla train` precision on a GPU: a forward under bf16 autocast (the gate stays float32) and its backward
    give a finite loss and gradients within bf16 rounding of the fp32 step (CPU always; CUDA with GLA_TEST_GPU=1)."""
    torch.manual_seed(0)
    m = GLATransformer(97, 64, 2, 128, 2, dropout=0.0, layer_mixers=(mixer, mixer), use_short_conv=True).to(device)
    x = torch.randint(0, 97, (4, 80), device=device)

    def step(autocast):
        m.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            logits = m(x[:, :-1])[0]
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters()]

    loss32, grads32 = step(False)
    loss16, grads16 = step(True)
    assert torch.isfinite(loss16) and abs(loss16 - loss32) < 1e-3 * loss32  # measured on CPU: <= 1e-5
    for g16, g32 in zip(grads16, grads32):
        assert torch.isfinite(g16).all() and rel_err(g16, g32) < 5e-2  # measured on CPU: <= 1.4e-2


@pytest.mark.parametrize("kind", ["gla", "hybrid", "conv"])
@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
def test_without_cache_no_state_is_built_and_outputs_are_unchanged(kind, packed, monkeypatch):
    """use_cache=False (training, scoring): the same logits and gradients, no state returned, and the GLA layers ask
    the operator for no final state."""
    import gla.layers.gla_attention as layer_mod

    m = model(kind).train()
    ids = torch.randint(0, 101, (1, 40) if packed else (2, 20))
    kw = dict(cu_seqlens=torch.tensor([0, 13, 13, 40])) if packed else {}
    asked = []
    real = layer_mod.gated_linear_attention
    monkeypatch.setattr(layer_mod, "gated_linear_attention",
                        lambda *a, **k: (asked.append(k["output_final_state"]), real(*a, **k))[1])
    outs = []
    for use_cache in (True, False):
        logits, state = m(ids, use_cache=use_cache, **kw)
        assert (state is None) == (not use_cache)
        grads = torch.autograd.grad(logits.square().mean(), list(m.parameters()))
        outs.append((logits, grads))
    n_gla = sum(layer.mixer != "softmax" for layer in m.layers)
    assert asked == [True] * n_gla + [False] * n_gla
    # Without a final state, sequences of one chunk take gla.ops.short_chunk (another order of the same sums;
    # each path is checked against the float64 reference in tests/ops): equal to fp32 rounding.
    assert rel_err(outs[1][0], outs[0][0]) < 1e-5
    for a, b in zip(outs[0][1], outs[1][1]):
        assert rel_err(b, a) < 1e-4
