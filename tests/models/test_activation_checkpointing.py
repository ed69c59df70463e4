"""Activation checkpointing (GLATransformer.checkpoint_layers, gla train --checkpoint-activations): the same loss
and gradients as without, far fewer bytes kept for the backward, and it composes with compile_blocks."""
import copy

import pytest
import torch
import torch._dynamo
import torch._functorch.config

from gla import GLATransformer


def _model(**kw):
    torch.manual_seed(0)
    return GLATransformer(101, 64, 2, 128, 3, max_seq_len=128, **kw)


def _loss_grads(m, ids, y, cu=None):
    m.zero_grad()
    torch.manual_seed(1)  # the same dropout masks in both runs
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = m(ids, cu_seqlens=cu, use_cache=False, targets=y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}, sum(saved)


@pytest.mark.parametrize("kw,packed", [({"dropout": 0.0}, False), ({"attn_layers": (1,), "dropout": 0.0}, False),
                                       ({"use_short_conv": True, "dropout": 0.0}, True), ({"dropout": 0.1}, False)],
                         ids=["gla", "hybrid", "conv-packed", "dropout"])
def test_same_gradients_less_memory(kw, packed):
    m = _model(**kw).train()
    B, T = (1, 90) if packed else (2, 45)
    ids, y = torch.randint(0, 101, (B, T)), torch.randint(0, 101, (B, T))
    cu = torch.tensor([0, 30, 31, 90]) if packed else None
    ref = _loss_grads(m, ids, y, cu)
    m.checkpoint_layers = True
    out = _loss_grads(m, ids, y, cu)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-6, atol=0)
    for name, g in ref[1].items():
        torch.testing.assert_close(out[1][name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert out[2] < 0.5 * ref[2], (out[2], ref[2])  # bytes saved for the backward


def test_no_recompute_outside_training_and_with_compiled_blocks(monkeypatch):
    import torch.utils.checkpoint as ckpt
    calls = []
    real = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = _model(dropout=0.0)  # compiled code draws dropout masks from another generator than eager
    ids, y = torch.randint(0, 101, (2, 33)), torch.randint(0, 101, (2, 33))
    ref = _loss_grads(m, ids, y)
    c = copy.deepcopy(m)
    c.checkpoint_layers = True
    c.compile_blocks()
    out = _loss_grads(c, ids, y)
    assert len(calls) == len(c.layers)  # every compiled layer ran inside a checkpoint
    assert out[2] < 0.5 * ref[2], (out[2], ref[2])
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=0)
    for name, g in ref[1].items():
        assert (out[1][name] - g).abs().max() <= 1e-4 * g.abs().max(), name
    calls.clear()
    with torch.no_grad():  # inference and cached decoding run the layers directly
        logits, state = c(ids)
    assert not calls and state is not None and torch.isfinite(logits).all()


def test_compiled_layers_recompute_elementwise_results():
    """Under ``partitioning()`` (how gla train and gla bench train run compiled layers) the compiled layers keep fewer
    bytes for the backward than under torch's default partitioner, for the same loss and gradients."""
    from gla.models.transformer import partitioning
    m = _model(dropout=0.0)
    ids, y = torch.randint(0, 101, (2, 33)), torch.randint(0, 101, (2, 33))
    runs = {}
    for name, ctx in (("default", torch._functorch.config.patch(activation_memory_budget=1.0)),
                      ("ours", partitioning())):
        torch._dynamo.reset()  # partition afresh under this setting
        c = copy.deepcopy(m).compile_blocks()
        with ctx:
            runs[name] = _loss_grads(c, ids, y)
    (loss, grads, kept), (loss_d, grads_d, kept_d) = runs["ours"], runs["default"]
    assert kept < 0.85 * kept_d, (kept, kept_d)
    torch.testing.assert_close(loss, loss_d, rtol=1e-6, atol=0)
    for name, g in grads_d.items():
        assert (grads[name] - g).abs().max() <= 1e-5 * g.abs().max(), name
