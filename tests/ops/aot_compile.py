"""Compile every Triton kernel for the H100 (sm_90) on a machine without a GPU: ``python -m tests.ops.aot_compile``.

The CPU interpreter runs kernels as NumPy code and skips the compiler's checks (types of loop-carried values,
constexpr rules, layouts), so a kernel can pass the interpreter suite and still fail to compile on the GPU. Here each
launcher is run on CPU tensors with ``wrap_triton`` replaced by a recorder, and every launch it would make (the same
arguments, constexprs and launch options, over CASES) is compiled down to a cubin with the ptxas shipped in the
Triton wheel. Triton's launch-time specialisation of integer arguments (== 1, divisible by 16) is not applied, so
the code compiled is that of the general case.
Must run without TRITON_INTERPRET (then ``triton.jit`` gives interpreter functions). Prints one line per kernel.
"""
from __future__ import annotations

import os
import sys

import torch

CASES = [  # (dtype of q/k/v, dtype of g, varlen, initial state, B, H, K, V): B, H and the head dims pick the state
    # kernels' tiles (chunk_state._state_config), 16 x 64 (few programs) to 64 x 64 (many)
    (torch.bfloat16, torch.float32, False, True, 2, 2, 128, 256),
    (torch.bfloat16, torch.float32, False, False, 8, 4, 128, 128),
    (torch.bfloat16, torch.float32, False, False, 8, 8, 128, 128),
    (torch.bfloat16, torch.bfloat16, True, False, 2, 2, 64, 128),
    (torch.float32, torch.float32, False, False, 2, 2, 60, 100),
    (torch.float16, torch.float32, True, True, 2, 2, 256, 512),
]
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64"}


