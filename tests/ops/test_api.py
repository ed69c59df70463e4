"""The operator's contract: validation errors, backend choice, the recurrent reference and decode step."""
import pytest
import torch

import gla.ops as ops
from gla.ops import decode_step_, gated_linear_attention, recurrent_step
from tests.utils import assert_autocast_exact, gla_inputs, rel_err


def inputs(B=1, T=8, H=2, K=4, V=6, **kw):
    return gla_inputs(B, T, H, K, V, requires_grad=False, **kw)[:4]


def bad(match, *args, **kw):
    with pytest.raises(ValueError, match=match):
        gated_linear_attention(*args, **kw)


@pytest.mark.parametrize("value", [0.5, float("nan"), float("inf"), float("-inf")])
def test_rejects_bad_gates(value):
    q, k, v, g = inputs()
    g[0, 3, 1, 2] = value
    bad("g", q, k, v, g)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.5", True])
def test_rejects_a_scale_that_is_not_a_finite_number(scale):
    bad("scale", *inputs(), scale=scale)


def test_rejects_shape_mismatch():
    q, k, v, g = inputs()
    bad("k must have", q, k[:, :, :, :3], v, g)
    bad("g must have", q, k, v, g[:, :7])
    bad("v must be", q, k, v[:, :7], g)
    bad("q must be 4-D", q[0], k, v, g)


def test_rejects_dtype_and_device_mismatch():
    q, k, v, g = inputs()
    bad("k has dtype", q, k.double(), v, g)
    bad("v has dtype", q, k, v.half(), g)
    bad("must be a floating-point", q, k, v, g.long())
    bad("k is on meta", q, k.to("meta"), v, g)


def test_rejects_malformed_cu_seqlens():
    q, k, v, g = inputs()
    bad("non-decreasing", q, k, v, g, cu_seqlens=torch.tensor([0, 5, 3, 8]))
    bad("end at", q, k, v, g, cu_seqlens=torch.tensor([0, 5, 7]))
    bad("start at 0", q, k, v, g, cu_seqlens=torch.tensor([1, 5, 8]))
    bad("int32 or int64", q, k, v, g, cu_seqlens=torch.tensor([0.0, 8.0]))
    bad("1-D", q, k, v, g, cu_seqlens=torch.tensor([[0, 8]]))
    q2, k2, v2, g2 = inputs(B=2)
    bad("B == 1", q2, k2, v2, g2, cu_seqlens=torch.tensor([0, 8]))


def test_check_values_false_skips_only_the_value_checks():
    """For callers that build g themselves: no value reads (host syncs), but shapes and layout are still checked."""
    q, k, v, g = inputs()
    o, _ = gated_linear_attention(q, k, v, g.abs(), check_values=False)  # positive g: the caller's responsibility
    assert o.shape == v.shape
    with pytest.raises(ValueError, match="k must have"):
        gated_linear_attention(q, k[..., :3], v, g, check_values=False)
    with pytest.raises(ValueError, match="1-D"):
        gated_linear_attention(q, k, v, g, cu_seqlens=torch.tensor([[0, 8]]), check_values=False)


def test_rejects_wrong_initial_state():
    q, k, v, g = inputs(B=2)
    bad("initial_state must have shape", q, k, v, g, initial_state=torch.zeros(1, 2, 4, 6))
    bad("initial_state must have shape", q, k, v, g, initial_state=torch.zeros(2, 2, 6, 4))
    q, k, v, g = inputs()
    bad("initial_state must have shape", q, k, v, g, initial_state=torch.zeros(1, 2, 4, 6),
        cu_seqlens=torch.tensor([0, 3, 8]))


def test_rejects_unknown_backend():
    bad("backend", *inputs(), backend="fast")


@pytest.mark.parametrize("version,message", [(None, "not installed"), ("3.5.1", "3.5.1 is not supported"),
                                             ("3.10.0", "3.10.0 is not supported")])
def test_unusable_triton_is_a_clear_error(monkeypatch, version, message):
    """A missing or unsupported Triton: one line naming what to install, before any kernel runs."""
    import sys
    import types
    fake = None if version is None else types.SimpleNamespace(__version__=version)
    monkeypatch.setitem(sys.modules, "triton", fake)
    monkeypatch.setattr(ops, "_TRITON_STATUS", [])
    with pytest.raises(RuntimeError, match=message) as e:
        gated_linear_attention(*inputs(), backend="triton")
    assert 'pip install' in str(e.value) and "triton>=3.6,<3.10" in str(e.value)


def test_auto_backend_choice(monkeypatch):
    calls = []
    import gla.ops.chunk as chunk
    real = chunk.chunk_gla
    monkeypatch.setattr(chunk, "chunk_gla", lambda *a: calls.append("chunk") or real(*a))
    gated_linear_attention(*inputs(T=5))
    assert calls == ["chunk"]  # CPU tensors, several tokens
    gated_linear_attention(*inputs(T=1))
    assert calls == ["chunk"]  # one token: the recurrent step


