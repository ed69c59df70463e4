"""Triton kernels against the float64 recurrent reference.

CI (no GPU): runs every kernel under the Triton CPU interpreter on CPU tensors at small shapes (TRITON_INTERPRET=1 is
set here, before triton is imported; it must be in effect before ``gla.ops.triton`` is first imported). The file is
skipped only when triton is not installed.

GPU: ``GLA_TEST_GPU=1 pytest tests/ops/test_triton.py`` runs the same checks compiled, on CUDA tensors, at realistic
shapes (B*T in the thousands, K=V=128, the GLA-1.3B head K=256 / V=512).

Tolerances (relative error ||x - ref|| / ||ref||): fp32 inputs use full-precision fp32 products ("ieee" on the GPU),
so fp32 meets 1e-5 forward / 1e-4 gradients. bf16 inputs go through bf16 tensor-core products (each operand rounded to
8 significant bits, ~2e-3 relative), bf16 outputs and bf16 per-chunk scores, states and state gradients (final states
stay fp32): measured 2e-3 to 8e-3, bounded here by 2e-2 (fp16 likewise: its products also run in bf16, see
``utils.dot16``). On the interpreter the products run in fp32 on operands rounded to bf16 as the GPU rounds them.
"""
from __future__ import annotations

import os

import pytest

GPU = os.environ.get("GLA_TEST_GPU") == "1"
if not GPU:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from gla.ops import gated_linear_attention, recurrent_step  # noqa: E402
from gla.ops.triton import triton_recurrent_step  # noqa: E402
from gla.ops.triton.utils import dot16, to_dot  # noqa: E402
from tests.utils import assert_autocast_exact, compare_to_reference, gla_inputs, rel_err  # noqa: E402

DEVICE = "cuda" if GPU else "cpu"
if GPU and not torch.cuda.is_available():
    pytest.skip("GLA_TEST_GPU=1 needs a CUDA device", allow_module_level=True)

TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-2, 2e-2)}

# (B, T, H, K, V, gate normalizer, cu_seqlens): normalizer 16 = ordinary gates, 1 = chunks with total log-decay
# around the safe-factoring limit (mixed paths), 0.1 = strong gates (log-decay of hundreds inside one chunk).
if GPU:
    CASES = [
        (2, 1000, 4, 128, 128, 16.0, None),
        (1, 700, 2, 256, 512, 16.0, None),
        (1, 900, 3, 60, 100, 0.1, None),
        (1, 777, 2, 128, 128, 1.0, None),
        (1, 1500, 4, 64, 128, 16.0, [0, 1, 1, 200, 264, 1000, 1500]),
    ]
else:
    CASES = [
        (2, 100, 2, 16, 32, 16.0, None),
        (1, 130, 2, 60, 100, 0.1, None),
        (1, 150, 1, 40, 24, 1.0, None),
        (1, 150, 2, 32, 32, 16.0, [0, 1, 1, 66, 150]),
        (3, 1, 2, 16, 16, 16.0, None),
        # short sequences and an empty last one: 4 chunks in a buffer bounded at 190 // 64 + 5 = 7, so 3 spare ids
        (1, 190, 2, 16, 16, 1.0, [0, 63, 64, 127, 190, 190]),
        # V wider than one value tile: two value-tile programs per chunk in the output and dv kernels
        (1, 80, 1, 16, 160, 16.0, None),
    ]


def _ids(case):
    B, T, H, K, V, norm, cu = case
    return f"B{B}-T{T}-H{H}-K{K}-V{V}-g{norm}" + ("-varlen" if cu else "")


def _check(case, dtype, state=True, g_dtype=None):
    B, T, H, K, V, norm, cu = case
    cu_seqlens = torch.tensor(cu, device=DEVICE) if cu is not None else None
    N = len(cu) - 1 if cu is not None else None
    q, k, v, g, h0 = gla_inputs(B, T, H, K, V, dtype=dtype, normalizer=norm, state=state, N=N, device=DEVICE,
                                seed=T + K, g_dtype=g_dtype)
    errs = compare_to_reference(q, k, v, g, h0, backend="triton", cu_seqlens=cu_seqlens)
    fwd_tol, grad_tol = TOL[dtype]
    bad = {n: e for n, e in errs.items() if not e <= (fwd_tol if n in ("o", "state") else grad_tol)}
    assert not bad, f"{_ids(case)} {dtype}: errors over tolerance {bad} (all: {errs})"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_chunk_fp32(case):
    """Forward, final state and gradients of q, k, v, g, initial_state (through o and the final state)."""
    _check(case, torch.float32)


@pytest.mark.parametrize("case", [CASES[0], CASES[2 if GPU else 1], CASES[4 if GPU else 3]], ids=_ids)
def test_chunk_bf16(case):
    _check(case, torch.bfloat16)


