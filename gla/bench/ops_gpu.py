"""GPU operator benchmark (``gla bench ops --device cuda``): ours vs FLA 0.6.0 ``chunk_gla`` vs SDPA causal (flash).

Inputs as the model feeds the operator: bf16 q, k, v ~ randn and the log-gate g = logsigmoid(randn) / 16 in bf16 or
fp32 (the GLA layer's gate is fp32). Times are ``triton.testing.do_bench`` medians in ms, all in one process on one
card; forward+backward = forward plus ``torch.autograd.grad`` of (q, k, v, g) for a random cotangent. SDPA runs at
the same tokens and value width with 128-dim heads (``sdpa_shape``: at H=4, V=256 that is Llama-341M's 8 heads).
The first call of a new shape is timed in a fresh process with an empty Triton cache.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

SHAPES = [(8, 2048, 16, 128, 128), (2, 8192, 16, 128, 128), (1, 32768, 16, 128, 128), (8, 2048, 4, 128, 256),
          (8, 2048, 4, 256, 512)]
GATES = ("bf16", "fp32")
DECODE = (16, 16, 128, 128)  # B, H, K, V of the decode-step row
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEVICE = "cuda"  # the tests smoke-run this module on CPU tensors under the Triton interpreter


def bench(fn, rep=100) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def bench_graph(fn, rep=100) -> float | None:
    """Median ms of ``fn`` replayed from a CUDA graph: device time without the host's launch overhead. None when
    ``fn`` cannot be captured (it reads a value back or allocates by data)."""
    from triton.testing import do_bench_cudagraph
    try:
        return do_bench_cudagraph(fn, rep=rep, return_mode="median")
    except Exception:  # capture refused: report no graph time rather than stop the table
        torch.cuda.synchronize()
        return None


def inputs(B, T, H, K, V, gate="bf16", seed=0):
    """bf16 q, k: [B, T, H, K], v and the cotangent do: [B, T, H, V]; g: [B, T, H, K] in ``gate``'s dtype."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, device=DEVICE, generator=gen, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, T, H, V, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    g = (F.logsigmoid(torch.randn(B, T, H, K, device=DEVICE, generator=gen)) / 16).to(DTYPES[gate])
    for x in (q, k, v, g):
        x.requires_grad_(True)
    return q, k, v, g, torch.randn_like(v)


def ours(q, k, v, g):
    from gla.ops import gated_linear_attention
    return gated_linear_attention(q, k, v, g, backend="triton", check_values=False)[0]


def fla_chunk(q, k, v, g):
    from fla.ops.gla import chunk_gla
    return chunk_gla(q, k, v, g)[0]


