"""Decode benchmark: per-token latency and memory vs context length, GLA vs softmax attention with a KV cache.

    gla bench decode [--contexts 1024,2048,...,65536] [--d-model 128 --n-layers 2 --n-heads 2] [--steps 16]
                     [--ckpt NAME=DIR ...] [--device cpu|cuda] [--dtype float32|bfloat16] [--out DIR] [--json]

Both models are GLATransformers of the same shape: "gla" uses GLA in every layer, "softmax" uses softmax attention
(RoPE, KV cache) in every layer (attn_layers = all). --ckpt NAME=DIR adds trained checkpoints under their own names
(e.g. a softmax teacher and its distilled hybrid and GLA students); --models "" leaves the two random models out.
For each context length L the prompt [B, L] is prefilled (one call unless --prefill-chunk), then ``--steps`` decode
steps feed the greedy next token [B, 1] with the state, as gla.generate does; latency is the median step time.
Memory: the bytes held by the state (every tensor in the ModelState: GLA [B, H, K, V] per layer, constant in L; KV
caches grow with L), the process RSS growth from before the prefill to after decoding with only the state alive
(CPU, Linux /proc or psutil), and on CUDA the peak allocated during decoding.
A GPU run up to 128K, e.g.: gla bench decode --device cuda --dtype bfloat16 --d-model 1024 --n-heads 4
--n-layers 4 --contexts 4096,8192,16384,32768,65536,131072 --out DIR
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import time

import torch

from gla.bench import sync, write_report
from gla.models import GLATransformer
from gla.models.state import state_bytes

CPU_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
MODELS = ("gla", "softmax")


def _release_freed() -> None:
    """Hand freed memory back to the OS (garbage collection, then glibc's malloc_trim where there is one), so that
    resident-set figures count live data, not the allocator's cache of earlier (prefill) buffers."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int | None:
    """Current resident set size of this process (after ``_release_freed``), or None where it cannot be read."""
    _release_freed()
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        return None


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: after handing freed memory back to the OS, "5" to /proc/self/clear_refs
    resets the peak to the current resident set); False where that is not possible."""
    _release_freed()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """The process's peak resident set size since start or the last reset_peak_rss (VmHWM), or None."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def build(kind: str, vocab: int, d_model: int, n_heads: int, n_layers: int, max_len: int, device, dtype):
    """The GLA model or its same-size softmax counterpart (every layer softmax attention), in eval mode."""
    torch.manual_seed(0)
    attn = tuple(range(n_layers)) if kind == "softmax" else ()
    m = GLATransformer(vocab, d_model, n_heads, 2 * d_model, n_layers, max_seq_len=max_len, dropout=0.0,
                       attn_layers=attn)
    return m.to(device=device, dtype=dtype).eval()


def _sdpa_backends(device, allow_cudnn: bool):
    """On CUDA, SDPA without cuDNN unless allowed: torch 2.11 picks cuDNN attention for a decode step and builds a
    plan for every new KV length (~10 ms of host time per layer per token on an H200, 57 ms/token for 4 layers),
    which would make the softmax baseline look far worse than a KV cache costs."""
    import contextlib
    if device.type != "cuda" or allow_cudnn:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@torch.inference_mode()
def measure(model, context: int, steps: int, batch: int = 1, prefill_chunk: int = 0, warmup: int = 2,
            allow_cudnn: bool = False) -> dict:
    """Prefill a random prompt [batch, context], then time ``steps`` single-token decode steps.

    Returns {context, ms_per_token, prefill_s, state_bytes, rss_delta_bytes, decode_peak_bytes}.
    """
    from gla.layers.gemv import gemv_linears
    device = next(model.parameters()).device
    with _sdpa_backends(device, allow_cudnn), gemv_linears(model):  # as gla.generate decodes on a CPU
        return _measure(model, device, context, steps, batch, prefill_chunk, warmup)


