"""The compiled CPU operators (gla/ops/csrc) against the float64 recurrent reference: outputs, final states and the
gradients of q, k, v, g and the initial state; against the PyTorch chunk path on the same inputs; their build,
their fallback and their errors."""
import os
import platform
import shutil
import sys

import pytest
import torch

from gla.ops import cpu_kernels, gated_linear_attention
from gla.ops.chunk import chunk_fwd_op, chunk_infer_op
from tests.utils import compare_to_reference, gla_inputs, rel_err

FWD_TOL, GRAD_TOL = 1e-5, 1e-4  # fp32, relative to a float64 reference: the PyTorch path's tolerances


@pytest.fixture(autouse=True)
def compiled():
    """CI has a compiler on Linux: there the kernels must build, or every test below would test the fallback."""
    if sys.platform == "linux" and platform.machine() == "x86_64" and shutil.which("c++"):
        assert cpu_kernels.available(), cpu_kernels.status()
    if not cpu_kernels.available():
        pytest.skip(f"compiled CPU kernels unavailable here: {cpu_kernels.status()}")


def _count_calls(monkeypatch, name="chunk_forward"):
    calls = []
    real = getattr(cpu_kernels, name)
    monkeypatch.setattr(cpu_kernels, name, lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    return calls


def assert_close(errs):
    bad = {n: e for n, e in errs.items() if e > (FWD_TOL if n in ("o", "state") else GRAD_TOL)}
    assert not bad, f"relative errors above tolerance: {bad} (all: {errs})"


@pytest.mark.parametrize("B,T,H,K,V", [(2, 1, 2, 60, 100), (1, 63, 2, 60, 100), (2, 130, 3, 16, 20),
                                       (1, 1000, 1, 32, 48)])
@pytest.mark.parametrize("normalizer", [16.0, 1.0, 0.1])  # weak, medium, strong gates (log-space chunks)
def test_training_step_matches_reference(B, T, H, K, V, normalizer, monkeypatch):
    calls, backward_calls = _count_calls(monkeypatch), _count_calls(monkeypatch, "chunk_backward")
    q, k, v, g, h0 = gla_inputs(B, T, H, K, V, normalizer=normalizer, state=True, seed=T + K)
    assert_close(compare_to_reference(q, k, v, g, h0, backend="chunk"))
    assert calls and calls[0]["state_rows"] == B * -(-T // 64) and backward_calls


@pytest.mark.parametrize("huge", [-1e4, -3e38])
def test_huge_finite_gates_match_reference(huge, monkeypatch):
    """The compiled operators get the floored gate too (gla.ops.G_FLOOR): gates far below any real one, two of them
    in a row (their float32 sum overflows), give the reference's outputs, final state and gradients."""
    calls, backward_calls = _count_calls(monkeypatch), _count_calls(monkeypatch, "chunk_backward")
    q, k, v, g, h0 = gla_inputs(1, 90, 2, 12, 20, state=True, seed=7)
    with torch.no_grad():
        g[0, 20, 0, :5] = huge
        g[0, 21:23, 1, :] = huge
    assert_close(compare_to_reference(q, k, v, g, h0, backend="chunk"))
    assert calls and backward_calls


@pytest.mark.parametrize("through", ["final state", "output"])
def test_eager_training_call_matches_reference(through, monkeypatch):
    """An eager training call takes ``EagerChunk`` (no torch.library dispatch): gradients through the final state
    alone (the output unused: no output gradient reaches the backward) or through the output of bfloat16 q, k, v
    (cast in, gradients cast back), against the float64 recurrent reference."""
    calls = _count_calls(monkeypatch, "chunk_backward")
    eager = []
    real = cpu_kernels.EagerChunk.apply
    monkeypatch.setattr(cpu_kernels.EagerChunk, "apply", lambda *a: eager.append(1) or real(*a))
    dtype = torch.bfloat16 if through == "output" else torch.float32
    q, k, v, g, h0 = gla_inputs(2, 100, 2, 20, 36, normalizer=1.0, state=True, seed=5)
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    o, s = gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, backend="chunk")
    leaves = [q, k, v, g, h0]
    loss = (s * torch.randn(s.shape, generator=torch.Generator().manual_seed(1))).sum() if through == "final state" \
        else (o.float() * torch.randn(o.shape, generator=torch.Generator().manual_seed(1))).sum()
    grads = torch.autograd.grad(loss, leaves)
    ref = [x.detach().double().requires_grad_() for x in leaves]
    o_r, s_r = gated_linear_attention(*ref[:4], initial_state=ref[4], output_final_state=True, backend="recurrent")
    loss_r = (s_r * torch.randn(s.shape, generator=torch.Generator().manual_seed(1)).double()).sum() \
        if through == "final state" else \
        (o_r * torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).double()).sum()
    # the final state does not depend on q: the reference leaves dq out, ours must be zero (rel_err 0 then)
    grads_r = [torch.zeros_like(x) if d is None else d for x, d in
               zip(ref, torch.autograd.grad(loss_r, ref, allow_unused=True))]
    assert eager and calls and o.dtype == dtype
    assert [x.dtype for x in grads] == [x.dtype for x in leaves]
    tol = GRAD_TOL if dtype == torch.float32 else 1e-2  # bf16 inputs: the gradients are rounded to bf16
    errs = {n: rel_err(a, b) for n, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), grads, grads_r)}
    assert all(e <= tol for e in errs.values()), errs


