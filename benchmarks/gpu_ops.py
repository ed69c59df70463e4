"""GPU benchmark of the GLA operator: ours (Triton) vs FLA 0.6.0 (chunk_gla, fused_recurrent_gla) vs SDPA causal.

bf16, q, k, v ~ randn, g = logsigmoid(randn) / 16 (as in ../shared/ANCHORS.md); times are triton.testing.do_bench
medians in ms; forward+backward = forward plus torch.autograd.grad of (q, k, v, g) for a random cotangent.

    python benchmarks/gpu_ops.py [--fla] [--fla-big] [--stages] [--variants] [--first-call]
        [--shape B,T,H,K,V ...] [--out DIR]

--fla: FLA at the K=V=128 shapes (its first call autotunes for minutes; each shape is warmed once, untimed);
--fla-big: FLA also at H=4, K=256, V=512 (cold autotune > 7 min); --stages: each of our kernels alone;
--variants: our fwd+bwd under alternative tile configurations (gla.ops.triton.utils.CONFIGS);
--first-call: wall time of our first fwd+bwd call in a fresh process with an empty Triton cache;
--shape (repeatable): time these shapes instead of SHAPES (e.g. FLA's cold K=256 autotune in a call of its own).
Results are printed as a markdown table (and the raw rows written to DIR/results.json with --out).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = [(8, 2048, 16, 128, 128), (2, 8192, 16, 128, 128), (1, 32768, 16, 128, 128), (8, 2048, 4, 256, 512)]
DECODE = (16, 16, 128, 128)
VARIANTS = {  # name -> CONFIGS overrides
    "state 64x64/8w": {"state": dict(BK=64, BV=64, num_warps=8)},
    "mid 32x32/4w": {"state_mid": dict(BK=32, BV=32, num_warps=4)},
    "small 16x32/4w": {"state_small": dict(BK=16, BV=32, num_warps=4)},
    "small 32x32/4w": {"state_small": dict(BK=32, BV=32, num_warps=4)},
    "output 32x64/4w": {"output": dict(BK=32, BV=64, num_warps=4)},
    "output 32x128/4w": {"output": dict(BK=32, BV=128, num_warps=4)},
    "dv 32x64/4w": {"dv": dict(BK=32, BV=64, num_warps=4)},
    "dqkg 64x64/8w": {"dqkg": dict(BK=64, BV=64, num_warps=8)},
    "dqkg 16x64/4w": {"dqkg": dict(BK=16, BV=64, num_warps=4)},
}


def bench(fn, rep=100):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def inputs(B, T, H, K, V, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, T, H, V, device="cuda", generator=gen, dtype=torch.bfloat16)
    g = (F.logsigmoid(torch.randn(B, T, H, K, device="cuda", generator=gen)) / 16).to(torch.bfloat16)
    for x in (q, k, v, g):
        x.requires_grad_(True)
    return q, k, v, g, torch.randn_like(v)


def ours(q, k, v, g):
    from gla.ops.triton import triton_gla
    return triton_gla(q, k, v, g, q.shape[-1] ** -0.5)[0]


def fla_chunk(q, k, v, g):
    from fla.ops.gla import chunk_gla
    return chunk_gla(q, k, v, g)[0]


def fla_recurrent(q, k, v, g):
    from fla.ops.gla import fused_recurrent_gla
    return fused_recurrent_gla(q, k, v, gk=g)[0]


def sdpa(q, k, v, g):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


def time_op(op, shape, fwd_only=False, rep=100):
    q, k, v, g, do = inputs(*shape)
    with torch.no_grad():
        t_fwd = bench(lambda: op(q, k, v, g), rep)
    if fwd_only:
        return t_fwd, None

    def step():  # allow_unused: SDPA has no gate
        torch.autograd.grad(op(q, k, v, g), (q, k, v, g), do, allow_unused=True)
    return t_fwd, bench(step, rep)


def stage_times(shape):
    """Each of our kernels alone (same inputs), to see where the fwd+bwd time goes."""
    from gla.ops.triton.chunk_bwd import chunk_bwd
    from gla.ops.triton.chunk_output import chunk_output_fwd
    from gla.ops.triton.chunk_state import chunk_state_bwd, chunk_state_fwd
    from gla.ops.triton.utils import chunk_meta
    q, k, v, g, do = (x.detach() for x in inputs(*shape))
    scale = shape[3] ** -0.5
    meta = chunk_meta(shape[0], shape[1], None)
    hs, _ = chunk_state_fwd(k, v, g, None, meta, False)
    o, A = chunk_output_fwd(q, k, v, g, hs, scale, meta, True)
    dhs, _ = chunk_state_bwd(q, g, do, None, scale, meta, False)
    return {
        "state_fwd": bench(lambda: chunk_state_fwd(k, v, g, None, meta, False)),
        "output_fwd": bench(lambda: chunk_output_fwd(q, k, v, g, hs, scale, meta, True)),
        "state_bwd": bench(lambda: chunk_state_bwd(q, g, do, None, scale, meta, False)),
        "dv+dqkg_bwd": bench(lambda: chunk_bwd(q, k, v, g, do, A, hs, dhs, scale, meta)),
    }


def decode_times():
    from gla.ops.triton import triton_recurrent_step
    B, H, K, V = DECODE
    q, k, g = (torch.randn(B, H, K, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = F.logsigmoid(g.float()).div(16).to(torch.bfloat16)
    v = torch.randn(B, H, V, device="cuda", dtype=torch.bfloat16)
    s = torch.randn(B, H, K, V, device="cuda")
    scale = K ** -0.5
    res = {"ours decode (new state)": bench(lambda: triton_recurrent_step(q, k, v, g, s, scale)),
           "ours decode (in place)": bench(lambda: triton_recurrent_step(q, k, v, g, s, scale, inplace=True))}
    return res, (q, k, v, g, s)


def fla_decode(args):
    from fla.ops.gla import fused_recurrent_gla
    q, k, v, g, s = (x.unsqueeze(1) if x.dim() == 3 else x for x in args)
    return bench(lambda: fused_recurrent_gla(q, k, v, gk=g, initial_state=s, output_final_state=True))


def first_call_child(shape):
    q, k, v, g, do = inputs(*shape)
    torch.cuda.synchronize()
    t = time.perf_counter()
    torch.autograd.grad(ours(q, k, v, g), (q, k, v, g), do)
    torch.cuda.synchronize()
    print(json.dumps({"first_call_s": time.perf_counter() - t}))


def first_call(shape):
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, __file__, "--first-call-child", ",".join(map(str, shape))],
                             env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["first_call_s"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--fla", action="store_true")
    p.add_argument("--fla-big", action="store_true")
    p.add_argument("--stages", action="store_true")
    p.add_argument("--variants", action="store_true")
    p.add_argument("--first-call", action="store_true")
    p.add_argument("--first-call-child")
    p.add_argument("--shape", action="append", help="B,T,H,K,V; repeat for several (default: SHAPES)")
    p.add_argument("--out")
    a = p.parse_args()
    if a.first_call_child:
        return first_call_child(tuple(int(x) for x in a.first_call_child.split(",")))

    import triton
    rows = []

    def row(name, shape, t_fwd, t_fb):
        rows.append((name, shape, t_fwd, t_fb))
        f = lambda t: "–" if t is None else f"{t:.3f}"  # noqa: E731
        print(f"| {name} | {' | '.join(map(str, shape))} | {f(t_fwd)} | {f(t_fb)} |", flush=True)

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if a.first_call:
        print(f"first call (cold cache) fwd+bwd, ours, {SHAPES[0]}: {first_call(SHAPES[0]):.1f} s", flush=True)
        print(f"first call (cold cache) fwd+bwd, ours, {SHAPES[3]}: {first_call(SHAPES[3]):.1f} s", flush=True)
    print("| op | B | T | H | K | V | fwd ms | fwd+bwd ms |\n|---|---|---|---|---|---|---|---|")
    shapes = [tuple(int(x) for x in sh.split(",")) for sh in a.shape] if a.shape else SHAPES
    for shape in shapes:
        row("ours (triton)", shape, *time_op(ours, shape))
        if shape[3] == shape[4]:
            row("SDPA causal", shape, *time_op(sdpa, shape))
        if a.fla and (shape[3] == 128 or a.fla_big):
            t = time.time()
            time_op(fla_chunk, (1, 256, *shape[2:]), rep=1)  # warm FLA's autotune for this head shape
            print(f"(FLA chunk_gla warm-up/autotune {shape[2:]}: {time.time() - t:.0f} s)", flush=True)
            row("FLA chunk_gla", shape, *time_op(fla_chunk, shape))
    if a.fla:
        for shape in [sh for sh in shapes if sh[3] == 128]:
            row("FLA fused_recurrent_gla", shape, *time_op(fla_recurrent, shape, fwd_only=True, rep=20))
    dec, args = decode_times()
    for name, t in dec.items():
        print(f"{name}, B,H,K,V={DECODE}: {t:.4f} ms", flush=True)
    if a.fla:
        print(f"FLA fused_recurrent_gla decode, B,H,K,V={DECODE}: {fla_decode(args):.4f} ms", flush=True)
    if a.stages:
        for shape in SHAPES:
            print(f"stages {shape}: " + ", ".join(f"{k} {t:.3f}" for k, t in stage_times(shape).items()), flush=True)
    if a.variants:
        from gla.ops.triton import utils
        base = {k: dict(c) for k, c in utils.CONFIGS.items()}
        for name, over in VARIANTS.items():
            utils.CONFIGS.update(over)
            ts = [time_op(ours, s) for s in (SHAPES[0], SHAPES[2], SHAPES[3])]
            print(f"variant {name}: " + ", ".join(f"{tf:.3f}/{tb:.3f}" for tf, tb in ts), flush=True)
            utils.CONFIGS.clear()
            utils.CONFIGS.update({k: dict(c) for k, c in base.items()})
    if a.out:
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
