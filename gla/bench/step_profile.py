"""Where a decode step's time goes: the captured static step of gla.generate, kernel by kernel (CUDA).

    gla bench step-profile [--preset gla-340m] [--batch 1 --batch 16 ...] [--prompt-len 512] [--eager-step]
                           [--fused-step] [--reps 100] [--top 12] [--out DIR] [--json]

For each batch size: the model (random weights, bf16) prefills a prompt, its StaticDecoder (gla.decoding) captures
one step (compiled, as ``gla.generate(compile_step=True)`` runs it, unless --eager-step; with --fused-step the fused
Triton step of gla.decoding_fused where it serves the model), and the graph is replayed:
wall ms per step from CUDA events over ``--reps`` replays, then under torch.profiler the kernels per step, their
summed time (the GPU-busy time: a graph's kernels run one after another on one stream), the mean gap between one
kernel's end and the next one's start, and the bytes a step must move at least (every weight it reads once, the
embedding's one row per token, each GLA state read and written, the KV caches read). Then the kernels, grouped by
name, that take the most time.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from gla.bench import md_table, write_report


def step_bytes(model, decoder) -> int:
    """Bytes one decode step moves at least: every weight read once (of the embedding table only the tokens' rows,
    unless the head is tied to it), each GLA state read and written, the other state buffers (KV caches read in
    full under their mask, convolution caches) read."""
    from gla.layers.gla_attention import StaticGLAState
    emb = model.embeddings.weight
    tied = model.lm_head.weight is emb
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not emb)
    weights += decoder.tokens.shape[0] * emb.shape[1] * emb.element_size()
    written = {id(layer.recurrent) for layer in decoder.state.layers if isinstance(layer, StaticGLAState)}
    return weights + sum(t.numel() * t.element_size() * (2 if id(t) in written else 1) for t in decoder.buffers)


def kernel_events(replay, reps: int) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of every GPU kernel that ``reps`` calls of ``replay`` ran, in start order."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            replay()
        torch.cuda.synchronize()
    out = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
           if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))]
    if not out:
        raise RuntimeError("the profiler saw no kernels: CUPTI tracing is unavailable here")
    return sorted(out, key=lambda e: e[1])


def profile_step(replay, reps: int) -> dict:
    """replay(): one decode step on the GPU. Wall time from CUDA events, then the profile (module docstring)."""
    for _ in range(10):
        replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        replay()
    end.record()
    torch.cuda.synchronize()
    return dict(wall_ms=start.elapsed_time(end) / reps, **summarize(kernel_events(replay, reps), reps))


def summarize(events: list[tuple[str, float, float]], reps: int) -> dict:
    """events: (name, start us, end us) of ``reps`` steps' kernels in start order -> kernels per step, GPU-busy ms
    per step, mean gap in us between consecutive kernels of one step, and (name, calls, us) per step by time."""
    per_name = defaultdict(lambda: [0, 0.0])
    for name, s, e in events:
        per_name[name][0] += 1
        per_name[name][1] += e - s
    gaps = sorted(max(0.0, b[1] - a[2]) for a, b in zip(events, events[1:]))
    inner = gaps[:len(gaps) - (reps - 1)]  # the reps - 1 largest gaps are those between steps, not inside one
    return dict(kernels=len(events) / reps, busy_ms=sum(e - s for _, s, e in events) / reps / 1e3,
                gap_us=sum(inner) / max(len(inner), 1),
                top=sorted(((n, c / reps, t / reps) for n, (c, t) in per_name.items()), key=lambda r: -r[2]))


def run_one(cfg, B: int, prompt_len: int, compiled: bool, reps: int, fused: bool = False) -> dict:
    from gla.decoding import StaticDecoder, kv_capacity
    from gla.models import GLATransformer
    torch.manual_seed(0)
    model = GLATransformer.from_config(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (B, prompt_len), device="cuda")
    with torch.inference_mode():
        _, state = model(ids, None, logits_to_keep=1)
        replays = 1 + 10 + 2 * reps  # the KV caches of softmax layers (if any) take one slot per replay
        decoder = StaticDecoder(model, state, capture=True, compiled=compiled, capacity=kv_capacity(state, replays),
                                fused=fused)
        decoder.step(ids[:, -1])  # compiles and captures
        r = profile_step(decoder.graph.replay, reps)
    from gla.decoding_fused import FusedStep
    moved = step_bytes(model, decoder)
    step = "fused" if isinstance(decoder.run, FusedStep) else "compiled" if compiled else "uncompiled"
    return dict(B=B, prompt=prompt_len, step=step, bytes=moved, gb_s=moved / r["wall_ms"] / 1e6, **r)


def main(argv=None) -> int:
    from gla.models import GLAConfig
    p = argparse.ArgumentParser(prog="gla bench step-profile", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gla-340m")
    p.add_argument("--batch", type=int, action="append", default=None, help="batch sizes (default 1, 16, 64)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--eager-step", action="store_true", help="capture the uncompiled step")
    p.add_argument("--fused-step", action="store_true",
                   help="capture the fused Triton step (gla.decoding_fused) where it serves the model")
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--top", type=int, default=12, help="kernel names listed per batch size")
    p.add_argument("--out", default=None, help="write DIR/step-profile.md and .json")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("the step profile replays a CUDA graph: it needs a GPU")
    cfg = GLAConfig.preset(a.preset, max_seq_len=a.prompt_len + 2 * a.reps + 64)
    rows = [run_one(cfg, B, a.prompt_len, not a.eager_step, a.reps, a.fused_step) for B in a.batch or [1, 16, 64]]
    summary = md_table(["B", "step", "ms/step", "kernels", "GPU busy ms", "gap us", "MB moved", "GB/s"],
                       [[str(r["B"]), r["step"], f"{r['wall_ms']:.3f}", f"{r['kernels']:.0f}", f"{r['busy_ms']:.3f}",
                         f"{r['gap_us']:.2f}", f"{r['bytes'] / 1e6:.0f}", f"{r['gb_s']:.0f}"] for r in rows])
    parts = [f"Decode step of {a.preset} on {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, prompt "
             f"{a.prompt_len}, the step in a CUDA graph\n\n{summary}"]
    for r in rows:
        parts.append(f"B={r['B']}: kernels by time per step\n\n" + md_table(
            ["kernel", "per step", "us per step"],
            [[n[:90], f"{c:.1f}", f"{t:.1f}"] for n, c, t in r["top"][:a.top]]))
    md = "\n\n".join(parts)
    print(json.dumps(rows) if a.json else md)
    if a.out:
        write_report(a.out, "step-profile", md, rows)
    return 0


if __name__ == "__main__":
    main()
