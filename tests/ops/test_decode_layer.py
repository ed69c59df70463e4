"""The fused decoding step (gla.decoding_fused, Triton kernels in gla.ops.triton.decode_layer) against the model's own
step, under the Triton interpreter: logits and every layer's new state, over several tokens."""
import os

import pytest

GPU = os.environ.get("GLA_TEST_GPU") == "1"
if not GPU:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import torch  # noqa: E402

from gla import GLATransformer  # noqa: E402
from gla.decoding import _allocate  # noqa: E402
from gla.decoding_fused import FusedStep, supports  # noqa: E402
from gla.layers.fused import FusedProjections  # noqa: E402
from gla.layers.gla_attention import StaticGLAState  # noqa: E402
from tests.utils import rel_err  # noqa: E402

DEVICE = "cuda" if GPU else "cpu"


# (vocab, d_model, heads, d_ff): d_ff 96 makes the down projection's K no power of two (masked tiles), head_k 16 and
# head_v 32; on a GPU also two layers of gla-340m's shapes (the launch configurations the model runs)
SIZES = {"small": (61, 64, 2, 96), "gla-340m": (32000, 1024, 4, 2816)}


def model(dtype, size="small", **kw):
    torch.manual_seed(0)
    vocab, d, heads, d_ff = SIZES[size]
    opts = dict(expand_k=0.5, gate_logit_normalizer=4.0, gate_bias_init=1.0, **kw)
    m = GLATransformer(vocab, d, heads, d_ff, 2, dropout=0.0, tie_embeddings=True, **opts).eval().to(DEVICE, dtype)
    with torch.no_grad():  # weights away from zero: the gate, norms and biases all matter
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


# fp16 checks the roundings to the model's 16-bit intermediates (measured 1.8e-4 as written, 1.4e-3 with them left
# out); bf16 cannot under the interpreter, whose bf16 casts truncate where torch's round to nearest
TOLS = [(torch.float32, 1e-5), (torch.float16, 6e-4), (torch.bfloat16, 2e-2)]


# B=20 and 64: the tensor-core products of rows_mma_kernel. fp16's bound (6e-4, 1.8e-4 measured against 1.4e-3
# with the roundings left out) was measured under the interpreter at 1-3 rows and holds only there: with more rows
# more entries sit near a rounding boundary (20 rows, through either kernel: 6.8e-4), and on the GPU the model's
# cuBLAS products sum in another order (3 rows: 7.9e-4). So fp16 runs under the interpreter at 1-3 rows, the GPU
# and more rows run fp32 and bf16 (the interpreter's truncating bf16 casts: 2.01e-2 at 20 rows, so bf16 there at
# 1-3 rows too). The mma kernel's roundings are checked against the unrolled kernel's entry by entry
# (test_tensor_core_rows_equal_unrolled_rows).
CASES = [(B, dt, tol) for B in [1, 3, 20] + ([16, 64] if GPU else []) for dt, tol in TOLS
         if dt == torch.float32 or (dt == torch.bfloat16 and (GPU or B <= 3)) or (not GPU and B <= 3)]


@pytest.mark.parametrize("B,dtype,tol", CASES)
@pytest.mark.parametrize("size", ["small"] + (["gla-340m"] if GPU else []))
def test_fused_step_equals_the_model_step(dtype, tol, B, size):
    m = model(dtype, size)
    ids = torch.randint(0, SIZES[size][0], (B, 5), device=DEVICE)
    with torch.inference_mode():
        _, state = m(ids[:, :3], None)
        static = _allocate(state, None)
        for b, t in zip(static.layers, state.layers):
            b.recurrent.copy_(t.recurrent)
        static.seen.copy_(state.seen)
        tokens = torch.zeros(B, 1, dtype=torch.long, device=DEVICE)
        with FusedProjections(m):
            assert supports(m, static)
            step = FusedStep(m, static, tokens)
            for t in range(3, 5):
                logits, state = m(ids[:, t:t + 1], state)
                tokens.copy_(ids[:, t:t + 1])
                fused = step(m)
                assert fused.dtype == logits.dtype
                assert rel_err(fused, logits[:, -1]) <= tol, (t, rel_err(fused, logits[:, -1]))
                for b, s in zip(static.layers, state.layers):
                    assert rel_err(b.recurrent, s.recurrent) <= tol
                assert torch.equal(static.seen, state.seen)


