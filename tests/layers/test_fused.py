"""Fused input projections for decoding (gla.layers.fused): the same step as the separate projections, for every
layer option that changes which projections exist; scoped to the context; refreshed after training."""
import pytest
import torch

from gla import GLATransformer
from gla.decoding import StaticDecoder
from gla.layers.fused import FusedProjections
from tests.utils import rel_err

OPTIONS = [{}, {"num_kv_heads": 1, "use_short_conv": True}, {"qkv_bias": True, "feature_map": "elu1"},
           {"output_gate": None, "mlp": "gelu"}, {"mixer": "retnet"}, {"mixer": "linear", "qk_norm": True}]


def model(**kw):
    torch.manual_seed(0)
    m = GLATransformer(61, 48, 2, 80, 2, dropout=0.0, **kw).eval()
    with torch.no_grad():  # biases start at zero: give them values, so that a dropped one would show
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return m


@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: ",".join(kw) or "default")
def test_fused_step_equals_separate_projections(kw):
    m = model(**kw)
    ids = torch.randint(0, 61, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, state = m(ids[:, :-1])
        want, want_state = m(ids[:, -1:], state)
        fused = FusedProjections(m)
        assert len(fused.fused) == 2 * (1 + (kw.get("mlp") != "gelu"))  # mixer (and SwiGLU) per layer
        with fused:
            got, got_state = m(ids[:, -1:], state)
            many, _ = m(ids[:, :5])  # several tokens per row go through it too
        assert all(mod.fused is None for mod, _ in fused.fused)  # gone after the context
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_state.layers[1].recurrent, want_state.layers[1].recurrent, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(many, m(ids[:, :5])[0], rtol=1e-5, atol=1e-5)


def test_padding_mask_takes_the_separate_path():
    """With an attention mask the gate projections read the masked input, the output gate the unmasked one: the
    fused matmul (one input) must not serve it."""
    m = model()
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        want, _ = m(ids, attention_mask=mask)
        with FusedProjections(m):
            got, _ = m(ids, attention_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_training_outside_the_context_reaches_every_parameter_and_the_decoder_follows():
    m = model()
    ids = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, state = m(ids)
    dec = StaticDecoder(m, state, capture=False)
    nxt = ids[:, -1]
    dec.step(nxt)
    m.train()
    loss, _ = m(ids[:, :-1], targets=ids[:, 1:], use_cache=False)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    with torch.no_grad():
        for p in m.parameters():
            p.sub_(0.1 * p.grad)
    m.eval()
    dec.reset(state)  # a new request: the decoder re-reads the trained weights
    with torch.no_grad():
        want, _ = m(nxt.unsqueeze(1), state)
    torch.testing.assert_close(dec.step(nxt), want[:, -1], rtol=1e-5, atol=1e-5)


def test_layers_with_adapters_keep_their_own_projections():
    """A LoRA-adapted projection adds its adapter's output to the layer's: a fused copy of the frozen weight would
    drop it, so such layers are not fused and decoding still equals the adapted model's forward."""
    pytest.importorskip("peft")
    from gla.distill.lora import add_lora
    m = model()
    add_lora(m, 2)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_()  # B starts at zero: make the adapters count
    fused = FusedProjections(m)
    assert [type(mod).__name__ for mod, _ in fused.fused] == ["MLP", "MLP"]
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, state = m(ids[:, :-1])
        want, _ = m(ids[:, -1:], state)
        with fused:
            got, _ = m(ids[:, -1:], state)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_decoder_is_rebuilt_when_adapters_replace_the_projections():
    """Decoding, then injecting LoRA: the next request gets a new decoder (the cached one fused the replaced
    projections), so the static path still equals the model's own steps."""
    pytest.importorskip("peft")
    import gla
    from gla.distill.lora import add_lora
    m = model()
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(5))
    gla.generate(m, ids, 4, temperature=0, cuda_graph=True)
    add_lora(m, 2)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_()
    m.eval()
    assert torch.equal(gla.generate(m, ids, 12, temperature=0, cuda_graph=True),
                       gla.generate(m, ids, 12, temperature=0, cuda_graph=False))


@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: ",".join(kw) or "default")
def test_training_forward_as_one_matmul_equals_separate_layers(kw, monkeypatch):
    """A CPU training forward runs each layer's input projections as one matmul of the concatenated weights, SwiGLU
    and the head norm x swish gate as fused operators: loss and every parameter's gradient equal those of the
    separate layers and torch's operators (those paths switched off)."""
    from gla.layers import fused
    from gla.ops import cpu_kernels
    m = model(**kw).train()
    ids = torch.randint(0, 61, (3, 9), generator=torch.Generator().manual_seed(4))
    calls, swiglu, gated = [], [], []
    real, real_swiglu, real_gated = fused.as_one, cpu_kernels.swiglu, cpu_kernels.gated_rms_norm
    monkeypatch.setattr(fused, "as_one", lambda x, lins: calls.append(len(lins)) or real(x, lins))
    monkeypatch.setattr(cpu_kernels, "swiglu", lambda y: swiglu.append(y.shape) or real_swiglu(y))
    monkeypatch.setattr(cpu_kernels, "gated_rms_norm", lambda *a: gated.append(1) or real_gated(*a))
    results = []
    for on in (True, False):
        if not on:
            monkeypatch.setattr(fused, "trains_as_one", lambda x, lins: False)
            monkeypatch.setattr(cpu_kernels, "trains_eagerly", lambda *xs: False)
        m.zero_grad()
        logits, _ = m(ids, use_cache=False)
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    assert calls  # the concatenated path served the first pass, SwiGLU on the joint output where compiled
    assert bool(swiglu) == (cpu_kernels.available() and "mlp" not in kw), (swiglu, kw)
    swish = kw.get("output_gate", "swish") == "swish" and kw.get("mixer") != "seed"
    assert bool(gated) == (cpu_kernels.available() and swish), (gated, kw)
    (want, want_g), (got, got_g) = results[1], results[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got_g.keys() == want_g.keys() and len(want_g) == sum(p.requires_grad for p in m.parameters())
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-4, atol=1e-6, msg=n)


def test_bf16_autocast_training_with_the_fused_cpu_operators_follows_torchs(monkeypatch):
    """Under CPU bf16 autocast (gla train's CPU default where bf16 matmuls are fast) the fused operators also take
    the norms of the float32 residual stream straight into bf16: the loss and every parameter's gradient stay
    within bf16 rounding of the same step through torch's operators."""
    from gla.layers import norm
    from gla.ops import cpu_kernels
    if not cpu_kernels.available():
        pytest.skip(cpu_kernels.status())
    m = model().train()
    ids = torch.randint(0, 61, (3, 70), generator=torch.Generator().manual_seed(5))
    calls = []
    real = cpu_kernels.rms_norm_bf16
    monkeypatch.setattr(cpu_kernels, "rms_norm_bf16", lambda *a: calls.append(1) or real(*a))
    results = []
    for on in (True, False):
        if not on:
            monkeypatch.setattr(cpu_kernels, "trains_eagerly", lambda *xs: False)
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, _ = m(ids, use_cache=False)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    assert len(calls) == 2 * 2 + 1  # each layer's two norms and the final one, in the fused pass only
    (loss_on, g_on), (loss_off, g_off) = results
    assert abs(loss_on - loss_off) <= 1e-4 * abs(loss_off)  # measured 7e-7; gradients 1e-2
    for n in g_off:
        assert rel_err(g_on[n], g_off[n]) <= 3e-2, (n, rel_err(g_on[n], g_off[n]))
