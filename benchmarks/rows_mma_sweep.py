"""Tiles of rows_mma_kernel (gla/ops/triton/decode_layer.py) at gla-340m's decoding shapes, bf16, 16 and 64 rows,
against cuBLAS (torch.mm, without the norms) and the launcher's own choice: microseconds per launch with each launch
reading another copy of the weights (copies past L2, as a step reads every layer's weights once), no PDL.

    python3 benchmarks/rows_mma_sweep.py OUT [SHAPE ...]   (default: every shape in SHAPES, then "gated")

"gated": gated_step_kernel's state slabs at 1, 16 and 64 rows (config (BV, num_warps); its "weights" are the state).

Compiles in 8 processes first (Triton's cache on disk), then times in one. Writes OUT/rows_mma_sweep.{md,json}.
"""
import json
import os
import subprocess
import sys

import torch
import triton

from gla.ops.triton import decode_layer as dl
from gla.ops.triton.utils import cdiv

SHAPES = {  # name: (N, K, kernel flags) of gla-340m (d 1024, joint projection 3088, value heads 4 x 256, MLP 2816)
    "joint": (3088, 1024, dict(NORM=1)),
    "o_proj": (1024, 1024, dict(NORM=2, HD=256, RES=True)),
    "swiglu": (2816, 1024, dict(NORM=1, SWIGLU=True)),
    "down": (1024, 2816, dict(RES=True)),
}
STEPS = ((64, 4), (128, 3), (256, 1), (256, 3), (1024, 1))  # (BK, num_stages): 1 by hand, more pipelined
CONFIGS = sorted({(bm, bn, bk, st, w) for bm in (16, 64) for bn in (16, 32, 64) for bk, st in STEPS for w in (4, 8)})
ROWS = (16, 64)
COPY_BYTES = 160 << 20  # the weights' copies together: past the H100's 50 MB of L2
WORKERS = 8
DEV = "cuda"  # the CPU (under the Triton interpreter) to try the launches


def configs(name, M):
    """The configs that differ at this shape (o_proj's steps hold whole head groups) and fit M."""
    hd = SHAPES[name][2].get("HD", 1)
    return sorted({(bm, bn, max(bk, hd), st, w) for bm, bn, bk, st, w in CONFIGS if bm <= M})


def operands(name, M, copies):
    N, K, f = SHAPES[name]
    dt, dev = torch.bfloat16, DEV
    ws = [torch.randn(N * (2 if f.get("SWIGLU") else 1), K, device=dev, dtype=dt) / K ** 0.5 for _ in range(copies)]
    x, y = torch.randn(M, K, device=dev, dtype=dt), torch.empty(M, N, device=dev, dtype=dt)
    res = torch.randn(M, N, device=dev, dtype=dt) if f.get("RES") else None
    r = torch.randn(M, K, device=dev, dtype=dt) if f.get("NORM") == 2 else None
    nw = 1 + 0.1 * torch.randn(f.get("HD", K), device=dev, dtype=dt) if f.get("NORM") else None
    return ws, x, y, res, r, nw


def launch(name, cfg, w, x, y, res, r, nw):
    N, K, f = SHAPES[name]
    BM, BN, BK, stages, warps = cfg
    M = x.shape[0]
    dummy = y
    dl.rows_mma_kernel[(cdiv(M, BM), cdiv(N, BN))](
        x, w, y, dummy if res is None else res, dummy if r is None else r, dummy if nw is None else nw, M, N, K,
        x.stride(0), y.stride(0), 0 if res is None else res.stride(0), 0 if r is None else r.stride(0), 1e-6,
        BM=BM, BN=BN, BK=BK, ONE=K <= BK, NORM=f.get("NORM", 0), HD=f.get("HD", 1), SWIGLU=f.get("SWIGLU", False),
        RES=res is not None, PDL=False, F32=dl.dot16(w.dtype) != 1, PIPELINED=stages > 1, num_warps=warps,
        num_stages=stages)