def test_fused_step_declines_what_it_does_not_serve(monkeypatch):
    for kw in ({"use_short_conv": True}, {"num_kv_heads": 1}, {"attn_layers": (1,)}, {"feature_map": "relu"},
               {"qkv_bias": True}, {"norm": "layer"}, {"output_gate": "sigmoid"}):
        m = model(torch.float32, **kw)
        with torch.inference_mode():
            _, state = m(torch.randint(0, 61, (1, 3), device=DEVICE), None)
        static = _allocate(state, 256)
        with FusedProjections(m):
            assert not supports(m, static), kw
    torch.manual_seed(0)  # value heads of 2048 (past MMA_K): the head norm's products would not fit shared memory
    m = GLATransformer(61, 2048, 1, 128, 1, expand_k=0.5).eval().to(DEVICE)
    with torch.inference_mode():
        _, state = m(torch.randint(0, 61, (1, 3), device=DEVICE), None)
    with FusedProjections(m):
        assert m.layers[0].attn.head_v == 2048 and not supports(m, _allocate(state, None))
    m = model(torch.float32)
    with torch.inference_mode():
        _, state = m(torch.randint(0, 61, (1, 3), device=DEVICE), None)
    static = _allocate(state, None)
    # a hook (or an adapter) on a weight the kernels read directly: the plain step runs it, the fused one could not
    for lin in (m.layers[1].attn.o_proj, m.layers[0].mlp.down_proj, m.lm_head):
        handle = lin.register_forward_hook(lambda mod, args, out: out * 2)
        with FusedProjections(m):
            assert not supports(m, static), lin
        handle.remove()
    m.layers[1].attn.o_proj.bias = torch.nn.Parameter(torch.zeros(64, device=DEVICE))
    with torch.inference_mode():
        _, state = m(torch.randint(0, 61, (1, 3), device=DEVICE), None)
    static = _allocate(state, None)
    with FusedProjections(m):
        assert not supports(m, static)  # the kernels add no biases
        m.layers[1].attn.o_proj.bias = None
        assert supports(m, static)
        m.train()  # dropout
        assert not supports(m, static)
        m.eval()
        m.double()  # Triton's products take fp32, bf16 and fp16 here
        assert not supports(m, static)
        m.float()
    m = model(torch.float32)
    with torch.inference_mode():
        _, state = m(torch.randint(0, 61, (1, 3), device=DEVICE), None)
    static = _allocate(state, None)
    assert isinstance(static.layers[0], StaticGLAState)
    assert not supports(m, static)  # outside a FusedProjections context: no joint weights
    with FusedProjections(m):
        assert supports(m, static)
    with pytest.raises(ValueError, match="FusedStep serves"):
        FusedStep(m, static, torch.zeros(1, 1, dtype=torch.long, device=DEVICE))
    if not GPU:  # CPU tensors need the interpreter
        monkeypatch.delenv("TRITON_INTERPRET")
        with FusedProjections(m):
            assert not supports(m, static)


def test_static_decoder_with_the_fused_step_gives_the_plain_steps_logits():
    from gla.decoding import StaticDecoder
    m = model(torch.float32)
    ids = torch.randint(0, 61, (2, 6), device=DEVICE)
    with torch.inference_mode():
        _, state = m(ids[:, :3], None)
        plain = StaticDecoder(m, state, capture=GPU, fused=False)
        fused = StaticDecoder(m, state, capture=GPU, fused=True)
        assert isinstance(fused.run, FusedStep) and not isinstance(plain.run, FusedStep)
        # the default: fused where a captured step runs on CUDA, never on a CPU or uncaptured or compiled
        assert isinstance(StaticDecoder(m, state, capture=GPU).run, FusedStep) == GPU
        assert not isinstance(StaticDecoder(m, state, capture=False).run, FusedStep)
        assert not isinstance(StaticDecoder(m, state, capture=GPU, compiled=True).run, FusedStep)
        for t in range(3, 6):
            a, b = plain.step(ids[:, t]), fused.step(ids[:, t])
            assert rel_err(b, a) <= 1e-5, (t, rel_err(b, a))
        for x, y in zip(plain.buffers, fused.buffers):
            assert rel_err(y.double(), x.double()) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["norm", "head_norm", "swiglu", "res"])