def _measure(model, device, context, steps, batch, prefill_chunk, warmup):
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, context), device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rss0 = rss_bytes()
    sync(device)
    t0 = time.perf_counter()
    state, chunk = None, prefill_chunk or context
    for s in range(0, context, chunk):
        logits, state = model(ids[:, s:s + chunk], state)
    sync(device)
    prefill_s = time.perf_counter() - t0
    nxt = logits[:, -1:].argmax(-1)
    del logits
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        sync(device)
        t = time.perf_counter()
        logits, state = model(nxt, state)
        nxt = logits[:, -1:].argmax(-1)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    del logits
    rss1 = rss_bytes()
    return {"context": context, "ms_per_token": statistics.median(times) * 1e3, "prefill_s": prefill_s,
            "state_bytes": state_bytes(state),
            "rss_delta_bytes": None if rss0 is None or rss1 is None else rss1 - rss0,
            "decode_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def run(contexts=CPU_CONTEXTS, d_model=128, n_heads=2, n_layers=2, vocab=256, steps=16, batch=1, device="cpu",
        dtype=torch.float32, prefill_chunk=0, models=MODELS, log=None, allow_cudnn=False,
        ckpts: dict | None = None) -> list[dict]:
    """Rows {model, context, ms_per_token, prefill_s, state_bytes, rss_delta_bytes, decode_peak_bytes} for every
    model in ``models`` and every checkpoint of ``ckpts`` ({name: directory}), and context in ``contexts``
    (ascending)."""
    from gla.models import from_pretrained
    device = torch.device(device)
    for kind in models:
        if kind not in MODELS:
            raise ValueError(f"unknown model {kind!r}; choose from {MODELS}")
    builders = [(kind, lambda kind=kind: build(kind, vocab, d_model, n_heads, n_layers, max(contexts) + steps + 8,
                                               device, dtype)) for kind in models]
    builders += [(name, lambda path=path: from_pretrained(path).to(device=device, dtype=dtype).eval())
                 for name, path in (ckpts or {}).items()]
    rows = []
    for kind, make in builders:
        model = make()
        # untimed: first-call allocations and lazy inits
        measure(model, min(contexts), 2, batch, prefill_chunk, allow_cudnn=allow_cudnn)
        for L in sorted(contexts):
            row = {"model": kind, **measure(model, L, steps, batch, prefill_chunk, allow_cudnn=allow_cudnn)}
            rows.append(row)
            if log is not None:
                log(f"{kind:8s} L={L:7d}  {row['ms_per_token']:8.2f} ms/token  prefill {row['prefill_s']:7.2f} s  "
                    f"state {row['state_bytes'] / 2**20:9.2f} MiB")
        del model
    return rows


def _mib(x):
    return "–" if x is None else f"{x / 2**20:.2f}"


