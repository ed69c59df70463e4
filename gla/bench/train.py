"""Training-step benchmark: ours, FLA's GLA and a same-size HF Llama, eager and ``torch.compile``d, the step users
run (forward, loss, backward, fused AdamW), one process, the same batches for every row.

    gla bench train [--device cuda] [--preset gla-340m] [--batch 8] [--seq-len 2048] [--steps 10]
                    [--models gla,llama,fla] [--modes eager,compiled,blocks] [--weights fp32,bf16] [--profile]
                    [--checkpoint-activations] [--memory-budgets 1,0.5] [--out DIR]

Models: ``gla`` ours (its fused head + loss, as ``gla train`` runs it); ``llama`` an HF LlamaForCausalLM (SDPA) with
the preset's width, depth, MLP size and vocabulary (gla.bench.peers.llama_twin); ``fla`` FLA's GLAForCausalLM at the
preset's sizes with FLA's default fused kernels (needs flash-linear-attention; eager only: FLA's kernels are
its own fusions, and its model is not written for torch.compile). Embeddings are tied, as in the
GLA paper's and FLA's 340M models. Weights: ``fp32`` master weights under bf16 autocast on CUDA (what ``gla train``
does), ``bf16`` weights and optimizer state with no autocast (how FLA's own numbers are usually taken).

Per row: the first step (compilation and autotuning included), the median of the timed steps after three untimed
ones, tokens/s, model FLOPs utilisation (6 * parameters * tokens per step, without attention FLOPs, over the card's
dense bf16 peak; CUDA only), peak memory and the losses of the first and last step. --memory-budgets: compiled rows
once per activation memory budget (torch._functorch.config.activation_memory_budget: below 1 the partitioner
recomputes in the backward what it would have saved, cheapest recomputation first, until the saved activations fit
that fraction). --profile: after the rows,
the CUDA kernels of one more step of each row by total time.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch._dynamo
import torch._functorch.config
import torch.nn.functional as F

from gla import GLAConfig, GLATransformer
from gla.models.transformer import partitioning
from gla.bench import md_table, sync, timed
from gla.device import resolve_device

MODES = ("eager", "compiled", "blocks")
MODELS = ("gla", "llama", "fla")
WEIGHTS = ("fp32", "bf16")
# dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment, for MFU
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}  # first match wins
PROFILE_TOP = 25  # kernels per row in the printed table


def build(kind: str, cfg: GLAConfig, seq_len: int):
    """(model, loss(model, ids [B, T + 1]) -> mean next-token loss) for one of MODELS."""
    if kind == "gla":
        def loss(m, ids):
            return m(ids[:, :-1], use_cache=False, targets=ids[:, 1:])[0] / ids[:, 1:].numel()
        return GLATransformer.from_config(cfg), loss
    from . import peers
    if kind == "fla":
        def loss(m, ids):  # FLA shifts the labels itself (HF convention: T - 1 of T positions scored)
            return m(input_ids=ids[:, :-1], labels=ids[:, :-1], use_cache=False).loss
        return peers.fla_twin(cfg, seq_len), loss

    def loss(m, ids):
        logits = m(input_ids=ids[:, :-1], use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
    return peers.llama_twin(cfg, seq_len), loss


def compile_blocks(model):
    """``model`` with each block of its ``layers`` compiled on its own (torch's regional compilation: identical blocks
    share one compiled graph, so compile time does not grow with depth). Ours also compiles its fused head + loss
    (GLATransformer.compile_blocks); a peer's head and loss stay eager."""
    if isinstance(model, GLATransformer):
        return model.compile_blocks()
    for name, m in model.named_modules():
        if name.split(".")[-1] == "layers" and isinstance(m, torch.nn.ModuleList):
            for block in m:
                block.compile()
    return model