@pytest.mark.parametrize("case", [CASES[0], CASES[2 if GPU else 1]], ids=_ids)
def test_chunk_bf16_with_fp32_gate(case):
    """What the GLA layer passes under bf16 autocast: bf16 q, k, v and its float32 gate."""
    _check(case, torch.bfloat16, g_dtype=torch.float32)


SMALL_HEADS = [(4, 79, 2, 16, 32, 16.0, None), (64 if GPU else 4, 64, 1, 32, 64, 16.0, None),
               (3 if GPU else 1, 200, 2, 64, 64, 1.0, None), (4, 79, 2, 32, 16, 16.0, None)]


@pytest.mark.parametrize("case", SMALL_HEADS, ids=_ids)
def test_chunk_bf16_small_heads(case):
    """Head dims whose V fits in one tile of the backward (the MQAR models' K=32/V=64, K=V=64): on the H200 the bf16
    backward gave wrong or NaN dq, dk, dg and faulted at K=V=64 while its tiles were not square. (The interpreter
    multiplies in fp32 and never showed it; this guards the compiled path.)"""
    _check(case, torch.bfloat16, g_dtype=torch.float32)


def test_autocast_leaves_the_operator_alone():
    """Under bf16 autocast (forward and backward) the operator computes exactly as outside it."""
    q, k, v, g, h0 = gla_inputs(2, 100, 2, 32, 48, state=True, device=DEVICE, seed=5)
    assert_autocast_exact(q, k, v, g, h0, backend="triton", variants=[(True, True)])


def test_chunk_fp16():
    _check(CASES[0], torch.float16, state=False)


def test_no_state_no_final():
    """Without initial state and without the final state: the gradient reaches the kernels through o alone."""
    B, T, H, K, V = (2, 300, 2, 64, 64) if GPU else (1, 70, 2, 16, 16)
    q, k, v, g, _ = gla_inputs(B, T, H, K, V, device=DEVICE)
    o, s = gated_linear_attention(q, k, v, g, backend="triton")
    assert s is None
    do = torch.randn_like(o)
    grads = torch.autograd.grad((o * do).sum(), (q, k, v, g))
    leaves = [x.detach().double().cpu().requires_grad_() for x in (q, k, v, g)]
    o_r, _ = gated_linear_attention(*leaves, backend="recurrent")
    grads_r = torch.autograd.grad((o_r * do.double().cpu()).sum(), leaves)
    assert rel_err(o, o_r) <= 1e-5
    for a, b in zip(grads, grads_r):
        assert rel_err(a, b) <= 1e-4


def test_float64_is_refused():
    q, k, v, g, _ = gla_inputs(1, 8, 1, 16, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="float64"):
        gated_linear_attention(q, k, v, g, backend="triton")