class Recorder:
    """Stands in for ``torch.library.wrap_triton``: ``wrap_triton(kernel)[grid](*args, **kwargs)`` records."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        return _Grid(self, kernel)


class _Grid:
    def __init__(self, rec, kernel):
        self.rec, self.kernel = rec, kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.rec.launches.append((self.kernel, args, kwargs))


def record() -> list:
    """Run every launcher (forward, backward, decode) over CASES; returns the launches."""
    from gla.ops.triton import chunk_bwd, chunk_output, chunk_state, decode, decode_layer, gate
    from gla.ops.triton.utils import chunk_meta
    rec = Recorder()
    for mod in (chunk_bwd, chunk_output, chunk_state, decode, decode_layer, gate):
        mod.wrap_triton = rec
    _record_decode_layer(decode_layer)
    T = 150
    for dtype, g_dtype, varlen, h0, B, H, K, V in CASES:
        q, k = (torch.randn(B, T, H, K, dtype=dtype) for _ in range(2))
        v, do = (torch.randn(B, T, H, V, dtype=dtype) for _ in range(2))
        g = torch.randn(B, T, H, K).to(g_dtype)
        cu = torch.tensor([0, 40, 41, B * T], dtype=torch.int32) if varlen else None
        if varlen:
            q, k, v, do, g = (x.reshape(1, B * T, H, -1) for x in (q, k, v, do, g))
        meta = chunk_meta(q.shape[0], q.shape[1], cu)
        state = torch.randn(meta.N, H, K, V) if h0 else None
        gc = gate.chunk_cumsum(g, meta)
        hs = torch.zeros(meta.n_slots, H, K, V)
        chunk_state.chunk_state_fwd(k, v, gc, state, meta, output_final_state=True)
        A = chunk_output.chunk_output_fwd(q, k, v, gc, hs, 0.1, meta, store_A=True)[1]
        chunk_state.chunk_state_bwd(q, gc, do, state, 0.1, meta, need_dh0=h0)
        dhs = torch.zeros(meta.NC, H, K, V)
        chunk_bwd.chunk_bwd(q, k, v, gc, do, A, hs, dhs, 0.1, meta, g.dtype)
        decode._launch(q[:, 0], k[:, 0], v[:, 0], g[:, 0].float(), torch.zeros(q.shape[0], H, K, V),
                       torch.zeros(q.shape[0], H, K, V), 0.1)
    return rec.launches


def _record_decode_layer(dl) -> None:
    """The fused decoding step's launches (programmatic dependent launch on) at gla-340m's shapes, bf16 at 1 row (the
    unrolled kernel), 16 and 64 (tensor cores), fp32 at 16, and at gla-1.3b's in bf16: input projections with the
    norm, the gated GLA step, the output projection with the gated head norm and the residual, SwiGLU, the down
    projection (K not a power of two: 2816 and 5632), the head."""
    R = 16
    for (d, dk, dv, ff, heads), runs in (
            ((1024, 512, 1024, 2816, 4), ((1, torch.bfloat16), (16, torch.bfloat16), (64, torch.bfloat16),
                                          (16, torch.float32))),
            ((2048, 1024, 2048, 5632, 4), ((1, torch.bfloat16), (16, torch.bfloat16), (64, torch.bfloat16)))):
        hk, hv = dk // heads, dv // heads
        for M, dt in runs:
            x = torch.randn(M, d, dtype=dt)
            p = torch.randn(M, 2 * dk + 2 * dv + R, dtype=dt)
            o, h = torch.randn(M, dv, dtype=dt), torch.randn(M, ff, dtype=dt)
            w = torch.randn(d, dtype=dt)
            dl.row_linear(x, torch.randn(p.shape[1], d, dtype=dt), p, nw=w, norm=1, eps=1e-6, pdl=True)
            dl.gated_step(p, torch.randn(dk, R, dtype=dt), torch.randn(dk, dtype=dt),
                          torch.zeros(M * heads, hk, hv), o, heads=heads, head_k=hk, head_v=hv,
                          offsets=(dk, 2 * dk, 2 * dk + dv), scale=0.1, normalizer=16.0, pdl=True)
            dl.row_linear(o, torch.randn(d, dv, dtype=dt), x, res=x, r=p[:, -dv:], nw=w[:hv], norm=2,
                          head_dim=hv, eps=1e-6, pdl=True)
            dl.row_linear(x, torch.randn(2 * ff, d, dtype=dt), h, nw=w, norm=1, swiglu=True, eps=1e-6,
                          pdl=True)
            dl.row_linear(h, torch.randn(d, ff, dtype=dt), x, res=x, pdl=True)
            dl.row_linear(x, torch.randn(32000, d, dtype=dt), torch.empty(M, 32000, dtype=dt),
                          nw=w, norm=1, eps=1e-6, pdl=True)


def _arg_type(x):
    if isinstance(x, torch.Tensor):
        return "*" + TYPES[x.dtype]
    if isinstance(x, bool):
        return "i1"
    if isinstance(x, int):
        return "i32" if -2**31 <= x < 2**31 else "i64"
    if isinstance(x, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(x).__name__}")


def compile_launch(kernel, args, kwargs):
    """Compile one recorded launch for sm_90; returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    options = {name: kwargs[name] for name in ("num_warps", "num_stages", "launch_pdl") if name in kwargs}
    values = dict(zip(kernel.arg_names, args))
    values.update({name: x for name, x in kwargs.items() if name not in options})
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        x = values[p.name]
        if p.is_constexpr or x is None:  # None arguments are constexprs to Triton's launcher as well
            signature[p.name] = "constexpr"
            constexprs[(i,)] = x
        else:
            signature[p.name] = _arg_type(x)
            # the launcher's specialisation: 16-byte aligned pointers and multiples of 16 are known as such, which
            # lets the compiler pipeline loads through shared memory (without it, a kernel's shared memory here
            # was 164 KiB where the GPU asked for 228)
            aligned = x.data_ptr() % 16 == 0 if isinstance(x, torch.Tensor) else (
                isinstance(x, int) and not isinstance(x, bool) and x % 16 == 0)
            if aligned and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def resources(cubin: bytes) -> str:
    """Registers, spill stack and shared memory of a cubin, from the cuobjdump shipped with Triton."""
    import subprocess
    import tempfile

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return " ".join(w for w in out.split() if w.startswith(("REG:", "STACK:", "SHARED:")))


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("run without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    seen = set()
    for kernel, args, kwargs in record():
        key = (kernel.__name__, tuple(_arg_type(a) if a is not None and not isinstance(a, bool) else a
                                      for a in args), tuple(sorted(kwargs.items())))
        if key in seen:
            continue
        seen.add(key)
        compiled = compile_launch(kernel, args, kwargs)
        # SMEM: the dynamic shared memory the launch asks for (cuobjdump's SHARED counts only the static part)
        print(f"{kernel.__name__}: {resources(compiled.asm['cubin'])} SMEM:{compiled.metadata.shared} "
              f"({', '.join(f'{k}={v}' for k, v in sorted(kwargs.items()))})")
    print(f"compiled {len(seen)} launches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