def sdpa(q, k, v, g):
    """Causal softmax attention (flash on the GPU); g is not used."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


def sdpa_shape(shape):
    """The softmax layer of the same tokens and value width: heads of min(V, 128) dims (Llama-341M's 8 x 128 beside
    GLA-340M's 4 x 256)."""
    B, T, H, _, V = shape
    D = min(V, 128)
    return B, T, H * V // D, D, D


def baseline(path: str):
    """An older copy of ``gla.ops`` (a package directory, e.g. made with ``git archive``) timed beside the current
    one: its ``triton.triton_gla(q, k, v, g, scale)``."""
    name = os.path.basename(os.path.normpath(path))
    spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    from importlib import import_module
    impl = import_module(f"{name}.triton").triton_gla
    return lambda q, k, v, g: impl(q, k, v, g, q.shape[-1] ** -0.5)[0]


def time_op(op, shape, gate, rep=100):
    """Forward and forward+backward ms of ``op`` at ``shape`` = (B, T, H, K, V), launched eagerly (host overhead
    included where it exceeds the device time) and replayed from a CUDA graph (device time)."""
    q, k, v, g, do = inputs(*shape, gate=gate)

    def fwd():
        with torch.no_grad():
            op(q, k, v, g)

    def step():  # allow_unused: SDPA has no gate
        torch.autograd.grad(op(q, k, v, g), (q, k, v, g), do, allow_unused=True)
    return bench(fwd, rep), bench(step, rep), bench_graph(fwd, rep), bench_graph(step, rep)


def decode_rows(fla: bool, shape=DECODE):
    """Decode step at ``shape`` = (B, H, K, V): ours (new state, in place) and FLA fused_recurrent_gla (T=1), ms."""
    from gla.ops.triton import triton_recurrent_step
    B, H, K, V = shape
    q, k, v = (torch.randn(B, H, D, device=DEVICE, dtype=torch.bfloat16) for D in (K, K, V))
    g = F.logsigmoid(torch.randn(B, H, K, device=DEVICE)) / 16
    s = torch.randn(B, H, K, V, device=DEVICE)
    scale = K ** -0.5
    rows = {"ours decode (new state)": bench(lambda: triton_recurrent_step(q, k, v, g, s, scale)),
            "ours decode (in place)": bench(lambda: triton_recurrent_step(q, k, v, g, s, scale, inplace=True))}
    if fla:
        from fla.ops.gla import fused_recurrent_gla
        a = [x.unsqueeze(1) for x in (q, k, v, g)]
        rows["FLA fused_recurrent_gla decode"] = bench(
            lambda: fused_recurrent_gla(a[0], a[1], a[2], gk=a[3], initial_state=s, output_final_state=True))
    return rows


def stage_rows(shape, gate):
    """Each of our Triton stages alone at ``shape``: {name: (eager ms, None, graph ms, None)}, to see where the
    forward+backward time goes."""
    from gla.ops.triton.chunk_bwd import chunk_bwd
    from gla.ops.triton.chunk_output import chunk_output_fwd
    from gla.ops.triton.chunk_state import chunk_state_bwd, chunk_state_fwd
    from gla.ops.triton.gate import chunk_cumsum
    from gla.ops.triton.utils import chunk_meta
    q, k, v, g, do = (x.detach() for x in inputs(*shape, gate=gate))
    scale = shape[3] ** -0.5
    meta = chunk_meta(shape[0], shape[1], None)
    gc = chunk_cumsum(g, meta)
    hs, _ = chunk_state_fwd(k, v, gc, None, meta, False)
    _, A = chunk_output_fwd(q, k, v, gc, hs, scale, meta, True)
    dhs, _ = chunk_state_bwd(q, gc, do, None, scale, meta, False)
    stages = {"cumsum": lambda: chunk_cumsum(g, meta),
              "state_fwd": lambda: chunk_state_fwd(k, v, gc, None, meta, False),
              "output_fwd": lambda: chunk_output_fwd(q, k, v, gc, hs, scale, meta, True),
              "state_bwd": lambda: chunk_state_bwd(q, gc, do, None, scale, meta, False),
              "dv+dqkg": lambda: chunk_bwd(q, k, v, gc, do, A, hs, dhs, scale, meta, g.dtype)}
    # one launch alone is often shorter than its host overhead: the graph replay is the stage's device time
    return {name: (bench(fn), None, bench_graph(fn), None) for name, fn in stages.items()}


def first_call(shape, gate: str, provider: str = "ours") -> float:
    """Seconds of the first forward+backward at ``shape`` in a fresh process with an empty Triton cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        arg = ",".join(map(str, shape))
        out = subprocess.run([sys.executable, "-m", "gla.bench.ops_gpu", arg, gate, provider], env=env,
                             capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["first_call_s"]


def _first_call_child(shape, gate, provider):
    op = {"ours": ours, "fla": fla_chunk}[provider]
    q, k, v, g, do = inputs(*shape, gate=gate)
    torch.cuda.synchronize()
    t = time.perf_counter()
    torch.autograd.grad(op(q, k, v, g), (q, k, v, g), do)
    torch.cuda.synchronize()
    print(json.dumps({"first_call_s": time.perf_counter() - t}))


def run(shapes=SHAPES, gates=GATES, fla=False, baseline_dir=None, first=False, variants=None, stages=False,
        log=print, decode_shape=DECODE):
    """Rows {op, gate, B, T, H, K, V, fwd_ms, fwd_bwd_ms, fwd_graph_ms, fwd_bwd_graph_ms}; ``log`` gets each row as
    it is measured (a long run that hits a time limit keeps what it printed). ``variants``: {name: CONFIGS overrides}
    timed as extra "ours" rows; ``stages``: each kernel alone too."""
    rows = []

    def add(op, shape, gate, t):
        t = (*t, None, None, None)[:4]  # missing times (no backward, no graph) are None
        rows.append(dict(op=op, gate=gate, **dict(zip("BTHKV", shape)), fwd_ms=t[0], fwd_bwd_ms=t[1],
                         fwd_graph_ms=t[2], fwd_bwd_graph_ms=t[3]))
        log(_row_line(rows[-1]))

    base = baseline(baseline_dir) if baseline_dir else None
    for shape in shapes:
        for gate in gates:
            add("ours", shape, gate, time_op(ours, shape, gate))
            if base is not None:
                add("baseline", shape, gate, time_op(base, shape, gate))
            if fla:
                t0 = time.time()
                time_op(fla_chunk, shape, gate, rep=1)  # FLA autotunes per head dims and dtypes, on its first call
                log(f"(FLA chunk_gla warm-up {shape[2:]} g {gate}: {time.time() - t0:.0f} s)")
                add("FLA chunk_gla", shape, gate, time_op(fla_chunk, shape, gate))
            for name, over in (variants or {}).items():
                with _configs(over):
                    add(f"ours, {name}", shape, gate, time_op(ours, shape, gate))
            if stages:
                for name, t in stage_rows(shape, gate).items():
                    add(f"ours stage {name}", shape, gate, t)
        add("SDPA causal", sdpa_shape(shape), "-", time_op(sdpa, sdpa_shape(shape), "bf16"))
    for name, t in decode_rows(fla, decode_shape).items():
        add(name, (decode_shape[0], 1, *decode_shape[1:]), "fp32", (t,))
    if first:
        for shape in (shapes[0], shapes[-1]):
            add("ours, first call (s)", shape, "fp32", (None, first_call(shape, "fp32")))
    return rows


class _configs:
    """Temporarily override tile configurations (gla.ops.triton.utils.CONFIGS)."""

    def __init__(self, over):
        from gla.ops.triton import utils
        self.configs, self.over = utils.CONFIGS, over

    def __enter__(self):
        self.saved = {k: dict(c) for k, c in self.configs.items()}
        for name, over in self.over.items():  # merged: {"output": {"BK": 64}} keeps output's BV and num_warps
            self.configs[name] = {**self.configs[name], **over}

    def __exit__(self, *exc):
        self.configs.clear()
        self.configs.update(self.saved)


def _fmt(t):
    return "–" if t is None else f"{t:.3f}"


def _row_line(r) -> str:
    return (f"| {r['op']} | {r['gate']} | {r['B']} | {r['T']} | {r['H']} | {r['K']} | {r['V']} | "
            + " | ".join(_fmt(r[key]) for key in ("fwd_ms", "fwd_bwd_ms", "fwd_graph_ms", "fwd_bwd_graph_ms")) + " |")


def header() -> str:
    import triton
    return (f"GLA operator on {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def format_table(rows, title: str) -> str:
    lines = [title, "", "| op | g | B | T | H | K | V | fwd ms | fwd+bwd ms | fwd ms, graph | fwd+bwd ms, graph |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row_line(r) for r in rows]
    ratios = _ratios(rows)
    if ratios:
        lines += ["", "Ratios of the times above, eager launches (CUDA-graph replays in brackets):", "",
                  "| shape | g | fp32-g / bf16-g (ours) fwd, fwd+bwd | FLA / ours fwd, fwd+bwd |", "|---|---|---|---|"]
        lines += ratios
    return "\n".join(lines)


def _ratios(rows):
    """Per shape and gate: our fp32-gate time over our bf16-gate time, and FLA's time over ours."""
    by = {(r["op"], r["gate"], r["B"], r["T"], r["H"], r["K"], r["V"]): r for r in rows}
    out = []
    for (op, gate, *shape), r in by.items():
        if op != "ours":
            continue
        b16 = by.get(("ours", "bf16", *shape))
        fla = by.get(("FLA chunk_gla", gate, *shape))
        gate_ratio = "–" if b16 is None or gate == "bf16" else _ratio(r, b16)
        fla_ratio = "–" if fla is None else _ratio(fla, r)
        out.append(f"| B={shape[0]} T={shape[1]} H={shape[2]} K={shape[3]} V={shape[4]} | {gate} | {gate_ratio} | "
                   f"{fla_ratio} |")
    return out


def _ratio(a, b) -> str:
    """a / b for forward and forward+backward, eager, with the CUDA-graph ratios in brackets where both have them."""
    def one(key):
        return "–" if a[key] is None or b[key] is None else f"{a[key] / b[key]:.2f}"
    return (f"{one('fwd_ms')}, {one('fwd_bwd_ms')} "
            f"({one('fwd_graph_ms')}, {one('fwd_bwd_graph_ms')})")


if __name__ == "__main__":  # the first-call child: python -m gla.bench.ops_gpu B,T,H,K,V GATE PROVIDER
    _first_call_child(tuple(int(x) for x in sys.argv[1].split(",")), sys.argv[2], sys.argv[3])