def format_table(rows, title: str = "") -> str:
    """Markdown: one line per context, GLA and softmax side by side."""
    by = {(r["model"], r["context"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    cuda = any(r["decode_peak_bytes"] is not None for r in rows)
    mem = "decode peak MiB" if cuda else "RSS growth MiB"
    cols = ["ms/token", "state MiB", mem, "prefill s"]  # state: GLA states and KV caches
    if any(r.get("peak_rss_bytes") is not None for r in rows):
        cols.insert(3, "peak RSS MiB")
    head = "| context | " + " | ".join(f"{m} {c}" for c in cols for m in models) + " |"
    lines = ([title, ""] if title else []) + [head, "|" + "---|" * (1 + len(cols) * len(models))]
    for L in sorted({r["context"] for r in rows}):
        cells = []
        for c in cols:
            for m in models:
                r = by.get((m, L))
                if r is None:
                    cells.append("–")
                elif c == "ms/token":
                    cells.append(f"{r['ms_per_token']:.2f}")
                elif c == "state MiB":
                    cells.append(_mib(r["state_bytes"]))
                elif c == mem:
                    cells.append(_mib(r["decode_peak_bytes"] if cuda else r["rss_delta_bytes"]))
                elif c == "peak RSS MiB":
                    cells.append(_mib(r.get("peak_rss_bytes")))
                else:
                    cells.append(f"{r['prefill_s']:.2f}")
        lines.append(f"| {L} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, path: str, title: str = "") -> None:
    """Latency and state memory vs context length (log-log), one line per model. Needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the decode plot needs matplotlib: pip install 'gla[train]'") from e
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, m in enumerate(dict.fromkeys(r["model"] for r in rows)):
        rs = sorted((r for r in rows if r["model"] == m), key=lambda r: r["context"])
        if not rs:
            continue
        x, color = [r["context"] for r in rs], f"C{i}"
        ax1.plot(x, [r["ms_per_token"] for r in rs], "o-", color=color, label=m)
        ax2.plot(x, [r["state_bytes"] / 2**20 for r in rs], "o-", color=color, label=f"{m} state")
        if rs[0]["decode_peak_bytes"] is not None:
            ax2.plot(x, [r["decode_peak_bytes"] / 2**20 for r in rs], "x--", color=color, label=f"{m} decode peak")
    for ax, ylabel in ((ax1, "ms per token"), (ax2, "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax1.set_title("decode latency")
    ax2.set_title("memory held for decoding")
    if title:
        import textwrap
        fig.suptitle(textwrap.fill(title, 140), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gla bench decode", description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default=",".join(map(str, CPU_CONTEXTS)), help="comma-separated context lengths")
    for name, default in (("d-model", 128), ("n-heads", 2), ("n-layers", 2), ("vocab", 256), ("steps", 16),
                          ("batch", 1), ("prefill-chunk", 0)):
        p.add_argument(f"--{name}", type=int, default=default)
    # One thread by default: decoding a small model is bound by per-op overhead, and on a shared machine several
    # OpenMP threads waiting on each other made single steps 100x slower in our runs. 0 = torch's default.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS} (random weights; "
                                                            "'' for none)")
    p.add_argument("--ckpt", action="append", default=[], metavar="NAME=DIR", help="a checkpoint to measure too "
                                                                                "(repeatable)")
    p.add_argument("--out", default=None, help="directory for decode.md, decode.json and decode.png")
    p.add_argument("--allow-cudnn", action="store_true", help="let SDPA use cuDNN attention (slow decode steps)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    a = p.parse_args(argv)
    try:
        contexts = [int(c) for c in a.contexts.split(",") if c]
    except ValueError:
        p.error(f"--contexts must be comma-separated integers, got {a.contexts!r}")
    if not contexts or min(contexts) < 1 or a.steps < 1:
        p.error("need at least one positive context length and --steps >= 1")
    if any("=" not in c for c in a.ckpt):
        p.error("--ckpt takes NAME=DIR")
    ckpts = dict(c.split("=", 1) for c in a.ckpt)
    models = tuple(m for m in a.models.split(",") if m)
    if not models and not ckpts:
        p.error("nothing to measure: give --models or --ckpt")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    rows = run(contexts, a.d_model, a.n_heads, a.n_layers, a.vocab, a.steps, a.batch, device,
               getattr(torch, a.dtype), a.prefill_chunk, models,
               log=None if a.json else lambda s: print(s, flush=True), allow_cudnn=a.allow_cudnn, ckpts=ckpts)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    what = [f"random models d_model={a.d_model}, {a.n_layers} layers, {a.n_heads} heads"] if models else []
    what += [f"{name}: {path}" for name, path in ckpts.items()]
    title = (f"Decode: {'; '.join(what)}; B={a.batch}, {a.dtype}, {a.steps} steps, {where}, "
             f"torch {torch.__version__}")
    table = format_table(rows, title)
    print(json.dumps(rows) if a.json else "\n" + table)
    if a.out:
        write_report(a.out, "decode", table, {"title": title, "rows": rows})
        try:
            plot(rows, os.path.join(a.out, "decode.png"), title)
        except ImportError as e:
            print(f"no plot: {e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
