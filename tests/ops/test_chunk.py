"""The chunkwise PyTorch path against the float64 recurrent reference: outputs, final state, every gradient.
(The compiled CPU forward that serves the chunk backend where it can is tested in test_cpu_kernels.py; here it is
switched off so that the PyTorch forward, every machine's fallback, is what runs.)"""
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from gla.ops import cpu_kernels, gated_linear_attention
from tests.utils import compare_to_reference, gla_inputs, rel_err

FWD_TOL, GRAD_TOL = 1e-5, 1e-4  # fp32: relative to a float64 reference


@pytest.fixture(autouse=True)
def pytorch_forward(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "serves", lambda *tensors: False)


def assert_close(errs, fwd_tol=FWD_TOL, grad_tol=GRAD_TOL):
    bad = {n: e for n, e in errs.items() if e > (fwd_tol if n in ("o", "state") else grad_tol)}
    assert not bad, f"relative errors above tolerance: {bad} (all: {errs})"


@pytest.mark.parametrize("B,T,H,K,V", [(2, 1, 2, 60, 100), (1, 63, 2, 60, 100), (2, 128, 2, 60, 100),
                                       (2, 130, 3, 16, 20), (1, 1000, 1, 32, 48)])
@pytest.mark.parametrize("normalizer", [16.0, 1.0, 0.1])  # weak, medium, strong gates
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_matches_reference(B, T, H, K, V, normalizer, with_state):
    q, k, v, g, h0 = gla_inputs(B, T, H, K, V, normalizer=normalizer, state=with_state, seed=T + K)
    assert_close(compare_to_reference(q, k, v, g, h0, backend="chunk"))


@pytest.mark.parametrize("chunk_decay", [29.5, 30.5])
def test_whole_chunk_factoring_at_its_bound(chunk_decay):
    """The strongest chunk decays by just under SAFE_SPAN (= 30: every chunk is one factored block, key factors
    reach e^29.5) or just over it (16-token sub-chunks for all): both meet the fp32 tolerances."""
    import torch.nn.functional as F
    from gla.ops.chunk import sub_chunk
    q, k, v, _, h0 = gla_inputs(2, 130, 2, 20, 24, state=True, seed=5)
    g = -torch.rand(2, 130, 2, 20, generator=torch.Generator().manual_seed(6))
    b = F.pad(g, (0, 0, 0, 0, 0, 62)).view(2, 3, 64, 2, 20).permute(0, 1, 3, 2, 4).reshape(6, 2, 64, 20).cumsum(2)
    g = (g * (chunk_decay / -b[:, :, -1].min())).requires_grad_()
    assert sub_chunk(b * (chunk_decay / -b[:, :, -1].min())) == (64 if chunk_decay < 30 else 16)
    assert_close(compare_to_reference(q, k, v, g, h0, backend="chunk"))


def test_chunk_custom_scale():
    q, k, v, g, h0 = gla_inputs(1, 70, 2, 12, 7, state=True)
    assert_close(compare_to_reference(q, k, v, g, h0, backend="chunk", scale=0.37))


@pytest.mark.parametrize("normalizer", [16.0, 0.1])
def test_varlen_matches_reference(normalizer):
    cu = torch.tensor([0, 5, 5, 70, 200, 201, 329], dtype=torch.int32)  # includes an empty sequence
    q, k, v, g, h0 = gla_inputs(1, 329, 2, 24, 40, normalizer=normalizer, state=True, N=6)
    assert_close(compare_to_reference(q, k, v, g, h0, backend="chunk", cu_seqlens=cu))


def test_varlen_equals_loop_over_sequences():
    offs = [0, 64, 64, 100, 229]
    cu = torch.tensor(offs)
    q, k, v, g, h0 = gla_inputs(1, offs[-1], 2, 20, 30, state=True, N=len(offs) - 1, requires_grad=False)
    o, s = gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                  backend="chunk")
    for n, (bos, eos) in enumerate(zip(offs, offs[1:])):
        sl = slice(bos, eos)
        o_n, s_n = gated_linear_attention(q[:, sl], k[:, sl], v[:, sl], g[:, sl], initial_state=h0[n:n + 1],
                                          output_final_state=True, backend="chunk")
        assert rel_err(o[:, sl], o_n) <= FWD_TOL if eos > bos else o[:, sl].numel() == 0
        assert rel_err(s[n:n + 1], s_n) <= FWD_TOL


@pytest.mark.parametrize("T", [0, 100, 128])
def test_empty_batch(T):
    """B = 0 (with and without gradients): empty outputs and gradients of the inputs' shapes, no error."""
    q, k, v, g, _ = gla_inputs(0, T, 2, 16, 24)
    o, s = gated_linear_attention(q, k, v, g, output_final_state=True, backend="chunk")
    assert o.shape == (0, T, 2, 24) and s.shape == (0, 2, 16, 24)
    grads = torch.autograd.grad(o.sum() + s.sum(), (q, k, v, g))
    assert [x.shape for x in grads] == [q.shape, k.shape, v.shape, g.shape]
    with torch.no_grad():
        assert gated_linear_attention(q, k, v, g, backend="chunk")[0].shape == (0, T, 2, 24)


