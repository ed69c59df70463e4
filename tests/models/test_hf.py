"""Hugging Face adapter: AutoModelForCausalLM round trips, HF generate() == gla.generate on our recurrent cache."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import transformers
from transformers import AutoConfig, AutoModelForCausalLM

import gla
from gla.data import IGNORE_INDEX
from gla.models import hf
from tests.utils import rel_err

transformers.logging.set_verbosity_error()
KINDS = {"gla": {}, "hybrid": {"attn_layers": (1,)}, "tied_conv": {"tie_embeddings": True, "use_short_conv": True},
         "retnet_gqa": {"layer_mixers": ("retnet", "gla", "softmax"), "num_kv_heads": 2}}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cache_of(out):
    """The cache in a model or generate() output (its field is "cache" in transformers 5.24, earlier
    5.x "past_key_values")."""
    return out[hf._CACHE_FIELD]


def make(kind="gla"):
    torch.manual_seed(0)
    return gla.GLATransformer(101, 48, 4, 96, 3, dropout=0.0, **KINDS[kind]).eval()


def hf_model(tmp_path, kind="gla"):
    m = make(kind)
    m.save_pretrained(str(tmp_path))
    return m, AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()


def test_config_mirrors_glaconfig():
    ours = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(gla.GLAConfig)}
    c = hf.GLALMConfig()
    assert {k: getattr(c, k) for k in ours} == ours
    assert c.to_gla_config() == gla.GLAConfig()
    c = hf.GLALMConfig.from_gla_config(gla.GLAConfig.preset("tiny", attn_layers=(1,)))
    assert (c.hidden_size, c.num_hidden_layers, c.tie_word_embeddings) == (64, 2, False)
    assert c.to_gla_config() == gla.GLAConfig.preset("tiny", attn_layers=(1,))
    assert isinstance(AutoConfig.for_model("gla_lm"), hf.GLALMConfig)


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip_both_ways(tmp_path, kind):
    m, h = hf_model(tmp_path / "ours", kind)
    assert isinstance(h, hf.GLAForCausalLM)
    x = torch.randint(0, 101, (2, 13))
    with torch.no_grad():
        ref, _ = m(x)
        assert torch.equal(h(x).logits, ref)
        h.save_pretrained(str(tmp_path / "hf"))
    back = gla.from_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():
        assert torch.equal(back(x)[0], ref)
    if m.config.tie_embeddings:
        assert h.model.lm_head.weight is h.model.embeddings.weight


@pytest.mark.parametrize("kind", ["gla", "hybrid", "tied_conv"])
def test_greedy_generate_runs_on_the_engine_and_equals_the_transformers_loop(tmp_path, kind):
    """Plain generate() goes to gla's engine (no HF forward call); transformers' own loop (one forward per token on
    our GLACache) gives the same tokens, also with an eos that ends rows at different steps (pad after it)."""
    m, h = hf_model(tmp_path, kind)
    calls = []
    h.register_forward_pre_hook(lambda mod, a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    x = torch.randint(0, 101, (2, 11))
    out = h.generate(x, max_new_tokens=8, do_sample=False)
    assert calls == [] and torch.equal(out, gla.generate(m, x, 8, temperature=0))
    loop = transformers.GenerationMixin.generate(h, x, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, loop)
    assert calls == [(2, 11)] + [(2, 1)] * 7  # the loop: prefill once, then one token per step
    eos = int(out[0, 11 + 2])  # row 0 ends at its third new token; row 1 later or never
    for kw in (dict(max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=7),
               dict(max_length=17, do_sample=False, eos_token_id=torch.tensor([eos])),  # pad = eos
               dict(do_sample=False)):  # no length given: transformers' default of 20 new tokens
        assert torch.equal(h.generate(x, **kw), transformers.GenerationMixin.generate(h, x, **kw)), kw


def test_sampling_matches_gla_generate_with_the_same_seed(tmp_path):
    m, h = hf_model(tmp_path, "hybrid")
    x = torch.randint(0, 101, (2, 7))
    for kw, ours in (({"top_k": None}, {}), ({"top_k": 7, "temperature": 0.7}, {"top_k": 7, "temperature": 0.7})):
        torch.manual_seed(5)
        a = h.generate(x, max_new_tokens=10, do_sample=True, **kw)
        torch.manual_seed(5)
        assert torch.equal(a, gla.generate(m, x, 10, **ours))
        torch.manual_seed(5)
        assert torch.equal(a, transformers.GenerationMixin.generate(h, x, max_new_tokens=10, do_sample=True, **kw))


def test_left_padded_batch_equals_gla_ragged_prompts(tmp_path):
    m, h = hf_model(tmp_path, "hybrid")
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 1, 2, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    out = h.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, gla.generate(m, [[5, 6, 7, 8, 9], [1, 2, 3]], 6, temperature=0))


def test_returned_cache_continues_generation(tmp_path):
    _, h = hf_model(tmp_path, "hybrid")
    x = torch.randint(0, 101, (2, 9))
    first = h.generate(x, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    cache = cache_of(first)
    assert isinstance(cache, hf.GLACache) and cache.get_seq_length() == 9 + 2
    more = h.generate(first.sequences, **{hf._CACHE_FIELD: cache}, max_new_tokens=3, do_sample=False)
    assert torch.equal(more, h.generate(x, max_new_tokens=6, do_sample=False))


def test_gla_cache_bytes_do_not_grow_and_beam_search_runs(tmp_path):
    _, h = hf_model(tmp_path, "gla")
    sizes = [cache_of(h(torch.randint(0, 101, (1, T)))).nbytes() for T in (4, 64)]
    assert sizes[0] == sizes[1] > 0
    out = h.generate(torch.randint(0, 101, (2, 5)), max_new_tokens=4, num_beams=3, do_sample=False)
    assert out.shape == (2, 9)


def test_loss_and_logits_to_keep(tmp_path):
    _, h = hf_model(tmp_path, "gla")
    x = torch.randint(0, 101, (2, 10))
    out = h(x, labels=x)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 101), x[:, 1:].reshape(-1))
    assert rel_err(out.loss, ref) < 1e-6
    labels = x.clone()
    labels[:, 5:] = IGNORE_INDEX  # only the targets x[:, 1:5] count
    ref = torch.nn.functional.cross_entropy(out.logits[:, :4].reshape(-1, 101), x[:, 1:5].reshape(-1))
    assert rel_err(h(x, labels=labels).loss, ref) < 1e-6
    assert h(x, logits_to_keep=1).logits.shape == (2, 1, 101)


def test_bad_inputs(tmp_path):
    _, h = hf_model(tmp_path, "gla")
    x = torch.randint(0, 101, (1, 4))
    with pytest.raises(ValueError, match="inputs_embeds"):
        h(x, inputs_embeds=torch.zeros(1, 4, 48))
    with pytest.raises(TypeError, match="GLACache"):
        h(x, cache=transformers.DynamicCache())
    with pytest.raises(ValueError, match="attention_mask"):
        h(x, attention_mask=torch.ones(1, 2))
    with pytest.raises(NotImplementedError, match="rolled back"):
        cache_of(h(x)).crop(1)


def test_import_gla_registers_and_costs_nothing_without_transformers(tmp_path):
    """Needs gla/__init__.py to import gla.models.hf when transformers is installed."""
    with open(os.path.join(REPO, "gla", "__init__.py")) as f:
        registers = "gla.models.hf" in f.read()
    if not registers:
        pytest.xfail("gla/__init__.py does not import the Hugging Face adapter yet")
    make().save_pretrained(str(tmp_path))
    code = ("import gla, transformers; "
            f"m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}); "
            "assert type(m).__name__ == 'GLAForCausalLM'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)
    blocked = ("import sys; sys.modules['transformers'] = None; import gla; "
               "assert not any(k.startswith('transformers.') for k in sys.modules)")
    subprocess.run([sys.executable, "-c", blocked], cwd=REPO, check=True, capture_output=True)


def test_gate_bias_init_starts_fresh_models_and_leaves_loaded_ones(tmp_path):
    fresh = AutoModelForCausalLM.from_config(hf.GLALMConfig(vocab_size=101, d_model=48, n_heads=4, d_ff=96,
                                                            n_layers=2, gate_bias_init=2.0))
    for layer in fresh.model.layers:
        assert torch.equal(layer.attn.gk_proj[1].bias, torch.full((24,), 2.0))
    m = gla.GLATransformer(101, 48, 4, 96, 2, dropout=0.0, gate_bias_init=2.0).eval()
    with torch.no_grad():
        for layer in m.layers:
            layer.attn.gk_proj[1].bias.copy_(torch.randn(24))
    m.save_pretrained(str(tmp_path))
    h = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    for ours, theirs in zip(m.layers, h.model.layers):
        assert torch.equal(theirs.attn.gk_proj[1].bias, ours.attn.gk_proj[1].bias)