def per_launch_us(fns) -> float:
    """Each fn once, in a CUDA graph, replayed: microseconds per fn."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    return triton.testing.do_bench(g.replay, warmup=10, rep=60) * 1e3 / len(fns)


GATED = (4, 128, 256, 16, 3088)  # gla-340m's GLA step: heads, head_k, head_v, gate rank, joint projection row


def gated_row(B: int) -> dict:
    """gated_step_kernel (the fused step's GLA state update) at B rows: the state slab's width BV (programs: B x
    heads x V / BV) and warps, each launch on another layer's state (24 of them, as a step)."""
    from gla.ops.triton.decode import state_slab
    from gla.ops.triton.utils import pow2
    H, K, V, R, P = GATED
    p = torch.randn(B, P, device=DEV, dtype=torch.bfloat16)
    w2, b2 = torch.randn(H * K, R, device=DEV, dtype=torch.bfloat16), torch.randn(H * K, device=DEV)
    states = [torch.randn(B * H, K, V, device=DEV) for _ in range(24)]
    o = torch.empty(B, H * V, device=DEV, dtype=torch.bfloat16)

    def run(s, BV, warps):
        dl.gated_step_kernel[(B * H, cdiv(V, BV))](
            p, w2, b2, s, o, p.stride(0), o.stride(0), 0.1, 16.0, H, R, H * K, 2 * H * K, 2 * H * K + H * V,
            K=K, V=V, BK=pow2(K), BV=BV, BR=pow2(R), PDL=False, num_warps=warps)
    mb = 2 * states[0].numel() * 4 / 1e6  # read and written
    BV0 = state_slab(K, V)[1]
    row = dict(shape="gated", M=B, N=V, K=K, weight_MB=mb, floor_us=mb / 3.35, cublas_us=None,
               current_us=per_launch_us([lambda s=s: run(s, BV0, 4) for s in states]), configs={})
    pristine = states[0].clone()  # the timing below advances states[0] in place: each check starts from this
    s0 = pristine.clone()
    run(s0, BV0, 4)
    ref = o.float().clone()
    for BV in (16, 32, 64):
        for warps in (2, 4, 8):
            s1 = pristine.clone()
            run(s1, BV, warps)
            err = max(float((o.float() - ref).abs().max() / ref.abs().max()), float((s1 - s0).abs().max()))
            row["configs"][str((BV, warps))] = dict(
                us=per_launch_us([lambda s=s: run(s, BV, warps) for s in states]), err=err)
    return row


def compile_share(i: int, shapes) -> None:
    jobs = [(name, cfg) for name in shapes if name != "gated" for cfg in configs(name, 64)]
    for name, cfg in jobs[i::WORKERS]:
        ws, x, y, res, r, nw = operands(name, 64, 1)
        try:
            launch(name, cfg, ws[0], x, y, res, r, nw)
        except Exception as e:  # noqa: BLE001 - an over-large tile is a result of the sweep
            print(f"{name} {cfg}: {type(e).__name__}", file=sys.stderr)
    torch.cuda.synchronize()


def main(out: str, shapes) -> None:
    procs = [subprocess.Popen([sys.executable, __file__, "--compile", str(i), *shapes]) for i in range(WORKERS)]
    for p in procs:
        p.wait()
    rows = []
    for name in shapes:
        if name == "gated":
            for B in (1, 16, 64):
                rows.append(gated_row(B))
                report(out, rows)
            continue
        N, K, f = SHAPES[name]
        for M in ROWS:
            copies = max(2, COPY_BYTES // (N * K * 2 * (2 if f.get("SWIGLU") else 1)))
            ws, x, y, res, r, nw = operands(name, M, copies)
            ref = torch.empty_like(y)
            dl.row_linear(x, ws[0], ref, res=res, r=r, nw=nw, norm=f.get("NORM", 0), head_dim=f.get("HD", 0),
                          swiglu=f.get("SWIGLU", False), eps=1e-6)
            mb = ws[0].numel() * 2 / 1e6
            row = dict(shape=name, M=M, N=N, K=K, weight_MB=mb, floor_us=mb / 3.35,  # 3.35 TB/s: 3.35 MB per us
                       cublas_us=per_launch_us([lambda w=w: torch.mm(x, w.t()) for w in ws]),
                       current_us=per_launch_us([lambda w=w: dl.row_linear(
                           x, w, y, res=res, r=r, nw=nw, norm=f.get("NORM", 0), head_dim=f.get("HD", 0),
                           swiglu=f.get("SWIGLU", False), eps=1e-6) for w in ws]), configs={})
            for cfg in configs(name, M):
                try:
                    launch(name, cfg, ws[0], x, y, res, r, nw)
                    err = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
                    us = per_launch_us([lambda w=w: launch(name, cfg, w, x, y, res, r, nw) for w in ws])
                    row["configs"][str(cfg)] = dict(us=us, err=err)
                except Exception as e:  # noqa: BLE001
                    row["configs"][str(cfg)] = dict(error=type(e).__name__)
            rows.append(row)
            ok = sorted((v["us"], k) for k, v in row["configs"].items() if "us" in v and v["err"] < 2e-2)
            print(f"{name} M={M}: floor {row['floor_us']:.1f} us, cuBLAS {row['cublas_us']:.1f}, current "
                  f"{row['current_us']:.1f}, best {ok[:4]}", flush=True)
            report(out, rows)  # after every row: the call may be cut at its time limit


def report(out, rows) -> None:
    lines = [f"rows_mma_kernel sweep on {torch.cuda.get_device_name()}, torch {torch.__version__}, Triton "
             f"{triton.__version__}, bf16; us per launch, config (BM, BN, BK, num_stages, num_warps)", "",
             "| shape | M | weights MB | floor | cuBLAS | current | best | best config | 2nd | 3rd |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ok = sorted((v["us"], k) for k, v in row["configs"].items() if "us" in v and v["err"] < 2e-2)
        top = [f"{k}: {u:.1f}" for u, k in ok[:3]] + ["-"] * 3
        lines.append(f"| {row['shape']} | {row['M']} | {row['weight_MB']:.1f} | {row['floor_us']:.1f} | "
                     f"{'-' if row['cublas_us'] is None else format(row['cublas_us'], '.1f')} | "
                     f"{row['current_us']:.1f} | {ok[0][0] if ok else float('nan'):.1f} | "
                     f"{top[0]} | {top[1]} | {top[2]} |")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "rows_mma_sweep.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "rows_mma_sweep.json"), "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    if sys.argv[1] == "--compile":
        compile_share(int(sys.argv[2]), sys.argv[3:])
    else:
        main(sys.argv[1], sys.argv[2:] or [*SHAPES, "gated"])