def test_empty_and_broadcast_inputs_in_training():
    """T = 0 (the final state is h0, its gradient passes through) and a broadcast gate (fixed decay: stride-0 rows,
    read in place) through the eager training call, against the float64 reference."""
    q, k, v, g, h0 = gla_inputs(2, 0, 2, 8, 12, state=True)
    o, s = gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, backend="chunk")
    ds = torch.randn(s.shape, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad((s * ds).sum(), (q, h0))
    assert o.shape == (2, 0, 2, 12) and torch.equal(s, h0) and grads[0].shape == q.shape and torch.equal(grads[1], ds)
    q, k, v, _, h0 = gla_inputs(2, 70, 2, 8, 12, state=True, seed=3)
    base = torch.nn.functional.logsigmoid(torch.randn(1, 1, 2, 8, generator=torch.Generator().manual_seed(1)))
    base.requires_grad_()
    assert_close(compare_to_reference(q, k, v, base.expand(2, 70, 2, 8), h0, backend="chunk"))


@pytest.mark.parametrize("strong", [1.0, 2.5, 3.0, 8.0, "mixed"])
def test_a_few_strong_channels_match_reference(strong, monkeypatch):
    """A trained model's gates: most channels weak, a few forgetting fast (log-decay -strong per token). One such
    channel makes a whole chunk too steep to factor; its row blocks of 16 tokens then decay by about 16, 40 or 48
    (factored; at 3.0 also the last chunk's 22 tokens, a block of 6 included) or 128 (their own pairs in log space)
    on that channel. "mixed": -8 for the first 40 tokens, -1 after (factored and log-space blocks in one chunk)."""
    calls = _count_calls(monkeypatch, "chunk_backward")
    q, k, v, g, h0 = gla_inputs(2, 150, 2, 20, 36, normalizer=16.0, state=True, seed=11)
    jitter = 1 + 0.1 * torch.rand(g[..., :3].shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        if strong == "mixed":
            g[..., :3] = -jitter
            g[:, :40, :, :3] *= 8
        else:
            g[..., :3] = -strong * jitter
    assert_close(compare_to_reference(q, k, v, g, h0, backend="chunk"))
    assert calls


@pytest.mark.parametrize("normalizer", [16.0, 0.1])
def test_varlen_matches_reference(normalizer, monkeypatch):
    calls = _count_calls(monkeypatch, "chunk_backward")
    cu = torch.tensor([0, 5, 5, 70, 200, 201, 329], dtype=torch.int32)  # includes an empty sequence
    q, k, v, g, h0 = gla_inputs(1, 329, 2, 24, 40, normalizer=normalizer, state=True, N=6)
    assert_close(compare_to_reference(q, k, v, g, h0, backend="chunk", cu_seqlens=cu))
    assert calls


@pytest.mark.parametrize("B,T,H,K,V", [(3, 1000, 2, 60, 100), (1, 4096, 1, 128, 256)])
@pytest.mark.parametrize("normalizer", [16.0, 0.1])
def test_inference_forward_matches_reference(B, T, H, K, V, normalizer, monkeypatch):
    calls = _count_calls(monkeypatch)
    q, k, v, g, h0 = gla_inputs(B, T, H, K, V, normalizer=normalizer, state=True, requires_grad=False, seed=B)
    o, s = gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, backend="chunk")
    o_r, s_r = gated_linear_attention(*(x.double() for x in (q, k, v, g)), initial_state=h0.double(),
                                      output_final_state=True, backend="recurrent")
    assert calls and calls[0].get("state_rows", 0) == 0  # the inference operator keeps no per-chunk states
    assert rel_err(o, o_r) <= FWD_TOL and rel_err(s, s_r) <= FWD_TOL


def test_equals_the_pytorch_path(monkeypatch):
    """Same inputs, both forwards: outputs, final states and per-chunk states agree (varlen, an initial state)."""
    cu = torch.tensor([0, 64, 64, 100, 229])
    q, k, v, g, h0 = gla_inputs(1, 229, 2, 20, 30, state=True, N=4, requires_grad=False)
    ours = chunk_fwd_op(q, k, v, g, h0, cu, 0.3)
    monkeypatch.setattr(cpu_kernels, "serves", lambda *t: False)
    theirs = chunk_fwd_op(q, k, v, g, h0, cu, 0.3)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_err(a, b) <= FWD_TOL
    assert not ours[2][-1].any()  # the state buffer's spare row (T // 64 + N rows for 4 chunks) stays zero


@pytest.mark.parametrize("grads", ["output", "final state", "both"])
def test_backward_equals_the_pytorch_path(grads, monkeypatch):
    """Gradients through o only, through the final states only (do is None), or both; varlen with an empty
    sequence, an initial state, strong gates in some chunks."""
    from gla.ops.chunk import chunk_bwd_op
    cu = torch.tensor([0, 64, 64, 100, 229])
    q, k, v, g, h0 = gla_inputs(1, 229, 2, 20, 30, normalizer=0.3, state=True, N=4, requires_grad=False, seed=7)
    _, _, hs = chunk_fwd_op(q, k, v, g, h0, cu, 0.3)
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(v.shape, generator=gen) if grads != "final state" else None
    dfinal = torch.randn(h0.shape, generator=gen) if grads != "output" else None
    ours = chunk_bwd_op(q, k, v, g, hs, do, dfinal, cu, 0.3)
    monkeypatch.setattr(cpu_kernels, "serves", lambda *t: False)
    theirs = chunk_bwd_op(q, k, v, g, hs, do, dfinal, cu, 0.3)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_err(a, b) <= GRAD_TOL, (name, rel_err(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_strided_and_low_precision_inputs_read_in_place(dtype):
    """Inputs as a model passes them (q, k, v slices of one projection's output, in its dtype; g float32) give what
    their float32 contiguous copies give, forward and backward, outputs and gradients in the inputs' dtypes; with
    varlen (an empty sequence) and value columns split over threads."""
    gen = torch.Generator().manual_seed(9)
    B, T, H, K, V = 1, 229, 2, 20, 30
    joint = torch.randn(B, T, H * (2 * K + V) + 7, generator=gen).to(dtype)
    q, k, v = (x.view(B, T, H, -1) for x in joint[..., :-7].split([H * K, H * K, H * V], -1))
    g = -torch.rand(B, T, H, K, generator=gen) / 4
    do = torch.randn(B, T, H, V, generator=gen).to(dtype)
    cu = torch.tensor([0, 64, 64, 100, 229])
    h0 = torch.randn(4, H, K, V, generator=gen)
    dfinal = torch.randn(4, H, K, V, generator=gen)
    f32 = [x.float().contiguous() for x in (q, k, v, g)]
    ours = cpu_kernels.chunk_forward(q, k, v, g, h0, cu, 0.3, state_rows=8)
    want = cpu_kernels.chunk_forward(*f32, h0, cu, 0.3, state_rows=8)
    tol = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}  # one rounding to the dtype
    assert ours[0].dtype == dtype and ours[1].dtype == ours[2].dtype == torch.float32
    assert rel_err(ours[0], want[0]) <= tol[dtype] and rel_err(ours[1], want[1]) <= 1e-6
    assert rel_err(ours[2], want[2]) <= 1e-6
    grads = cpu_kernels.chunk_backward(q, k, v, g, do, ours[2], dfinal, cu, 0.3)
    want_g = cpu_kernels.chunk_backward(*f32, do.float(), want[2], dfinal, cu, 0.3)
    for name, a, b, x in zip(("dq", "dk", "dv", "dg", "dh0"), grads, want_g, (q, k, v, g, h0)):
        assert a.dtype == x.dtype and a.is_contiguous(), name
        assert rel_err(a, b) <= tol[a.dtype], (name, rel_err(a, b))


def test_low_precision_inputs_keep_a_float32_state():
    q, k, v, g, h0 = gla_inputs(2, 200, 2, 32, 48, state=True, requires_grad=False, dtype=torch.bfloat16)
    o, s = chunk_infer_op(q, k, v, g, h0, None, 0.2)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o_r, s_r = gated_linear_attention(*(x.double() for x in (q, k, v, g)), initial_state=h0.double(), scale=0.2,
                                      output_final_state=True, backend="recurrent")
    assert rel_err(o, o_r) <= 4e-3 and rel_err(s, s_r) <= 1e-5


def test_float64_keeps_the_pytorch_path(monkeypatch):
    calls = _count_calls(monkeypatch)
    q, k, v, g, h0 = gla_inputs(1, 100, 1, 8, 8, state=True, requires_grad=False, dtype=torch.float64)
    _, s = chunk_infer_op(q, k, v, g, h0, None, 0.5)
    assert not calls and s.dtype == torch.float64


@pytest.mark.parametrize("case,match", [
    ("dtype", "float32, bfloat16 or float16"), ("strides", "contiguous last dim"), ("shapes", "must agree"),
    ("cu_start", "start at 0"), ("cu_order", "rise from 0"), ("cu_batch", "B == 1"), ("h0", "h0 must be"),
    ("rows", "state_rows"),
])
def test_bad_input_gets_a_clear_error(case, match):
    q, k, v, g, _ = gla_inputs(1, 70, 2, 8, 12, requires_grad=False)
    h0, cu, rows = None, None, 0
    if case == "dtype":
        q = q.double()
    elif case == "strides":
        q = q.transpose(2, 3).contiguous().transpose(2, 3)
    elif case == "shapes":
        v = v[:, :69]
    elif case == "cu_start":
        cu = torch.tensor([1, 70])
    elif case == "cu_order":
        cu = torch.tensor([0, 50, 20, 70])
    elif case == "cu_batch":
        q, k, v, g = (torch.cat([x, x]) for x in (q, k, v, g))
        cu = torch.tensor([0, 70])
    elif case == "h0":
        h0 = torch.zeros(1, 2, 8, 13)
    elif case == "rows":
        rows = 1  # two chunks need two rows
    with pytest.raises(RuntimeError, match=match):
        torch.ops.gla_cpu.chunk_forward(q, k, v, g, h0, cu, 0.5, rows)
    if case not in ("h0", "rows"):  # the backward checks the same inputs the same way
        hs = torch.zeros(2, 2, 8, 12)
        with pytest.raises(RuntimeError, match=match):
            torch.ops.gla_cpu.chunk_backward(q, k, v, g, torch.zeros_like(v), hs, None, cu, 0.5)


def test_backward_rejects_states_that_do_not_fit():
    q, k, v, g, _ = gla_inputs(1, 70, 2, 8, 12, requires_grad=False)
    with pytest.raises(RuntimeError, match="hs must be"):
        torch.ops.gla_cpu.chunk_backward(q, k, v, g, torch.zeros_like(v), torch.zeros(1, 2, 8, 12), None, None, 0.5)
    with pytest.raises(RuntimeError, match="dfinal must be"):
        torch.ops.gla_cpu.chunk_backward(q, k, v, g, torch.zeros_like(v), torch.zeros(2, 2, 8, 12),
                                         torch.zeros(1, 2, 8, 13), None, 0.5)


def test_switched_off_or_unbuildable_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("GLA_CPU_KERNELS", "0")
    assert cpu_kernels._load() == (False, "disabled by GLA_CPU_KERNELS=0")
    monkeypatch.setenv("GLA_CPU_KERNELS", "1")
    monkeypatch.setenv("GLA_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    ok, why = cpu_kernels._load()
    assert not ok and "could not build" in why
    assert not any(p.is_file() for p in tmp_path.rglob("*")), "a failed build left files behind"


def test_build_is_cached_by_machine_and_source(monkeypatch, tmp_path):
    """A second process with the same torch, compiler and CPU loads the library the first one built."""
    monkeypatch.setenv("GLA_CACHE", str(tmp_path))
    ok, why = cpu_kernels._load()
    assert ok, why
    built = [p for p in tmp_path.rglob("*.so")]
    assert len(built) == 1 and str(built[0]) in why
    mtime = os.path.getmtime(built[0])
    assert cpu_kernels._load()[0] and os.path.getmtime(built[0]) == mtime


@pytest.mark.parametrize("threads", [1, 4])
def test_value_columns_split_over_threads(threads):
    """One sequence and head with more threads than tasks: the value columns are split (100 columns in three slices
    of 34, 34 and 32 at 4 threads); outputs, final and per-chunk states equal the reference's and the PyTorch path's."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v, g, h0 = gla_inputs(1, 200, 1, 60, 100, normalizer=1.0, state=True, requires_grad=False)
        o, s, hs = torch.ops.gla_cpu.chunk_forward(q, k, v, g, h0, None, 0.25, 4)
    finally:
        torch.set_num_threads(before)
    o_r, s_r = gated_linear_attention(*(x.double() for x in (q, k, v, g)), initial_state=h0.double(), scale=0.25,
                                      output_final_state=True, backend="recurrent")
    assert rel_err(o, o_r) <= FWD_TOL and rel_err(s, s_r) <= FWD_TOL
    _, s_64, _ = torch.ops.gla_cpu.chunk_forward(q[:, :64], k[:, :64], v[:, :64], g[:, :64], h0, None, 0.25, 0)
    assert torch.equal(hs[0], h0[0]) and rel_err(hs[1], s_64[0]) <= FWD_TOL


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 4e-3)])  # bf16: one rounding, 2^-8
@pytest.mark.parametrize("shape", [(1, 2), (3, 7, 74), (2, 5, 688)])
def test_swiglu_matches_reference(shape, dtype, tol):
    """silu(a) * u and its gradient against float64 on fresh values, with extremes (|a| = 100, where exp(-a)
    alone would overflow, 0, tiny) in the first row; bfloat16 within one rounding of the result."""
    gen = torch.Generator().manual_seed(len(shape))
    y = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    y.view(-1)[:min(5, shape[-1] // 2)] = torch.tensor([100.0, -100.0, 0.0, 1e-3, -50.0])[:min(5, shape[-1] // 2)]
    dh = torch.randn(*shape[:-1], shape[-1] // 2, generator=gen, dtype=torch.float64)
    ref_in = y.clone().requires_grad_()
    a, u = ref_in.chunk(2, -1)
    ref = torch.nn.functional.silu(a) * u
    ref.backward(dh)
    ours_in = y.to(dtype).requires_grad_()
    out = cpu_kernels.swiglu(ours_in)
    out.backward(dh.to(dtype))
    assert out.dtype == dtype and out.shape == ref.shape and ours_in.grad.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(ours_in.grad).all()
    assert rel_err(out, ref) <= tol and rel_err(ours_in.grad, ref_in.grad) <= tol


@pytest.mark.parametrize("case", ["odd", "float64", "strided", "dh"])
def test_swiglu_bad_input_gets_a_clear_error(case):
    y, dh = torch.randn(4, 10), torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="dh must be" if case == "dh" else "y must be"):
        if case == "odd":
            torch.ops.gla_cpu.swiglu_forward(torch.randn(4, 9))
        elif case == "float64":
            torch.ops.gla_cpu.swiglu_forward(y.double())
        elif case == "strided":
            torch.ops.gla_cpu.swiglu_forward(torch.randn(10, 4).t())
        else:
            torch.ops.gla_cpu.swiglu_backward(dh[:, :4], y)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 4e-3)])
@pytest.mark.parametrize("H,V", [(1, 3), (3, 7), (2, 100)])  # V=1: do is eps-sized cancellation
def test_gated_rms_norm_matches_reference(H, V, dtype, tol):
    """RMSNorm(o) * w * swish(r) with r a strided slice (as the layer's joint projection gives it), and its
    gradients of o, r and w, against float64; extremes in r (|r| = 100, 0)."""
    gen = torch.Generator().manual_seed(H * V)
    B, T = 2, 5
    o = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    joint = torch.randn(B, T, H * V + 3, generator=gen, dtype=torch.float64) * 3
    joint.view(-1)[:3] = torch.tensor([100.0, -100.0, 0.0])
    w = torch.rand(V, generator=gen, dtype=torch.float64) + 0.5
    dy = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    ref_in = [x.clone().requires_grad_() for x in (o, joint, w)]
    n = ref_in[0] / torch.sqrt(ref_in[0].pow(2).mean(-1, keepdim=True) + 1e-6)
    ref = n * ref_in[2] * torch.nn.functional.silu(ref_in[1][..., :H * V]).view(B, T, H, V)
    ref.backward(dy)
    ours_in = [o.to(dtype).requires_grad_(), joint.to(dtype).requires_grad_(), w.float().requires_grad_()]
    out = cpu_kernels.gated_rms_norm(ours_in[0], ours_in[1][..., :H * V], ours_in[2], 1e-6)
    out.backward(dy.to(dtype))
    assert out.dtype == dtype and out.shape == ref.shape and rel_err(out, ref) <= tol
    for name, a, b in zip(("do", "dr", "dw"), ours_in, ref_in):
        assert a.grad.dtype == a.dtype and rel_err(a.grad, b.grad) <= tol, (name, rel_err(a.grad, b.grad))


def test_gated_norm_bad_input_gets_a_clear_error():
    o, r, w = torch.randn(4, 2, 5), torch.randn(4, 10), torch.ones(5)
    with pytest.raises(RuntimeError, match="o must be"):
        torch.ops.gla_cpu.gated_norm_forward(o.double(), r, w, 1e-6)
    with pytest.raises(RuntimeError, match="r must be"):
        torch.ops.gla_cpu.gated_norm_forward(o, r[:, :9], w, 1e-6)
    with pytest.raises(RuntimeError, match="w must be"):
        torch.ops.gla_cpu.gated_norm_forward(o, r, torch.ones(4), 1e-6)
    with pytest.raises(RuntimeError, match="rstd must be"):
        torch.ops.gla_cpu.gated_norm_backward(o, o, r, w, torch.ones(3))


@pytest.mark.parametrize("D", [3, 37, 128])  # D=1: dx is an eps-sized cancellation
def test_rms_norm_bf16_matches_reference(D):
    """RMSNorm of float32 rows into bfloat16 (one rounding of the float64 result), and dx, dw (float32) from a
    bfloat16 dy against float64; bad inputs get a clear error."""
    gen = torch.Generator().manual_seed(D)
    x = torch.randn(33, D, generator=gen, dtype=torch.float64) * 3
    w = torch.rand(D, generator=gen, dtype=torch.float64) + 0.5
    dy = torch.randn(33, D, generator=gen).to(torch.bfloat16)
    ref_in = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    ref = ref_in[0] / torch.sqrt(ref_in[0].pow(2).mean(-1, keepdim=True) + 1e-6) * ref_in[1]
    ref.backward(dy.double())
    ours_in = [x.float().requires_grad_(), w.float().requires_grad_()]
    out = cpu_kernels.rms_norm_bf16(ours_in[0], ours_in[1], 1e-6)
    out.backward(dy)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) <= 2 ** -8
    for a, b in zip(ours_in, ref_in):
        assert a.grad.dtype == torch.float32 and rel_err(a.grad, b.grad) <= 1e-5, rel_err(a.grad, b.grad)
    with pytest.raises(RuntimeError, match="x must be"):
        torch.ops.gla_cpu.rms_norm_bf16_forward(x, w.float(), 1e-6)
    with pytest.raises(RuntimeError, match="dy must be"):
        torch.ops.gla_cpu.rms_norm_bf16_backward(dy.float(), x.float(), w.float(), torch.ones(33))
