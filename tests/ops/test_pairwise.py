"""The pairwise backend (one block in plain tensor ops, what ``gla export`` traces) against the recurrent reference:
output, final state and the gradients of q, k, v, g and the initial state."""
import pytest
import torch

from gla.ops import gated_linear_attention
from tests.utils import compare_to_reference, gla_inputs


@pytest.mark.parametrize("B,T,H,K,V,norm", [(2, 1, 2, 60, 100, 16.0), (1, 63, 2, 60, 100, 16.0),
                                            (3, 64, 1, 32, 16, 0.1), (1, 130, 2, 16, 24, 1.0)])
@pytest.mark.parametrize("state", [True, False], ids=["h0", "no-h0"])
def test_pairwise_matches_the_reference(B, T, H, K, V, norm, state):
    q, k, v, g, h0 = gla_inputs(B, T, H, K, V, normalizer=norm, state=state, seed=T + K)
    errs = compare_to_reference(q, k, v, g, h0, backend="pairwise")
    assert all(e <= 1e-5 for n, e in errs.items() if n in ("o", "state")), errs
    assert all(e <= 1e-4 for e in errs.values()), errs


@pytest.mark.parametrize("T", [1, 5])
def test_pairwise_output_keeps_the_value_dtype(T):
    q, k, v, g, _ = gla_inputs(2, T, 2, 8, 12, dtype=torch.bfloat16, g_dtype=torch.float32)
    o, s = gated_linear_attention(q, k, v, g, output_final_state=True, backend="pairwise")
    ref, _ = gated_linear_attention(q, k, v, g, backend="recurrent")
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert torch.allclose(o.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_pairwise_refuses_packed_sequences():
    q, k, v, g, _ = gla_inputs(1, 10, 1, 8, 8)
    with pytest.raises(ValueError, match="cu_seqlens"):
        gated_linear_attention(q, k, v, g, cu_seqlens=torch.tensor([0, 4, 10]), backend="pairwise")


def test_pairwise_exports_without_data_dependent_branches():
    """torch.export with a dynamic block length: the traced program equals eager on new lengths and new gates."""
    def f(q, k, v, g, h0):
        return gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, backend="pairwise",
                                      check_values=False)

    args = [x.detach() for x in gla_inputs(2, 9, 2, 8, 12, state=True)]
    T = torch.export.Dim("T", min=2, max=64)
    class M(torch.nn.Module):
        def forward(self, q, k, v, g, h0):
            return f(q, k, v, g, h0)

    ep = torch.export.export(M(), tuple(args), dynamic_shapes=({1: T}, {1: T}, {1: T}, {1: T}, None))
    for T_new, norm in ((33, 0.1), (64, 16.0)):
        new = [x.detach() for x in gla_inputs(2, T_new, 2, 8, 12, normalizer=norm, state=True, seed=T_new)]
        for a, b in zip(ep.module()(*new), f(*new)):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
