"""The compiled CPU forward and backward (csrc/chunk_fwd.cpp, csrc/chunk_bwd.cpp): built on first use with the
machine's C++ compiler against the installed torch, cached, and loaded as the operators
``torch.ops.gla_cpu.chunk_forward`` and ``torch.ops.gla_cpu.chunk_backward``.

Why compiled: the PyTorch chunk path spends as long between its products (copies into the chunk layout, the gate
exponentials, the state chain, Python) as in them; one C++ task per (sequence, head) keeps a chunk's operands in
the core's cache and calls the BLAS that torch links directly. Measured in benchmarks/NOTES.md. The chunk
operators of gla/ops/chunk.py call these wherever ``serves`` says so, and their PyTorch code otherwise.

Nothing here is required: without a compiler, off x86-64 Linux, or with GLA_CPU_KERNELS=0,
``available()`` is False and the PyTorch path runs (``status()`` says why). The build writes to a temporary file
and renames it into place, so concurrent processes and interrupted builds never load a partial library.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / f"{name}.cpp" for name in ("chunk_fwd", "chunk_bwd", "swiglu", "gated_norm", "rms_norm")]
HEADERS = [CSRC / "common.h"]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c++20", "-w"]
_state: dict = {"off": False}  # and "ok": bool, "why": str once the first call decided


def _cpu_id() -> str:
    """What -march=native compiles for: the library built on one CPU model must not load on another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keys = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in keys}))


