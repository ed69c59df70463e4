"""The operators registered with torch.library pass ``torch.library.opcheck``: schema, fake (meta) implementation,
autograd registration and AOT dispatch with dynamic shapes.

CPU in CI: the chunk operators (gla::chunk_fwd / gla::chunk_bwd / gla::chunk_infer). ``GLA_TEST_GPU=1`` adds the
Triton operators on CUDA (their fake implementations come from tracing the launches, which the CPU interpreter
cannot do).
"""
import os

import pytest
import torch
import torch._dynamo
from torch.library import opcheck

import gla.ops  # noqa: F401  (registers the operators)
from tests.utils import gla_inputs

GPU = os.environ.get("GLA_TEST_GPU") == "1"
CASES = {"batch": (2, 70, 2, 16, 24, None), "varlen": (1, 150, 2, 16, 24, [0, 1, 1, 66, 150])}


def _args(case, device, dtype=torch.float32):
    B, T, H, K, V, cu = CASES[case]
    N = len(cu) - 1 if cu else None
    q, k, v, g, h0 = gla_inputs(B, T, H, K, V, state=True, N=N, device=device, dtype=dtype,
                                g_dtype=torch.float32, seed=3)
    return q, k, v, g, h0, torch.tensor(cu, device=device) if cu else None


@pytest.mark.parametrize("case", list(CASES))
def test_chunk_ops(case):
    from gla.ops.chunk import chunk_bwd_op, chunk_fwd_op, chunk_infer_op
    q, k, v, g, h0, cu = _args(case, "cpu")
    opcheck(chunk_fwd_op, (q, k, v, g, h0, cu, 0.25))
    opcheck(chunk_infer_op, tuple(x.detach() if x is not None else None for x in (q, k, v, g, h0, cu)) + (0.25,))
    opcheck(chunk_fwd_op, (q, k, v, g, None, cu, 0.25))
    _, final, h = chunk_fwd_op(q, k, v, g, h0, cu, 0.25)
    do, dfinal = torch.randn_like(v), torch.randn_like(final)
    x = [t.detach() for t in (q, k, v, g, h)]
    opcheck(chunk_bwd_op, (*x, do, dfinal, cu, 0.25))
    # strided inputs (a [B, H, T, D] layout seen as [B, T, H, D]): outputs are contiguous in fake and real alike
    strided = [t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, g)]
    h0_strided = h0.detach().transpose(-1, -2).contiguous().transpose(-1, -2)
    opcheck(chunk_fwd_op, (*strided, h0_strided, cu, 0.25))
    opcheck(chunk_bwd_op, (*strided, x[4], do, dfinal, cu, 0.25))


@pytest.mark.skipif(not GPU, reason="Triton operators: GLA_TEST_GPU=1 on a CUDA machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_ops(case, dtype):
    from gla.ops.triton.chunk import chunk_bwd_op, chunk_fwd_op
    from gla.ops.triton.decode import recurrent_step_inplace_op, recurrent_step_op
    q, k, v, g, h0, cu = _args(case, "cuda", dtype)
    opcheck(chunk_fwd_op, (q, k, v, g, h0, cu, 0.25, True, True))
    opcheck(chunk_fwd_op, (q, k, v, g, None, cu, 0.25, False, False))
    o, ht, A, hs, gc = chunk_fwd_op(q, k, v, g, h0, cu, 0.25, True, True)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    x = [t.detach() for t in (q, k, v, gc, A, hs)]
    opcheck(chunk_bwd_op, (*x[:4], do, dht, x[4], x[5], cu, 0.25, True, True, g.dtype))
    opcheck(chunk_bwd_op, (*x[:3], g.detach(), do, dht, x[4], x[5], cu, 0.25, True, False, g.dtype))
    step = [t[:, 0].detach().contiguous() for t in (q, k, v, g)]  # one token per row: [B, H, *]
    s = torch.randn(*step[0].shape[:2], 16, 24, device="cuda")
    opcheck(recurrent_step_op, (*step, s, 0.25))
    opcheck(recurrent_step_inplace_op, (*step, s.clone(), 0.25))


def test_operator_call_compiles_without_graph_break():
    """The public entry point with its default value checks traces under fullgraph=True (the checks that read values
    are skipped while tracing) and matches the eager call."""
    from gla.ops import gated_linear_attention
    q, k, v, g, h0, cu = _args("varlen", "cpu")

    def f(q, k, v, g, h0):
        o, s = gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        return o, s

    torch._dynamo.reset()
    out, ref = torch.compile(f, fullgraph=True)(q, k, v, g, h0), f(q, k, v, g, h0)
    for a, b in zip(out, ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