def test_empty_sequence_keeps_initial_state():
    cu = torch.tensor([0, 0, 10])
    q, k, v, g, h0 = gla_inputs(1, 10, 1, 8, 8, state=True, N=2, requires_grad=False)
    _, s = gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                  backend="chunk")
    assert torch.equal(s[0], h0[0])


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 4e-3), (torch.float16, 1e-3)])
def test_low_precision_inputs(dtype, tol):
    # The reference sees the same rounded inputs in float64, so the only difference left is rounding the
    # outputs and gradients to `dtype` (bf16 unit roundoff 2^-9 ~ 2e-3 per element, fp16 2^-12): the bounds are
    # about one ulp of the output format, which fp32 accumulation inside the op must not exceed.
    q, k, v, g, h0 = gla_inputs(2, 150, 2, 32, 64, dtype=dtype, state=True)
    errs = compare_to_reference(q, k, v, g, h0, backend="chunk")
    assert_close(errs, tol, tol)


def test_state_is_float32_for_low_precision():
    q, k, v, g, _ = gla_inputs(1, 20, 1, 8, 8, dtype=torch.bfloat16, requires_grad=False)
    o, s = gated_linear_attention(q, k, v, g, output_final_state=True, backend="chunk")
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32


def test_no_overflow_with_extreme_gates():
    # Cumulative log decay of thousands inside one chunk: every exponent must stay finite.
    q, k, v, g, h0 = gla_inputs(1, 128, 1, 8, 8, normalizer=0.01, state=True)
    errs = compare_to_reference(q, k, v, g, h0, backend="chunk")
    assert_close(errs)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 with sub-chunks of 8, so gradcheck's tiny inputs still span several chunks and sub-chunks."""
    import gla.ops.chunk as chunk
    import gla.ops.chunk_intra as intra
    for module in (chunk, intra):
        monkeypatch.setattr(module, "BT", 16)
    monkeypatch.setattr(intra, "BC", 8)


@pytest.mark.parametrize("backend", ["chunk", "recurrent"])
@pytest.mark.parametrize("normalizer", [4.0, 0.1])
def test_gradcheck(backend, normalizer, small_chunks):
    q, k, v, g, h0 = gla_inputs(1, 37, 1, 3, 2, dtype=torch.float64, normalizer=normalizer, state=True)

    def f(q, k, v, g, h0):
        return gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, backend=backend)

    assert torch.autograd.gradcheck(f, (q, k, v, g, h0), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_varlen(small_chunks):
    q, k, v, g, h0 = gla_inputs(1, 45, 1, 2, 3, dtype=torch.float64, state=True, N=3)
    cu = torch.tensor([0, 10, 10, 45])

    def f(q, k, v, g, h0):
        return gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                      backend="chunk")

    assert torch.autograd.gradcheck(f, (q, k, v, g, h0), eps=1e-6, atol=1e-5, rtol=1e-4)


@settings(max_examples=25, deadline=None, derandomize=True)  # the same draws in every CI run
@given(B=st.integers(1, 2), T=st.integers(1, 150), H=st.integers(1, 2), K=st.integers(1, 20),
       V=st.integers(1, 20), log_norm=st.floats(-2.0, 2.0), with_state=st.booleans(),
       seed=st.integers(0, 2 ** 16))
@example(B=1, T=1, H=1, K=1, V=1, log_norm=-2.0, with_state=True, seed=89)  # g = -105.5: dg, dh0 ~ 1e-46
def test_property_random_shapes_and_gates(B, T, H, K, V, log_norm, with_state, seed):
    q, k, v, g, h0 = gla_inputs(B, T, H, K, V, normalizer=10.0 ** log_norm, state=with_state, seed=seed)
    assert_close(compare_to_reference(q, k, v, g, h0, backend="chunk", seed=seed))