def _cache_dir() -> Path:
    root = os.environ.get("GLA_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "gla")
    return Path(root).expanduser() / "cpu_kernels"


def _build(compiler: str, target: Path) -> None:
    """Compiles the sources side by side (one process each), links them, and renames the library into place."""
    torch_dir = Path(torch.__file__).parent
    inc, lib = torch_dir / "include", torch_dir / "lib"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objs = [Path(tmp) / f"{src.stem}.o" for src in SOURCES]
        jobs = [subprocess.Popen([compiler, *FLAGS, "-c", f"-I{inc}", f"-I{inc / 'torch/csrc/api/include'}",
                                  str(src), "-o", str(obj)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for src, obj in zip(SOURCES, objs)]
        errors = [err for job in jobs for _, err in [job.communicate(timeout=600)] if job.returncode != 0]
        if errors:
            raise RuntimeError(f"{compiler} failed:\n{errors[0][-2000:]}")
        so = Path(tmp) / target.name
        link = [compiler, "-shared", "-fopenmp", *map(str, objs), "-o", str(so), f"-L{lib}", "-lc10", "-ltorch_cpu",
                "-lgomp", f"-Wl,-rpath,{lib}"]
        out = subprocess.run(link, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(link)} failed:\n{out.stderr[-2000:]}")
        os.replace(so, target)


def _load() -> tuple[bool, str]:
    if os.environ.get("GLA_CPU_KERNELS", "1") == "0":
        return False, "disabled by GLA_CPU_KERNELS=0"
    # x86-64 Linux only: there torch links MKL, whose 32-bit-integer sgemm_ the kernels call, and its own libgomp
    if (sys.platform != "linux" or platform.machine() != "x86_64"
            or not (Path(torch.__file__).parent / "lib" / "libgomp.so.1").exists()):
        return False, "the compiled CPU kernels are built on x86-64 Linux against torch's OpenMP runtime only"
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return False, "no C++ compiler found (set CXX)"
    parts = [*(p.read_text() for p in SOURCES + HEADERS), torch.__version__, compiler, " ".join(FLAGS), _cpu_id()]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    target = _cache_dir() / f"gla_cpu-{key}.so"
    try:
        if not target.exists():
            print(f"gla: compiling the CPU kernels into {target} (once, about 10 s)", file=sys.stderr)
            _build(compiler, target)
        if not _registered():  # a second registration of the same operator library aborts the process
            torch.ops.load_library(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return False, f"could not build or load the CPU kernels: {e}"
    return True, f"loaded from {target}"


def _registered() -> bool:
    try:
        torch.ops.gla_cpu.chunk_forward
    except (AttributeError, RuntimeError):
        return False
    return True


def available() -> bool:
    """Whether the ``torch.ops.gla_cpu`` operators can run (built and loaded on the first call)."""
    if "ok" not in _state:
        _state["ok"], _state["why"] = _load()
    return _state["ok"]


def status() -> str:
    available()
    return _state["why"]


def serves(*tensors: torch.Tensor) -> bool:
    """Whether the compiled forward takes these inputs: CPU tensors of a 32- or 16-bit float type (float64 keeps the
    PyTorch path and its float64 state)."""
    return (not _state["off"] and available()
            and all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16, torch.float16)
                    for t in tensors))


@contextlib.contextmanager
def switched_off():
    """The PyTorch chunk path for the calls inside (benchmarks time both in one run)."""
    before, _state["off"] = _state["off"], True
    try:
        yield
    finally:
        _state["off"] = before


def chunk_forward(q, k, v, g, h0, cu_seqlens, scale: float, state_rows: int = 0):
    """q, k, g: [B, T, H, K]; v: [B, T, H, V] (float32, bfloat16 or float16, any strides: read in place);
    h0: [N, H, K, V] or None; cu_seqlens: [N + 1] or None -> o [B, T, H, V] in v's dtype, final states [N, H, K, V]
    float32, and with state_rows > 0 the states entering each chunk [state_rows, H, K, V] float32 (else empty)."""
    h0 = h0.to(torch.float32).contiguous() if h0 is not None else None
    cu = cu_seqlens.to(torch.int64).contiguous() if cu_seqlens is not None else None
    return torch.ops.gla_cpu.chunk_forward(*(_rows(x) for x in (q, k, v, g)), h0, cu, float(scale), int(state_rows))


def chunk_backward(q, k, v, g, do, hs, dfinal, cu_seqlens, scale: float):
    """The gradients of ``chunk_forward``'s outputs from the per-chunk states hs it kept; do [B, T, H, V] and
    dfinal [N, H, K, V] may be None (no gradient through o or through the final states). Returns dq, dk, dv, dg
    [B, T, H, *] in the inputs' dtypes and dh0 [N, H, K, V] float32."""
    do = _rows(do) if do is not None else torch.zeros(v.shape, dtype=v.dtype)
    dfinal = dfinal.to(torch.float32).contiguous() if dfinal is not None else None
    cu = cu_seqlens.to(torch.int64).contiguous() if cu_seqlens is not None else None
    return torch.ops.gla_cpu.chunk_backward(*(_rows(x) for x in (q, k, v, g)), do, hs.contiguous(), dfinal, cu,
                                            float(scale))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as the operators read it: any strides (broadcast ones too) but a contiguous last dim, else a copy."""
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


class EagerChunk(torch.autograd.Function):
    """``chunk_forward`` and ``chunk_backward`` as one differentiable call, for eager training on the CPU:
    (q, k, v, g, h0, cu_seqlens, scale, state_rows) -> (o in v's dtype, final states float32).

    The same computation as the operator ``gla::chunk_fwd`` with its registered backward (which torch.compile and
    export need), without torch.library's dispatch around it: at nanoGPT's recipe (B=12 T=64 H=4 K=16 V=32) that
    dispatch cost ~180 us of each layer's ~660 us forward and backward (benchmarks/NOTES.md)."""

    @staticmethod
    def forward(ctx, q, k, v, g, h0, cu_seqlens, scale: float, state_rows: int):
        o, final, hs = chunk_forward(q, k, v, g, h0, cu_seqlens, scale, state_rows=state_rows)
        ctx.save_for_backward(q, k, v, g, hs, cu_seqlens)
        ctx.scale, ctx.h0_dtype = scale, None if h0 is None else h0.dtype
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, g, hs, cu_seqlens = ctx.saved_tensors
        dq, dk, dv, dg, dh0 = chunk_backward(q, k, v, g, do, hs, dfinal, cu_seqlens, ctx.scale)
        dh0 = dh0.to(ctx.h0_dtype) if ctx.h0_dtype is not None else None
        return dq, dk, dv, dg, dh0, None, None, None


def trains_eagerly(*xs: torch.Tensor) -> bool:
    """Whether a model should run the fused glue below (``swiglu``, ``gated_rms_norm``, ``rms_norm_bf16``) on xs:
    float32 or bfloat16
    CPU tensors of one dtype in eager training (where autograd then keeps the inputs, not each intermediate).
    Inference keeps torch's operators, so that a static decoder's step equals the model's own step bit for bit; so
    does torch.compile, which fuses them itself and may recompute their results in the backward instead of keeping
    them (``partitioning``), which it cannot do with an opaque operator."""
    return (all(x.device.type == "cpu" and x.dtype == xs[0].dtype for x in xs)
            and xs[0].dtype in (torch.float32, torch.bfloat16) and torch.is_grad_enabled()
            and not _state["off"] and not torch.compiler.is_compiling() and available())


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """y [..., 2F], the joint output of SwiGLU's gate and up projections -> silu(y[..., :F]) * y[..., F:] [..., F],
    differentiable, one pass each way (csrc/swiglu.cpp); y is made contiguous."""
    return _SwiGLU.apply(y.contiguous())


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        ctx.save_for_backward(y)
        return torch.ops.gla_cpu.swiglu_forward(y)

    @staticmethod
    def backward(ctx, dh):
        (y,) = ctx.saved_tensors
        return torch.ops.gla_cpu.swiglu_backward(dh.to(y.dtype), y)


def gated_rms_norm(o: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The GLA layer's output: RMSNorm of each head's o (weight [V], float32) times swish(r), differentiable, one pass
    each way (csrc/gated_norm.cpp). o: [B, T, H, V]; r: [B, T, H * V] (o's dtype, e.g. a slice of the layer's joint
    projection). Returns [B, T, H, V] in o's dtype."""
    B, T, H, V = o.shape
    return _GatedNorm.apply(o.reshape(B * T, H, V).contiguous(), r.reshape(B * T, H * V), weight.float(),
                            eps).view(B, T, H, V)


class _GatedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, r, weight, eps: float):
        r = r if r.stride(-1) == 1 else r.contiguous()
        y, rstd = torch.ops.gla_cpu.gated_norm_forward(o, r, weight, eps)
        ctx.save_for_backward(o, r, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        o, r, weight, rstd = ctx.saved_tensors
        do, dr, dw = torch.ops.gla_cpu.gated_norm_backward(dy.to(o.dtype), o, r, weight, rstd)
        return do, dr, dw, None


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of float32 x [..., D] (weight [D]) straight into bfloat16, differentiable (csrc/rms_norm.cpp): what
    the next matmul reads under bf16 autocast, without the float32 result and autocast's copy of it."""
    shape = x.shape
    return _RMSNormBF16.apply(x.reshape(-1, shape[-1]).contiguous(), weight.float(), eps).view(shape)


class _RMSNormBF16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        y, rstd = torch.ops.gla_cpu.rms_norm_bf16_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = torch.ops.gla_cpu.rms_norm_bf16_backward(dy.to(torch.bfloat16), x, weight, rstd)
        return dx, dw, None