@pytest.mark.parametrize("mma_k,stages", [(64, 1), (64, 3), (None, 1), (None, 3)])
def test_tensor_core_rows_equal_unrolled_rows(dtype, case, mma_k, stages, monkeypatch):
    """rows_mma_kernel (more than ROWS_UNROLLED rows) against row_linear_kernel on the same rows, ROWS_UNROLLED at a
    time, at sizes that leave every tile ragged: K 200 (with steps of 64 along K: four, the last masked), N 75, 18
    rows (two row tiles, the second ragged); K streamed by hand (stages 1) and pipelined."""
    from gla.ops.triton import decode_layer as dl
    if mma_k:
        monkeypatch.setattr(dl, "MMA_K", mma_k)
    monkeypatch.setattr(dl, "MMA_STAGES", stages)
    torch.manual_seed(1)
    M, K, N = 18, 200, 75
    opts = dict(eps=1e-6)
    if case == "norm":
        opts.update(norm=1, nw=1 + 0.1 * torch.randn(K, device=DEVICE, dtype=dtype))
    if case == "head_norm":  # groups of 32 in a K of 128 (with steps of 64: two steps of two groups each)
        K = 128
        opts.update(norm=2, head_dim=32, nw=1 + 0.1 * torch.randn(32, device=DEVICE, dtype=dtype),
                    r=torch.randn(M, K + 5, device=DEVICE, dtype=dtype)[:, 5:])
    if case == "swiglu":
        opts.update(norm=1, nw=1 + 0.1 * torch.randn(K, device=DEVICE, dtype=dtype), swiglu=True)
    if case == "res":
        opts.update(res=torch.randn(M, N + 7, device=DEVICE, dtype=dtype)[:, 7:])  # a row stride of its own
    x = torch.randn(M, K + 3, device=DEVICE, dtype=dtype)[:, 3:]  # strided rows
    w = torch.randn(N * (2 if case == "swiglu" else 1), K, device=DEVICE, dtype=dtype) / K ** 0.5
    mma = torch.full((M, N), float("nan"), device=DEVICE, dtype=dtype)
    dl.row_linear(x, w, mma, **opts)
    rows = torch.full_like(mma, float("nan"))
    for i in range(0, M, dl.ROWS_UNROLLED):
        part = {k: v[i:i + dl.ROWS_UNROLLED] if k in ("r", "res") else v for k, v in opts.items()}
        dl.row_linear(x[i:i + dl.ROWS_UNROLLED], w, rows[i:i + dl.ROWS_UNROLLED], **part)
    if dtype == torch.float32:  # exact products in both, summed in another order
        assert rel_err(mma, rows) <= 1e-6, rel_err(mma, rows)
    else:  # the same fp32 sums rounded at the same points: a sum on a rounding boundary may land one step apart,
        # and SwiGLU's product of two such values one step more
        ulp = torch.nextafter(rows.abs(), torch.tensor(float("inf"), dtype=dtype, device=DEVICE)) - rows.abs()
        diff = (mma - rows).abs()
        assert bool((diff <= 2 * ulp).all()), float((diff - 2 * ulp).max())
        assert float((diff > 0).float().mean()) <= 0.01, float((diff > 0).float().mean())


def test_row_linear_rejects_operands_that_do_not_fit():
    from gla.ops.triton import decode_layer as dl
    x, w, y = (torch.randn(*s, device=DEVICE) for s in ((3, 8), (5, 8), (3, 5)))
    with pytest.raises(TypeError, match="share a dtype"):
        dl.row_linear(x, w.half(), y)
    with pytest.raises(TypeError, match="share a dtype"):
        dl.row_linear(x, w, y.bfloat16())
    for bad in (dict(w=w[:, :7]), dict(w=w.t().contiguous().t()), dict(y=y[:2]), dict(x=x.t().contiguous().t()),
                dict(swiglu=True)):
        args = {"x": x, "w": w, "y": y, **bad}
        with pytest.raises(ValueError, match="do not fit"):
            dl.row_linear(args["x"], args["w"], args["y"], swiglu=bad.get("swiglu", False))


def test_head_norm_rows_with_eps_zero_and_a_partial_step():
    """rows_mma_kernel's head norm where K (three groups of 32) leaves part of its step empty: with eps 0 the empty
    groups' rsqrt is inf, which must not reach the products (it would turn every row into NaN)."""
    from gla.ops.triton import decode_layer as dl
    torch.manual_seed(2)
    M, K, N, D = 18, 96, 40, 32
    x, r = torch.randn(M, K, device=DEVICE), torch.randn(M, K, device=DEVICE)
    w, nw = torch.randn(N, K, device=DEVICE) / K ** 0.5, 1 + 0.1 * torch.randn(D, device=DEVICE)
    y = torch.full((M, N), float("nan"), device=DEVICE)
    dl.row_linear(x, w, y, r=r, nw=nw, norm=2, head_dim=D, eps=0.0)
    xh = x.view(M, K // D, D)
    ref = ((xh * xh.pow(2).mean(-1, keepdim=True).rsqrt() * nw).view(M, K) * torch.nn.functional.silu(r)) @ w.t()
    assert rel_err(y, ref) <= 1e-5, rel_err(y, ref)