@pytest.mark.parametrize("T,K,V", [(1, 60, 100), (17, 60, 100), (63, 16, 20), (64, 32, 48)])
@pytest.mark.parametrize("normalizer", [16.0, 1.0, 0.1])
def test_short_sequences_without_states(T, K, V, normalizer, monkeypatch):
    """Training's call at T <= 64 (no initial, no final state) goes through gla.ops.short_chunk: one block when the
    whole sequence decays by at most SAFE_SPAN, 16-token sub-chunks when each of those does, else the chunk
    operator (strong gates). Every route meets the fp32 tolerances against the float64 reference."""
    import torch.nn.functional as F

    import gla.ops.short_chunk as short
    used = []
    real = short.short_chunk_gla
    monkeypatch.setattr(short, "short_chunk_gla", lambda *a: used.append(a[-1]) or real(*a))
    q, k, v, g, _ = gla_inputs(3, T, 2, K, V, normalizer=normalizer, seed=T + K)
    assert_close(compare_to_reference(q, k, v, g, backend="chunk", final_state=False))
    gd = g.detach()
    blocks = F.pad(gd, (0, 0, 0, 0, 0, -T % 16)).unflatten(1, (-1, 16)).sum(2)
    want = T if gd.sum(1).min() >= -30 else 16 if blocks.min() >= -30 else None
    assert used == ([want] if want else []), (want, used)
    if T == 64:  # the three routes are all exercised
        assert want == {16.0: 64, 1.0: 16, 0.1: None}[normalizer]


@pytest.mark.parametrize("decay,route", [(None, 64), (29.5, 16), (30.5, None)])
def test_short_path_at_its_bounds(decay, route, monkeypatch):
    """The whole sequence decays by just under SAFE_SPAN (one block, key factors near e^29.5), its strongest
    16-token stretch by just under it (sub-chunks) or just over it (the chunk operator): each within tolerance."""
    import gla.ops.short_chunk as short
    used = []
    real = short.short_chunk_gla
    monkeypatch.setattr(short, "short_chunk_gla", lambda *a: used.append(a[-1]) or real(*a))
    q, k, v, _, _ = gla_inputs(2, 64, 2, 20, 24, seed=7)
    g = -torch.rand(2, 64, 2, 20, generator=torch.Generator().manual_seed(8))
    strongest = -g.sum(1).min() if decay is None else -g.unflatten(1, (4, 16)).sum(2).min()
    g = (g * ((decay or 29.5) / strongest)).requires_grad_()
    assert_close(compare_to_reference(q, k, v, g, backend="chunk", final_state=False))
    assert used == ([route] if route else [])


def test_segment_length_follows_the_working_set():
    """Whole chunks, at least one; longer for small heads, shorter for larger batches, and within SEGMENT_BYTES."""
    from gla.ops.chunk import BT, SEGMENT_BYTES, segment_tokens
    big, small = segment_tokens(1, 4, 128, 256), segment_tokens(1, 4, 32, 64)
    assert big % BT == 0 and small % BT == 0 and BT <= big < small
    assert segment_tokens(16, 4, 128, 256) == BT  # the floor: one chunk per row
    assert segment_tokens(4, 4, 32, 64) < small
    per_token = 4 * 4 * (5 * 128 + 2 * 256 + BT + 128 * 256 // BT)
    assert big * per_token <= SEGMENT_BYTES < (big + BT) * per_token


def _spy_inference(monkeypatch, segment):
    """Sets the segment length; returns the lists that record each segment's run (tokens, whether it ran there)
    and each pass of chunk.py's forward (its plan's tokens)."""
    import gla.ops.chunk as chunk
    from gla.ops.chunk_segments import Segments
    monkeypatch.setattr(chunk, "segment_tokens", lambda *shape: segment)
    runs, forwards = [], []
    real_run, real_forward = Segments.run, chunk._forward

    def run(self, q, *args):
        ran = real_run(self, q, *args)
        runs.append((q.shape[1], ran))
        return ran

    def forward(*args, **kwargs):
        forwards.append(args[6].T)
        return real_forward(*args, **kwargs)
    monkeypatch.setattr(Segments, "run", run)
    monkeypatch.setattr(chunk, "_forward", forward)
    return runs, forwards


def _inference_errors(q, k, v, g, h0):
    from gla.ops.recurrent import recurrent_gla
    with torch.no_grad():
        o, s = gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, backend="chunk")
    K = q.shape[-1]
    o_r, s_r = recurrent_gla(*(x.double() for x in (q, k, v, g)), K ** -0.5, h0.double(), True, None)
    return rel_err(o, o_r), rel_err(s, s_r)


@pytest.mark.parametrize("B,T,segment", [(2, 1000, 128), (1, 300, 64), (2, 192, 1024), (3, 63, 128)])
@pytest.mark.parametrize("normalizer", [16.0, 0.1])
def test_inference_forward_in_segments(B, T, segment, normalizer, monkeypatch):
    """Without gradients the forward runs ``gla::chunk_infer`` (no per-chunk states kept): equal-length rows in
    segments of whole chunks through ``chunk_segments`` (chunk.py's forward where a chunk decays too strongly for
    one block, and for a last part chunk), the state carried between segments: output and final state against the
    float64 reference, and each segment on the path its gates call for."""
    from gla.ops.chunk import BT
    runs, forwards = _spy_inference(monkeypatch, segment)
    q, k, v, g, h0 = gla_inputs(B, T, 2, 60, 100, normalizer=normalizer, state=True, requires_grad=False, seed=T)
    assert max(_inference_errors(q, k, v, g, h0)) <= FWD_TOL
    whole = T // BT * BT
    pieces = [min(segment, whole - t) for t in range(0, whole, segment)]
    assert runs == [(n, normalizer > 1) for n in pieces]
    assert forwards == ([] if normalizer > 1 else pieces) + ([T - whole] if whole < T else [])