def peak_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def time_mode(cfg: GLAConfig, mode: str, batch: int, seq_len: int, steps: int, device, kind: str = "gla",
              weights: str = "fp32", profile: bool = False, recompute: bool = False, budget: float = 1.0) -> dict:
    """{model, mode, weights, recompute, budget, first_step_s, ms_per_step, tok_per_s, mfu, peak_gib, losses[,
    profile]}. recompute: activation checkpointing of every layer (ours: checkpoint_layers; HF models: their own).
    budget: the compiler's activation memory budget (compiled modes)."""
    import gc
    gc.collect()  # the previous row's model, optimizer and compiled code out of this row's peak memory
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    model, run = build(kind, cfg, seq_len)
    if recompute and kind == "gla":
        model.checkpoint_layers = True
    elif recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = model.to(device, torch.bfloat16 if weights == "bf16" else torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    gen = torch.Generator(device=device).manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device, generator=gen)
               for _ in range(4)]
    forward = torch.compile(model) if mode == "compiled" else compile_blocks(model) if mode == "blocks" else model
    autocast = device.type == "cuda" and weights == "fp32"

    def step(ids):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = run(forward, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = []
    # read when the first step compiles; ours with its own partitioner settings, a peer's with torch's defaults
    part = partitioning(budget) if kind == "gla" else torch._functorch.config.patch(activation_memory_budget=budget)
    with part:
        times = [timed(lambda: losses.append(step(batches[i % len(batches)])), device) for i in range(steps + 3)]
    ms = statistics.median(times[3:]) * 1e3
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    tflops = peak_tflops(device)
    tokens = batch * seq_len
    row = dict(model=kind, mode=mode, weights=weights, recompute=recompute, budget=budget, params=n_params,
               first_step_s=times[0], ms_per_step=ms, tok_per_s=tokens / ms * 1e3, peak_gib=peak,
               losses=[float(x) for x in losses],
               mfu=6 * n_params * tokens / (ms * 1e-3) / (tflops * 1e12) if tflops else None)
    if profile:
        row["profile"] = kernel_profile(lambda: step(batches[0]), device)
    return row


def kernel_profile(step, device) -> list[dict]:
    """[{name, ms, calls}] of every CUDA kernel of one ``step``, by total device time (the report prints the first
    PROFILE_TOP; the JSON keeps all, so that an A/B run can check that a variant's kernels ran)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        sync(device)
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", 0) if device.type == "cuda" else e.self_cpu_time_total
        if t > 0 and (device.type != "cuda" or e.device_type.name == "CUDA"):
            rows.append(dict(name=e.key[:90], ms=t / 1e3, calls=e.count))
    return sorted(rows, key=lambda r: -r["ms"])


def format_table(rows, title: str) -> str:
    def mfu(r):
        return f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
    cells = [[r.get("model", "gla"), r["mode"] + (" + recompute" if r.get("recompute") else "")
              + (f", budget {r['budget']:g}" if r.get("budget", 1.0) < 1 else ""),
              r.get("weights", "fp32"), f"{r['ms_per_step']:.1f}",
              f"{r['tok_per_s'] / 1e3:.1f}k", mfu(r), f"{r['peak_gib']:.1f}", f"{r['first_step_s']:.1f}",
              f"{r['losses'][0]:.4f}, {r['losses'][-1]:.4f}"] for r in rows]
    table = f"{title}\n\n" + md_table(["model", "mode", "weights", "ms/step", "tok/s", "MFU", "peak GiB",
                                        "first step s", "loss (first, last)"], cells)
    for r in rows:
        if r.get("profile"):
            prof = [[p["name"], f"{p['ms']:.2f}", str(p["calls"])] for p in r["profile"][:PROFILE_TOP]]
            shown = sum(p["ms"] for p in r["profile"][:PROFILE_TOP])
            table += (f"\n\nKernels of one step: {r['model']} {r['mode']} {r.get('weights', 'fp32')} "
                      f"({shown:.1f} ms in these)\n\n" + md_table(["kernel", "ms", "calls"], prof))
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gla bench train", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda")
    p.add_argument("--preset", default="gla-340m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode, after three untimed")
    p.add_argument("--modes", default="eager,compiled", help="comma-separated: eager, compiled (the whole model), "
                                                             "blocks (each block of the model on its own)")
    p.add_argument("--models", default="gla", help="comma-separated: gla (ours), llama (an HF Llama of the same "
                                                   "size), fla (FLA's GLAForCausalLM)")
    p.add_argument("--weights", default="fp32", help="comma-separated: fp32 (bf16 autocast on CUDA), bf16")
    p.add_argument("--profile", action="store_true", help="print each row's top CUDA kernels of one step")
    p.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute every layer in the backward (all models): memory for long sequences")
    p.add_argument("--memory-budgets", default="1", help="comma-separated activation memory budgets in (0, 1] for "
                                                        "the compiled modes (1: the compiler's default)")
    p.add_argument("--out", help="write DIR/train.md and DIR/train.json")
    a = p.parse_args(argv)
    modes, models, weights = a.modes.split(","), a.models.split(","), a.weights.split(",")
    budgets = [float(b) for b in a.memory_budgets.split(",")]
    if (not set(modes) <= set(MODES) or not set(models) <= set(MODELS) or not set(weights) <= set(WEIGHTS)
            or a.steps < 1 or not all(0 < b <= 1 for b in budgets)):
        p.error(f"--modes takes {', '.join(MODES)}, --models {', '.join(MODELS)}, --weights {', '.join(WEIGHTS)}; "
                "--steps must be >= 1, --memory-budgets in (0, 1]")
    cfg = GLAConfig.preset(a.preset, max_seq_len=max(a.seq_len, 1), tie_embeddings=True)
    device = resolve_device(a.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    title = f"{a.preset} (tied embeddings) training step, B={a.batch} T={a.seq_len}, {name}, torch {torch.__version__}"
    rows = []
    for kind in models:
        for w in weights:
            for m in modes:
                if kind == "fla" and m != "eager":  # FLA's model is not written for torch.compile
                    continue
                for b in budgets if m != "eager" else [1.0]:
                    rows.append(time_mode(cfg, m, a.batch, a.seq_len, a.steps, device, kind, w, a.profile,
                                          a.checkpoint_activations, b))
                    # each row as it is measured: a run stopped by a time limit keeps the rows it finished
                    row = {k: v for k, v in rows[-1].items() if k != "profile"}
                    print(format_table([row], title).splitlines()[-1], file=sys.stderr, flush=True)
    table = format_table(rows, title)
    print(table)
    if a.out:
        from . import write_report
        write_report(a.out, "train", table, rows)
    return 0


if __name__ == "__main__":
    main()
