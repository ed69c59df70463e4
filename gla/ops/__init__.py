"""The GLA operator: one entry point, input validation, backend choice.

Layout and semantics follow FLA's ``chunk_gla`` so ``gated_linear_attention`` is a drop-in replacement; the math
is in ``recurrent.py`` (reference) and ``chunk.py`` (chunkwise form).
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import re
import warnings

import torch

from gla.device import constant_to_compiler

from .recurrent import recurrent_gla, recurrent_step, recurrent_step_, state_dtype

__all__ = ["gated_linear_attention", "decode_step_", "recurrent_step", "validate_cu_seqlens", "BACKENDS"]

BACKENDS = ("auto", "recurrent", "chunk", "triton", "pairwise")
G_FLOOR = -110.0
"""The chunked backends read log-gates below this as this when they compute in float32 (chunk and pairwise through
``_floored``, Triton in its cumulative-sum kernel at no cost): exp(-110) is 0 in float32 (below its smallest
subnormal, exp(-103.3)), so no float32 result changes, while far smaller finite gates no longer break the chunk's
sums of gates (relative error 1e-4 at -1e4 per entry, wrong results from -1e30, NaN once a sum overflows float32).
In float64 the floor is G_FLOOR_FP64, past its underflow (exp(-745)). NaN gates stay NaN."""
G_FLOOR_FP64 = -750.0
TRITON_RANGE = ((3, 6), (3, 10))  # Triton versions the kernels are tested on: 3.6 (GPU image) to 3.9, [lo, hi)


_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps", "hpu")


def no_autocast(device_type: str):
    """A context with autocast off for ``device_type`` (a no-op for devices without autocast, e.g. meta). A fixed
    list, not ``torch.amp.is_autocast_available``: Dynamo cannot trace that call, and this runs inside compiled
    models."""
    if device_type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter (TRITON_INTERPRET=1, tests)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _check_cu_seqlens_layout(cu_seqlens) -> None:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor of N+1 >= 2 offsets")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")


def validate_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    """cu_seqlens: [N+1] integer offsets, 0 first, non-decreasing (empty sequences allowed), ``total`` last.

    Reads the offsets, so on a GPU it waits for them: callers validate once per batch, not once per layer. Inside
    torch.compile or a CUDA-graph capture no value can be read back, so there only the layout is checked: validate
    the batch before it reaches a compiled or captured model.
    """
    _check_cu_seqlens_layout(cu_seqlens)
    if not _values_readable(cu_seqlens):
        return
    offs = cu_seqlens.tolist()
    if offs[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offs[0]}")
    if any(b < a for a, b in zip(offs, offs[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")
    if offs[-1] != total:
        raise ValueError(f"cu_seqlens must end at the sequence length T={total}, got {offs[-1]}")


def _values_readable(x: torch.Tensor) -> bool:
    """False inside torch.compile tracing or a CUDA-graph capture, where reading a value back is impossible."""
    return not (torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()))


def _gate_ok(g: torch.Tensor) -> bool:
    """One pass over g: every value finite and <= 0 (NaN fails both comparisons)."""
    lo, hi = torch.aminmax(g.detach())
    return bool((hi <= 0) & (lo > float("-inf")))


def _validate(q, k, v, g, scale, initial_state, cu_seqlens, backend, check_values):
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, H, D], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if g.shape != q.shape:
        raise ValueError(f"g must have q's shape {tuple(q.shape)}, got {tuple(g.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with B, T, H of q {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but q has {q.dtype}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (numbers.Real, torch.SymFloat))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if K == 0 or V == 0 or H == 0:
        raise ValueError(f"head dims must be non-empty, got H={H}, K={K}, V={V}")
    check_values = check_values and _values_readable(q)
    if check_values and g.numel() and not _gate_ok(g):
        raise ValueError("g is a log forget gate and must be finite and <= 0 everywhere "
                         "(e.g. F.logsigmoid(x) / normalizer); got positive, NaN or infinite values")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens requires a packed batch with B == 1, got B={B}")
        if check_values:
            validate_cu_seqlens(cu_seqlens, T)
        else:
            _check_cu_seqlens_layout(cu_seqlens)
        N = cu_seqlens.numel() - 1
    else:
        N = B
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or not initial_state.is_floating_point():
            raise ValueError("initial_state must be a floating-point tensor [N, H, K, V]")
        if tuple(initial_state.shape) != (N, H, K, V):
            raise ValueError(f"initial_state must have shape [N, H, K, V] = {(N, H, K, V)}, "
                             f"got {tuple(initial_state.shape)}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")


def gated_linear_attention(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, backend="auto", check_values=True):
    """Gated linear attention (Yang et al. 2024): S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t.

    q, k, g: [B, T, H, K]; v: [B, T, H, V]; g is the log forget gate (<= 0).
    scale: defaults to K ** -0.5.
    initial_state: [N, H, K, V] (N = B, or the number of sequences with cu_seqlens), float32 recommended.
    output_final_state: also return the state after the last token, [N, H, K, V] float32.
    cu_seqlens: [N+1] int offsets of packed sequences (B must be 1); no state crosses a boundary.
    backend: "auto" (triton on CUDA when installed, else the recurrent step for T == 1 and chunk otherwise),
        "recurrent"
        (fp32 reference), "chunk" (chunkwise PyTorch, any device), "triton" (GPU kernels), "pairwise" (one block
        in plain tensor ops, exported by ``gla export``; short inputs only, no cu_seqlens).
    check_values: False skips the two checks that read tensor values (g finite and <= 0; cu_seqlens well formed),
        each of which makes the host wait for the GPU (they are skipped anyway inside torch.compile and CUDA-graph
        capture, which cannot read values). For callers that build g themselves (logsigmoid is <= 0) and
        have validated cu_seqlens once per batch, as the GLA layer and model do; shapes are always checked.
    Returns (o [B, T, H, V] in v's dtype, final_state or None). Differentiable in q, k, v, g and initial_state.
    Raises ValueError naming the argument on malformed input.
    """
    _validate(q, k, v, g, scale, initial_state, cu_seqlens, backend, check_values)
    # The operator controls its own precision (fp32 states and accumulation, o in v's dtype): under autocast the
    # chunk backend's products would otherwise run in bf16 and keep bf16 states for the backward.
    with no_autocast(q.device.type):
        return _dispatch(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, backend)


class _BroadcastFloor(torch.autograd.Function):
    """clamp_min of a broadcast gate (stride 0 along some dims, e.g. a fixed decay expanded over batch and time),
    computed where it is stored and expanded again instead of materialised; each element's gradient passes where
    it is not below the floor, as clamp_min's would."""

    @staticmethod
    def forward(ctx, g, floor: float):
        compact = g
        for d in range(g.dim()):
            if g.stride(d) == 0 and g.shape[d] > 1:
                compact = compact.narrow(d, 0, 1)
        ctx.save_for_backward(g)
        ctx.floor = floor
        return compact.clamp_min(floor).expand(g.shape)

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        return grad.masked_fill(g < ctx.floor, 0), None


def _floored(g: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """g with entries below the floor for ``compute`` (the backend's accumulation dtype, state_dtype) raised to it
    (differentiable; NaN stays NaN); a broadcast gate stays broadcast."""
    floor = G_FLOOR_FP64 if compute == torch.float64 else G_FLOOR
    if 0 in g.stride():
        return _BroadcastFloor.apply(g, floor)
    return g.clamp_min(floor)


def _dispatch(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, backend):
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend == "auto":
        if q.device.type == "cuda" and triton_status() is None:
            backend = "triton"
        else:
            if q.device.type == "cuda":
                _warn_once(f"gla: using the PyTorch chunk path on CUDA (slower, and not capturable in CUDA graphs): "
                           f"{triton_status()}")
            backend = "recurrent" if q.shape[1] == 1 else "chunk"
    if backend == "triton":
        if triton_status() is not None:
            raise RuntimeError(f'backend="triton": {triton_status()}')
        if not _triton_usable(q.device):
            raise ValueError(f'backend="triton" needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}')
        if _is_decode_step(q, k, v, g, initial_state, cu_seqlens):
            return _triton_decode(q, k, v, g, float(scale), initial_state, output_final_state)
        from .triton import triton_gla  # floors g in its cumulative-sum kernel (triton/gate.py)
        return triton_gla(q, k, v, g, float(scale), initial_state, output_final_state, cu_seqlens)
    if backend == "chunk":
        from .chunk import chunk_gla as impl
    elif backend == "pairwise":
        from .pairwise import pairwise_gla as impl
    else:  # step by step: no sums of gates to lose precision in
        return recurrent_gla(q, k, v, g, float(scale), initial_state, output_final_state, cu_seqlens)
    return impl(q, k, v, _floored(g, state_dtype(q.dtype)), float(scale), initial_state, output_final_state,
                cu_seqlens)


def wants_grad(*tensors) -> bool:
    """Whether autograd will want gradients of any of these tensors (None entries ignored)."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)


def _is_decode_step(q, k, v, g, initial_state, cu_seqlens) -> bool:
    """One token per sequence with no gradient wanted: generation's step, served by the decode kernel."""
    return q.shape[1] == 1 and cu_seqlens is None and not wants_grad(q, k, v, g, initial_state)


def decode_step_(q, k, v, g, state, scale: float | None = None):
    """One decoding token per row, the state updated in place: S = diag(exp(g)) S + k^T v, o = scale q S.

    q, k, g: [B, H, K]; v: [B, H, V]; state: [B, H, K, V] float32 (float64 beside float64 inputs), contiguous,
    overwritten with the new state (no allocation, one read and one write of it: what a static decoder captured in a
    CUDA graph needs). scale: defaults to K ** -0.5. Returns o [B, H, V] in v's dtype (the Triton kernel on CUDA when
    it can run, else the reference step). Not differentiable; shapes and dtypes are checked, values are not.
    """
    tensors = (q, k, v, g, state)
    if not all(isinstance(x, torch.Tensor) for x in tensors) or any(x.dim() != 3 for x in tensors[:4]):
        raise ValueError("decode_step_ needs tensors q, k, g [B, H, K], v [B, H, V] and state [B, H, K, V], got "
                         + ", ".join(str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
                                     for x in tensors))
    if not all(x.is_floating_point() for x in tensors):
        raise ValueError(f"decode_step_ needs floating-point tensors, got {[x.dtype for x in tensors]}")
    B, H, K = q.shape
    if k.shape != q.shape or g.shape != q.shape or v.shape[:2] != (B, H):
        raise ValueError(f"decode_step_ needs q, k, g [B, H, K] and v [B, H, V], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(g.shape)}, {tuple(v.shape)}")
    if (state.shape != (B, H, K, v.shape[-1]) or state.dtype not in (torch.float32, torch.float64)
            or not state.is_contiguous()):
        raise ValueError(f"decode_step_ needs a contiguous float32 or float64 state {(B, H, K, v.shape[-1])}, "
                         f"got {state.dtype} {tuple(state.shape)}")
    if any(x.device != state.device for x in (q, k, v, g)):
        raise ValueError("decode_step_ needs q, k, v, g and the state on one device")
    scale = K ** -0.5 if scale is None else float(scale)
    if state.device.type == "cuda" and state.dtype == torch.float32 and triton_status() is None:
        from .triton import triton_recurrent_step
        return triton_recurrent_step(q, k, v, g, state, scale, inplace=True)[0]
    return recurrent_step_(q, k, v, g, state, scale).to(v.dtype)


def _triton_decode(q, k, v, g, scale, initial_state, output_final_state):
    """q, k, g: [B, 1, H, K]; v: [B, 1, H, V] -> (o [B, 1, H, V], state [B, H, K, V] or None): one read and one
    write of the state (gla.ops.triton.decode)."""
    from .triton import triton_recurrent_step

    B, _, H, K = q.shape
    h0 = initial_state if initial_state is not None else q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32)
    o, state = triton_recurrent_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], h0, scale)
    return o.unsqueeze(1), state if output_final_state else None


_TRITON_STATUS: list = []  # filled on first use: [None] if the kernels can run, else [why not]
_WARNED: set = set()


@constant_to_compiler  # traced as its value: torch 2.11's dynamo broke the graph on the check's regex
def triton_status() -> str | None:
    """None when gla's Triton kernels can run with the installed Triton, else one line saying why not and what to
    install. Checked once per process: an unsupported version gets this message, never a crash inside a kernel."""
    if not _TRITON_STATUS:
        _TRITON_STATUS.append(_check_triton())
    return _TRITON_STATUS[0]


def _check_triton() -> str | None:
    lo, hi = TRITON_RANGE
    want = f"triton>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}"
    try:
        import triton
    except ImportError:
        return f'the triton package is not installed: pip install "gla[triton]" ({want})'
    version = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])
    if not lo <= version < hi:
        return f"triton {triton.__version__} is not supported by gla's kernels: pip install \"{want}\""
    try:
        from . import triton as _  # noqa: F401
    except ImportError as e:
        return f"gla's Triton kernels failed to import ({e})"
    return None


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