def test_inference_segments_of_both_kinds_hand_over_the_state(monkeypatch):
    """Weak gates in some segments and strong ones in others: the segments alternate between the two forms and the
    state passes between them exactly."""
    runs, forwards = _spy_inference(monkeypatch, 128)
    q, k, v, g, h0 = gla_inputs(2, 640, 2, 60, 100, normalizer=0.1, state=True, requires_grad=False, seed=3)
    g[:, :128] /= 200  # first segment weak, second strong, third weak, ...
    g[:, 256:384] /= 200
    assert max(_inference_errors(q, k, v, g, h0)) <= FWD_TOL
    assert runs == [(128, True), (128, False), (128, True), (128, False), (128, False)]
    assert forwards == [128, 128, 128]


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 4e-3), (torch.float64, 1e-12)])
def test_inference_segments_in_other_dtypes(dtype, tol, monkeypatch):
    """16-bit inputs accumulate in fp32, float64 ones in float64, on the segment path too."""
    runs, _ = _spy_inference(monkeypatch, 128)
    q, k, v, g, h0 = gla_inputs(2, 300, 2, 20, 24, normalizer=4.0, state=True, requires_grad=False, seed=4)
    q, k, v, g = (x.to(dtype) for x in (q, k, v, g))
    assert max(_inference_errors(q, k, v, g, h0)) <= tol
    assert runs and all(ran for _, ran in runs)


@pytest.mark.parametrize("backend", ["chunk", "pairwise"])
@pytest.mark.parametrize("huge", [-1e4, -1e30, -3e38])
def test_huge_finite_gates_match_reference(backend, huge):
    """Finite gates far below any real one (a chunk's sums of them lost every small difference, or overflowed to
    NaN) give the reference's outputs, final state and gradients: the chunked backends floor them at G_FLOOR."""
    q, k, v, g, h0 = gla_inputs(1, 90, 2, 12, 20, state=True, seed=7)
    with torch.no_grad():
        g[0, 20, 0, :5] = huge
        g[0, 21:23, 1, :] = huge  # two in a row: their sum overflows float32 from -1.7e38
    assert_close(compare_to_reference(q, k, v, g, h0, backend=backend))


def test_float64_gate_below_float32_range_beside_float32_inputs():
    """A float64 gate finite in float64 but -inf in float32 (the backends compute in q's precision): floored before
    the cast, so no NaN."""
    q, k, v, g, h0 = gla_inputs(1, 40, 1, 8, 8, state=True, seed=8)
    g64 = g.detach().double()
    g64[0, 10, 0, :] = -1e39
    o, s = gated_linear_attention(q, k, v, g64, initial_state=h0, output_final_state=True, backend="chunk")
    o_r, s_r = gated_linear_attention(q.double(), k.double(), v.double(), g64, initial_state=h0.double(),
                                      output_final_state=True, backend="recurrent")
    assert rel_err(o, o_r) < FWD_TOL and rel_err(s, s_r) < FWD_TOL


def test_broadcast_gate_stays_broadcast_under_the_floor():
    """A gate expanded over batch and time (a fixed decay) is floored where it is stored: no [B, T, H, K] copy; the
    floor is float64's where the backend computes in float64."""
    from gla.ops import G_FLOOR, G_FLOOR_FP64, _floored
    g = torch.full((1, 1, 3, 4), -2.0).expand(5, 70, 3, 4)
    out = _floored(g, torch.float32)
    assert out.stride()[:2] == (0, 0) and torch.equal(out, g)
    assert torch.equal(_floored(torch.full((2, 3), -1e9), torch.float32), torch.full((2, 3), G_FLOOR))
    assert torch.equal(_floored(torch.full((2, 3), -1e9), torch.float64), torch.full((2, 3), G_FLOOR_FP64))


@pytest.mark.parametrize("backend", ["chunk", "pairwise", "recurrent"])
def test_nan_gates_stay_nan(backend):
    """The floor does not turn a NaN gate into a number (the layer calls the operator with its value checks off:
    a NaN must reach the trainer's non-finite guard)."""
    q, k, v, g = (x.detach() for x in gla_inputs(1, 20, 1, 8, 8, seed=9)[:4])
    g[0, 5, 0, 0] = float("nan")
    o, s = gated_linear_attention(q, k, v, g, output_final_state=True, backend=backend, check_values=False)
    assert o[0, 5:].isnan().any() and s.isnan().any()
