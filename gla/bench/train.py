"""Training-step benchmark: ours and a same-size HF Llama, eager and ``torch.compile``d, the step users run (forward,
loss, backward, fused AdamW; bf16 autocast over fp32 weights on CUDA, as ``gla train`` does).

    gla bench train [--device cuda] [--preset gla-340m] [--batch 8] [--seq-len 2048] [--steps 10]
                    [--models gla,llama] [--modes eager,compiled] [--out DIR]

Per model and mode: the first step (compilation included), the median of the timed steps after three untimed ones,
tokens/s and peak memory. Every row starts from its model's same weights and the same batches, and the losses are
printed beside the times. The Llama (gla.bench.peers.llama_twin, SDPA attention) has the preset's width, depth, MLP
size and vocabulary.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gla import GLAConfig, GLATransformer
from gla.bench import md_table
from gla.device import resolve_device

MODES = ("eager", "compiled")
MODELS = ("gla", "llama")


def build(kind: str, cfg: GLAConfig, seq_len: int):
    """(model, forward(model, ids [B, T]) -> logits) for "gla" (ours) or "llama" (its HF twin)."""
    if kind == "gla":
        return GLATransformer.from_config(cfg), lambda m, ids: m(ids, use_cache=False)[0]
    from .peers import llama_twin
    return llama_twin(cfg, seq_len), lambda m, ids: m(input_ids=ids, use_cache=False).logits


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_mode(cfg: GLAConfig, mode: str, batch: int, seq_len: int, steps: int, device, kind: str = "gla") -> dict:
    """{model, mode, first_step_s, ms_per_step, tok_per_s, peak_gib, losses} for ``steps`` timed steps."""
    torch.manual_seed(0)
    model, run = build(kind, cfg, seq_len)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    gen = torch.Generator(device=device).manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device, generator=gen)
               for _ in range(4)]
    forward = torch.compile(model) if mode == "compiled" else model
    use_bf16 = device.type == "cuda"

    def step(ids):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = run(forward, ids[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for i in range(steps + 3):
        _sync(device)
        t = time.perf_counter()
        losses.append(step(batches[i % len(batches)]))
        _sync(device)
        times.append(time.perf_counter() - t)
    ms = statistics.median(times[3:]) * 1e3
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return dict(model=kind, mode=mode, first_step_s=times[0], ms_per_step=ms, tok_per_s=batch * seq_len / ms * 1e3,
                peak_gib=peak, losses=[float(x) for x in losses])


def format_table(rows, title: str) -> str:
    cells = [[r.get("model", "gla"), r["mode"], f"{r['ms_per_step']:.1f}", f"{r['tok_per_s'] / 1e3:.1f}k", f"{r['peak_gib']:.1f}",
              f"{r['first_step_s']:.1f}", f"{r['losses'][0]:.4f}, {r['losses'][-1]:.4f}"] for r in rows]
    return f"{title}\n\n" + md_table(["model", "mode", "ms/step", "tok/s", "peak GiB", "first step s", "loss (first, last)"],
                                     cells)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gla bench train", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda")
    p.add_argument("--preset", default="gla-340m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode, after three untimed")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: eager, compiled")
    p.add_argument("--models", default="gla", help="comma-separated: gla (ours), llama (an HF Llama of the same size)")
    p.add_argument("--out", help="write DIR/train.md and DIR/train.json")
    a = p.parse_args(argv)
    modes, models = a.modes.split(","), a.models.split(",")
    if not set(modes) <= set(MODES) or not set(models) <= set(MODELS) or a.steps < 1:
        p.error(f"--modes takes {', '.join(MODES)}, --models {', '.join(MODELS)}; --steps must be >= 1")
    cfg = GLAConfig.preset(a.preset, max_seq_len=max(a.seq_len, 1))
    device = resolve_device(a.device)
    rows = [time_mode(cfg, m, a.batch, a.seq_len, a.steps, device, kind) for kind in models for m in modes]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    title = f"{a.preset} training step, B={a.batch} T={a.seq_len}, {name}, torch {torch.__version__}"
    table = format_table(rows, title)
    print(table)
    if a.out:
        from . import write_report
        write_report(a.out, "train", table, rows)
    return 0


if __name__ == "__main__":
    main()