def test_all_sequences_empty():
    q, k, v, g, h0 = gla_inputs(1, 0, 2, 16, 16, state=True, N=2, device=DEVICE)
    cu = torch.tensor([0, 0, 0], device=DEVICE)
    o, s = gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                  backend="triton")
    assert o.shape == (1, 0, 2, 16) and torch.equal(s, h0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_recurrent_step(dtype, inplace):
    B, H, K, V = (16, 16, 128, 128) if GPU else (3, 2, 60, 100)
    gen = torch.Generator().manual_seed(0)
    q, k, g = (torch.randn(B, H, K, generator=gen) for _ in range(3))
    g = torch.nn.functional.logsigmoid(g) / 16
    v = torch.randn(B, H, V, generator=gen)
    state = torch.randn(B, H, K, V, generator=gen).to(DEVICE)
    q, k, v, g = (x.to(DEVICE, dtype) for x in (q, k, v, g))
    o_r, s_r = recurrent_step(q.double(), k.double(), v.double(), g.double(), state.double(), K ** -0.5)
    s_in = state.clone()
    o, s = triton_recurrent_step(q, k, v, g, s_in, K ** -0.5, inplace=inplace)
    assert (s is s_in) == inplace
    assert o.dtype == dtype and s.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(o, o_r) <= tol and rel_err(s, s_r) <= 1e-5
    if not inplace:
        assert torch.equal(s_in, state)


def test_recurrent_step_reads_slices_of_one_projection():
    """q, k, v, g as column slices of one [B, H*(3K+V)] output (decoding's fused projections): read in place with
    their row stride, the same result as contiguous copies; a layout the kernel cannot read is copied first."""
    B, H, K, V = 3, 2, 60, 100
    gen = torch.Generator().manual_seed(1)
    fused = torch.randn(B, H * (3 * K + V) + 7, generator=gen).to(DEVICE)
    q, k, g = (fused[:, i * H * K:(i + 1) * H * K].view(B, H, K) for i in range(3))
    g = g.clone().mul_(0.1).sub_(0.5)  # a log-gate <= 0, contiguous
    v = fused[:, 3 * H * K:3 * H * K + H * V].view(B, H, V)
    state = torch.randn(B, H, K, V, generator=gen).to(DEVICE)
    o_c, s_c = triton_recurrent_step(*(x.contiguous() for x in (q, k, v, g)), state.clone(), K ** -0.5)
    o, s = triton_recurrent_step(q, k, v, g, state.clone(), K ** -0.5)
    assert torch.equal(o, o_c) and torch.equal(s, s_c)
    o_t, s_t = triton_recurrent_step(q.transpose(0, 1).contiguous().transpose(0, 1), k, v, g, state.clone(), K ** -0.5)
    assert torch.equal(o_t, o_c) and torch.equal(s_t, s_c)
    o_r, s_r = recurrent_step(q.double(), k.double(), v.double(), g.double(), state.double(), K ** -0.5)
    assert rel_err(o, o_r) <= 1e-5 and rel_err(s, s_r) <= 1e-5


def test_one_token_without_grad_takes_the_decode_kernel(monkeypatch):
    """backend="triton" (and "auto" on CUDA) with T = 1 and no gradient: the decode kernel, same result."""
    import gla.ops.triton as tr
    calls = []
    real = tr.triton_recurrent_step
    monkeypatch.setattr(tr, "triton_recurrent_step", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, g, h0 = gla_inputs(3, 1, 2, 60, 100, state=True, requires_grad=False, device=DEVICE)
    with torch.no_grad():
        o, s = gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, backend="triton")
    o_ref, s_ref = gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True,
                                          backend="recurrent")
    assert calls == [1]
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    q.requires_grad_()
    o2, _ = gated_linear_attention(q, k, v, g, initial_state=h0, backend="triton")  # gradients: chunk kernels
    assert calls == [1] and o2.requires_grad


