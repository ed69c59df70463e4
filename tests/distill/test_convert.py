"""gla convert: Hugging Face Llama / Qwen2 and gla softmax checkpoints into GLA / hybrid models."""
import json
import os

import pytest
import torch

from gla import GLATransformer
from gla.distill import convert, layer_pattern
from gla.models import from_pretrained

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 120, (2, 17), generator=torch.Generator().manual_seed(0))


def _hf(tmp_path, kind):
    """A random tiny model with grouped-query heads (Qwen2: q/k/v biases and tied embeddings; Qwen3: per-head q/k
    norms and a head size other than hidden / heads), weights perturbed
    so that biases and norms are not at their initial values."""
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[kind]
    torch.manual_seed(0)
    cfg = cls[0](vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, rope_theta=5000.0,
                 tie_word_embeddings=kind == "qwen2", **({"head_dim": 24} if kind == "qwen3" else {}))
    teacher = cls[1](cfg).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = str(tmp_path / kind)
    teacher.save_pretrained(path)
    return teacher, path


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_all_softmax_pattern_reproduces_the_teachers_logits(tmp_path, kind):
    teacher, src = _hf(tmp_path, kind)
    convert(src, str(tmp_path / "out"), "none")
    student = from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        assert torch.allclose(student(IDS)[0], teacher(IDS).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_gla_layers_start_from_the_teachers_projections(tmp_path, kind):
    teacher, src = _hf(tmp_path, kind)
    student = convert(src, str(tmp_path / "out"), "3:1", gate_bias_init=4.0)
    assert [layer.mixer for layer in student.layers] == ["gla", "gla", "gla", "softmax"]
    t = teacher.state_dict()
    for i in range(3):
        attn = student.layers[i].attn
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(getattr(attn, p).weight, t[f"model.layers.{i}.self_attn.{p}.weight"])
        if kind == "qwen2":
            assert torch.equal(attn.k_proj.bias, t[f"model.layers.{i}.self_attn.k_proj.bias"])
        if kind == "qwen3":
            assert torch.equal(attn.k_norm.weight, t[f"model.layers.{i}.self_attn.k_norm.weight"])
        assert attn.num_kv_heads == 2 and attn.output_gate is None
        assert torch.equal(student.layers[i].mlp.down_proj.weight, t[f"model.layers.{i}.mlp.down_proj.weight"])
        assert not attn.gk_proj[1].weight.any() and torch.all(attn.gk_proj[1].bias == 4.0)
    reloaded = from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():  # both inference forwards (a CPU training forward fuses operators, as ulp-level changes)
        logits, _ = reloaded(IDS)
        assert torch.isfinite(logits).all() and torch.equal(logits, student.eval()(IDS)[0])


def test_a_gla_softmax_checkpoint_converts_too(tmp_path):
    torch.manual_seed(0)
    teacher = GLATransformer(120, 48, 4, 96, 4, dropout=0.0, mixer="softmax", tie_embeddings=True).eval()
    teacher.save_pretrained(str(tmp_path / "t"))
    same = convert(str(tmp_path / "t"), str(tmp_path / "s"), "none").eval()
    with torch.no_grad():
        assert torch.equal(same(IDS)[0], teacher(IDS)[0])
    hybrid = convert(str(tmp_path / "t"), str(tmp_path / "h"), "1,2")
    assert [layer.mixer for layer in hybrid.layers] == ["softmax", "gla", "gla", "softmax"]


def test_layer_patterns():
    assert layer_pattern("all", 4) == (0, 1, 2, 3) and layer_pattern("none", 4) == ()
    assert layer_pattern("3:1", 8) == (0, 1, 2, 4, 5, 6)
    assert layer_pattern("1:1", 5) == (0, 2, 4)
    assert layer_pattern("0, 2,2", 4) == (0, 2)
    for bad in ("0:0", "a:b", "7", "1,x", ""):
        with pytest.raises(ValueError, match="--layers"):
            layer_pattern(bad, 4)


def test_bad_sources_get_clear_errors(tmp_path):
    _, src = _hf(tmp_path, "llama")
    with pytest.raises(FileExistsError):
        convert(src, src, "all")
    with pytest.raises(FileNotFoundError):
        convert(str(tmp_path / "nowhere"), str(tmp_path / "o1"), "all")
    pickled = tmp_path / "pickled"
    os.makedirs(pickled)
    (pickled / "config.json").write_text((tmp_path / "llama" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        convert(str(pickled), str(tmp_path / "o2"), "all")
    cfg = json.loads((tmp_path / "llama" / "config.json").read_text())
    for change, match in (({"model_type": "gpt2"}, "not supported"),
                          ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "RoPE scaling")):
        other = tmp_path / f"other-{match[:3]}"
        os.makedirs(other)
        for name in os.listdir(tmp_path / "llama"):
            (other / name).write_bytes((tmp_path / "llama" / name).read_bytes())
        (other / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=match):
            convert(str(other), str(tmp_path / f"o-{match[:3]}"), "all")


def test_cli_convert(tmp_path, capsys):
    from gla.cli import main
    _, src = _hf(tmp_path, "llama")
    assert main(["convert", "--from", src, "--out", str(tmp_path / "c"), "--layers", "all"]) == 0
    assert "4 GLA and 0 softmax layers" in capsys.readouterr().out