def test_empty_time_axis():
    q, k, v, g = inputs(T=0)
    h0 = torch.randn(1, 2, 4, 6)
    for backend in ("chunk", "recurrent", "pairwise"):
        o, s = gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, backend=backend)
        assert o.shape == (1, 0, 2, 6) and torch.equal(s, h0)
        assert s.data_ptr() != h0.data_ptr(), backend  # a new tensor: changing it must not change the caller's


def test_recurrent_step_matches_sequence():
    q, k, v, g, h0 = gla_inputs(3, 5, 2, 4, 6, state=True, requires_grad=False)
    o_ref, s_ref = gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True,
                                          backend="recurrent")
    s = h0
    for t in range(5):
        o_t, s = recurrent_step(q[:, t], k[:, t], v[:, t], g[:, t], s, 4 ** -0.5)
        assert rel_err(o_t, o_ref[:, t]) < 1e-6
    assert rel_err(s, s_ref) < 1e-6


def test_decode_step_updates_the_state_in_place():
    """decode_step_ writes recurrent_step's new state over the given one (same storage, same values to the bit) and
    returns its output; malformed input is refused before anything is written."""
    q, k, v, g, h0 = gla_inputs(3, 1, 2, 60, 100, state=True, requires_grad=False)
    q, k, v, g = (x[:, 0] for x in (q, k, v, g))
    o_ref, s_ref = recurrent_step(q, k, v, g, h0, 0.3)
    state = h0.clone()
    ptr = state.data_ptr()
    o = decode_step_(q, k, v, g, state, 0.3)
    assert state.data_ptr() == ptr and torch.equal(state, s_ref) and torch.equal(o, o_ref)
    assert torch.equal(decode_step_(q, k, v, g, h0.clone()), recurrent_step(q, k, v, g, h0, 60 ** -0.5)[0])
    # 16-bit q, k, v beside the fp32 gate and state (a bf16 model), and float64 throughout
    low = [x.to(torch.bfloat16) for x in (q, k, v)]
    state = h0.clone()
    o = decode_step_(*low, g, state, 0.3)
    o_ref, s_ref = recurrent_step(*low, g, h0, 0.3)
    assert o.dtype == torch.bfloat16 and torch.equal(state, s_ref) and torch.equal(o, o_ref.to(torch.bfloat16))
    state = h0.double()
    o_ref, s_ref = recurrent_step(*(x.double() for x in (q, k, v, g)), state, 0.3)
    o = decode_step_(*(x.double() for x in (q, k, v, g)), state, 0.3)
    assert o.dtype == torch.float64 and torch.equal(state, s_ref) and torch.equal(o, o_ref)
    for bad, match in (((q, k, v, g, h0.transpose(-1, -2).contiguous()), "contiguous float32"),
                       ((q, k, v, g, h0.to(torch.bfloat16)), "contiguous float32"),
                       ((q, k, v, g, h0.transpose(-1, -2)), "contiguous float32"),
                       ((q, k[:, :1], v, g, h0), r"q, k, g \[B, H, K\]"),
                       ((q[:, None], k, v, g, h0), r"q, k, g \[B, H, K\], v \[B, H, V\]"),
                       ((q.long(), k, v, g, h0), "floating-point")):
        before = bad[-1].clone()
        with pytest.raises(ValueError, match=match):
            decode_step_(*bad)
        assert torch.equal(bad[-1], before)


def test_recurrent_matches_naive_formula():
    # Independent check of the reference itself: o_t = s Σ_{j<=t} (q_t ⊙ Π_{j<m<=t} α_m) · k_j v_j.
    q, k, v, g = (x.double() for x in inputs(T=6, H=1))
    o, _ = gated_linear_attention(q, k, v, g, backend="recurrent")
    b = g[0, :, 0].cumsum(0)  # [T, K]
    naive = torch.stack([sum(((q[0, t, 0] * k[0, j, 0] * (b[t] - b[j]).exp()).sum() * v[0, j, 0])
                             for j in range(t + 1)) for t in range(6)]) * 0.5
    assert rel_err(o[0, :, 0], naive) < 1e-12


@pytest.mark.parametrize("backend", ["recurrent", "chunk"])
def test_autocast_leaves_the_operator_alone(backend):
    """A forward under bf16 autocast computes exactly as outside it: fp32 inputs stay fp32 inside (the chunk
    backend's products once ran in bf16 there, and its backward then failed on the mixed dtypes). The chunk
    backend's autograd Function also shields its backward when that runs under autocast (the recurrent reference is
    plain autograd: its backward follows PyTorch's rule, backward outside autocast)."""
    q, k, v, g, h0 = gla_inputs(2, 70, 2, 12, 20, state=True, seed=4)
    assert_autocast_exact(q, k, v, g, h0, backend=backend,
                          variants=[(True, False)] + ([(True, True)] if backend == "chunk" else []))
