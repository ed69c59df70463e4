"""CUDA-graph capture (GPU only, ``GLA_TEST_GPU=1``): the decode step and a training forward+backward, captured once
with ``torch.cuda.graph`` and replayed on new inputs, give the eager results. Capture fails on any host
synchronisation (a value read back, a data-dependent shape), so these also show that the paths have none.
"""
import os

import pytest
import torch

if os.environ.get("GLA_TEST_GPU") != "1" or not torch.cuda.is_available():  # before triton is imported
    pytest.skip("CUDA graphs: GLA_TEST_GPU=1 on a CUDA machine", allow_module_level=True)

from gla import GLATransformer  # noqa: E402
from gla.models.state import map_tensors  # noqa: E402
from gla.ops import gated_linear_attention  # noqa: E402
from gla.ops.triton import triton_recurrent_step  # noqa: E402
from tests.utils import gla_inputs, rel_err  # noqa: E402


def _capture(fn):
    """Warm ``fn`` up on a side stream (as capture requires), then capture it; returns (graph, its outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def test_decode_step_in_place():
    B, H, K, V = 4, 3, 60, 100
    q, k, v, g = (torch.randn(B, H, D, device="cuda") for D in (K, K, V, K))
    g = torch.nn.functional.logsigmoid(g) / 16
    state = torch.randn(B, H, K, V, device="cuda")
    ref = state.clone()
    graph, o = _capture(lambda: triton_recurrent_step(q, k, v, g, state, K ** -0.5, inplace=True)[0])
    state.copy_(ref)
    for _ in range(3):  # new token inputs each step, the state carried in place
        for x in (q, k, v):
            x.copy_(torch.randn_like(x))
        graph.replay()
        o_ref, ref = triton_recurrent_step(q, k, v, g, ref, K ** -0.5)
        assert rel_err(o, o_ref) < 1e-6 and rel_err(state, ref) < 1e-6


@pytest.mark.parametrize("cu", [None, [0, 1, 1, 200, 333]], ids=["batch", "varlen"])
def test_operator_forward_backward(cu):
    B, T, H, K, V = (2, 333, 2, 64, 128) if cu is None else (1, 333, 2, 64, 128)
    cu_seqlens = torch.tensor(cu, device="cuda") if cu else None
    q, k, v, g, h0 = gla_inputs(B, T, H, K, V, dtype=torch.bfloat16, g_dtype=torch.float32, state=True,
                                N=len(cu) - 1 if cu else None, device="cuda")
    do, dht = torch.randn_like(v), torch.randn_like(h0)

    def step():
        o, ht = gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True,
                                       cu_seqlens=cu_seqlens, check_values=False)
        return (o, ht, *torch.autograd.grad((o.float() * do).sum() + (ht * dht).sum(), (q, k, v, g, h0)))

    graph, outs = _capture(step)
    for seed in range(2):  # fresh inputs copied into the captured buffers
        torch.manual_seed(seed)
        for x in (q, k, v, do):
            x.data.copy_(torch.randn_like(x))
        graph.replay()
        for a, b in zip(outs, step()):
            assert rel_err(a, b) < 1e-6


def test_model_training_step():
    torch.manual_seed(0)
    model = GLATransformer(101, 64, 2, 128, 2, dropout=0.0, attn_layers=(1,)).cuda()
    ids = torch.randint(0, 101, (2, 70), device="cuda")

    def step():
        logits, _ = model(ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return (loss, *grads)

    graph, outs = _capture(step)
    for _ in range(2):
        ids.copy_(torch.randint(0, 101, ids.shape, device="cuda"))
        graph.replay()
        for a, b in zip(outs, step()):
            assert rel_err(a, b) < 1e-5


def test_model_decode_step():
    """A GLA-only model's one-token step with its state in static buffers, copied back after each replay."""
    torch.manual_seed(0)
    model = GLATransformer(101, 64, 2, 128, 2, dropout=0.0).cuda().eval()
    with torch.no_grad():
        _, state = model(torch.randint(0, 101, (3, 20), device="cuda"))
        ref_state = map_tensors(torch.clone, state)
        tok = torch.randint(0, 101, (3, 1), device="cuda")
        graph, (logits, new_state) = _capture(lambda: model(tok, state))
        for _ in range(3):
            tok.copy_(torch.randint(0, 101, tok.shape, device="cuda"))
            graph.replay()
            ref_logits, ref_state = model(tok, ref_state)
            assert rel_err(logits, ref_logits) < 1e-5
            for new, static in zip(_tensors(new_state), _tensors(state)):
                static.copy_(new)


def _tensors(state):
    out = []
    map_tensors(lambda t: out.append(t), state)
    return out