@pytest.mark.skipif(not GPU, reason="T=32768 against the step-by-step reference: GLA_TEST_GPU=1 on a CUDA machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_sequence_strong_gates_fp32_gate(dtype):
    """The in-chunk cumulative sums stay fp32 over a long sequence: strong gates (normaliser 1, chunks around the
    safe-factoring limit), T = 32768, the model's fp32 gate."""
    _check((1, 32768, 2, 64, 64, 1.0, None), dtype, g_dtype=torch.float32)


def test_backward_after_a_forward_that_kept_no_scores():
    """The operator called with store_A=False (a forward that expected no backward) still differentiates: the
    backward recomputes the intra-chunk scores instead of reading an empty buffer."""
    from gla.ops.triton.chunk import chunk_fwd_op
    q, k, v, g, h0 = gla_inputs(1, 70, 2, 16, 24, state=True, device=DEVICE, seed=7)
    grads = []
    for store_A in (False, True):
        o, ht, A, _, _ = chunk_fwd_op(q, k, v, g, h0, None, 0.25, True, store_A)
        assert (A.numel() > 0) == store_A
        gen = torch.Generator().manual_seed(0)
        do, dht = (torch.randn(x.shape, generator=gen).to(x) for x in (o, ht))
        grads.append(torch.autograd.grad((o * do).sum() + (ht * dht).sum(), (q, k, v, g, h0)))
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-6


def _chunks_by_loop(cu: list[int], T: int, BT: int) -> list[list[int]]:
    """(sequence, chunk) of each global chunk id, then the spare ids as further chunks of the last sequence."""
    rows = [[n, c] for n in range(len(cu) - 1) for c in range(-(-(cu[n + 1] - cu[n]) // BT))]
    last, nt = len(cu) - 2, -(-(cu[-1] - cu[-2]) // BT)
    while len(rows) < T // BT + len(cu) - 1:
        rows.append([last, nt])
        nt += 1
    return rows


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_chunk_meta_matches_a_loop(compiled):
    """Varlen chunk bookkeeping (tensor ops only) against a Python loop: random lengths with empty sequences, also
    traced by torch.compile (Inductor's CUDA searchsorted shifted the chunks by a sequence: the GPU compile test)."""
    from gla.ops.triton.utils import BT, chunk_meta
    meta = torch.compile(chunk_meta, fullgraph=True, dynamic=True) if compiled else chunk_meta
    gen = torch.Generator().manual_seed(0)
    for trial in range(40 if compiled else 200):
        N = int(torch.randint(1, 8, (1,), generator=gen))
        lengths = torch.randint(0, 3 * BT, (N,), generator=gen)
        if trial % 3 == 0:
            lengths[torch.randint(0, N, (1,), generator=gen)] = 0
        cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(DEVICE)
        T = int(cu[-1])
        got = meta(1, T, cu).chunk_indices.tolist()
        assert got == _chunks_by_loop(cu.tolist(), T, BT), (cu.tolist(), got)


def test_backward_with_the_empty_final_state_placeholder():
    """A forward without output_final_state returns an empty placeholder for ht; autograd callers (torch.library's
    opcheck among them) may pass an empty gradient for it. It means no gradient: the same as passing none (it once
    made the state-gradient kernel read [N, H, K, V] values from an empty buffer: an illegal address on the GPU)."""
    from gla.ops.triton.chunk import chunk_fwd_op
    q, k, v, g, _ = gla_inputs(2, 70, 2, 16, 24, state=False, device=DEVICE, seed=8)
    o, ht, _, _, _ = chunk_fwd_op(q, k, v, g, None, None, 0.25, False, True)
    assert ht.numel() == 0
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o)
    with_empty = torch.autograd.grad((o, ht), (q, k, v, g), (do, torch.zeros_like(ht)), retain_graph=True)
    without = torch.autograd.grad(o, (q, k, v, g), do)
    for a, b in zip(with_empty, without):
        assert torch.equal(a, b)



@triton.jit
def _round_kernel(x, y, N: tl.constexpr, DOT16: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(y + o, to_dot(tl.load(x + o), DOT16))


@pytest.mark.skipif(GPU, reason="the interpreter's emulation of bf16 operands; the GPU rounds in hardware")
def test_interpreter_rounds_operands_as_the_gpu_does():
    """Under the interpreter, 16-bit inputs multiply fp32 operands holding their bf16 rounding (DOT16 = 2), so the
    suite sees the GPU's precision (the interpreter's own fp32 -> bf16 cast truncates instead of rounding)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4000, generator=gen) * 10.0 ** torch.randint(-30, 30, (4000,), generator=gen),
                   torch.tensor([0.0, -0.0, 1.0, 1.00390625, 1.01171875, -3.0e38]),
                   torch.randn(90, generator=gen)])
    y = torch.empty_like(x)
    assert dot16(torch.bfloat16) == 2 and dot16(torch.float16) == 2 and dot16(torch.float32) == 0
    _round_kernel[(1,)](x, y, N=4096, DOT16=dot16(torch.bfloat16))
    assert torch.equal(y, x.bfloat16().float())


def test_broadcast_gate_recomputes_the_sums_with_the_same_gradients():
    """A broadcast gate (fixed decay: a stride-0 view) keeps g and recomputes its in-chunk sums in the backward; a
    materialised one keeps the forward's sums. Both give the same gradients."""
    q, k, v, _, h0 = gla_inputs(2, 70, 2, 16, 24, state=True, device=DEVICE, seed=9)
    base = (torch.nn.functional.logsigmoid(torch.randn(1, 1, 2, 16, generator=torch.Generator().manual_seed(2)))
            .to(DEVICE).requires_grad_())
    do = torch.randn(2, 70, 2, 24, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    grads = []
    for materialise in (False, True):
        g = base.expand(2, 70, 2, 16)
        g = g.contiguous() if materialise else g
        assert (0 in g.stride()) != materialise
        o, _ = gated_linear_attention(q, k, v, g, initial_state=h0, backend="triton")
        grads.append(torch.autograd.grad(o, (q, k, v, base, h0), do))
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("huge", [-1e4, -3e38])
def test_huge_finite_gates_match_reference(huge):
    """Finite gates far below any real one (their in-chunk sums lost every small difference, or overflowed to NaN)
    give the reference's outputs, final state and gradients: the cumulative-sum kernel floors them at G_FLOOR."""
    q, k, v, g, h0 = gla_inputs(1, 90, 2, 16, 16, state=True, device=DEVICE, seed=7)
    with torch.no_grad():
        g[0, 20, 0, :5] = huge
        g[0, 21:23, 1, :] = huge
    errs = compare_to_reference(q, k, v, g, h0, backend="triton")
    fwd_tol, grad_tol = TOL[torch.float32]
    assert all(e <= (fwd_tol if n in ("o", "state") else grad_tol) for n, e in errs.items()), errs


def test_nan_gates_stay_nan():
    """The floor in the cumulative-sum kernel does not turn a NaN gate into a number (tl.maximum's default would
    return the other operand on a GPU)."""
    q, k, v, g = (x.detach() for x in gla_inputs(1, 20, 1, 16, 16, device=DEVICE, seed=9)[:4])
    g[0, 5, 0, 0] = float("nan")
    o, s = gated_linear_attention(q, k, v, g, output_final_state=True, backend="triton", check_values=False)
    assert o[0, 5:].isnan().any() and s.isnan().any()
