"""CPU generation benchmark: PyTorch (eager, compiled step, int8) vs the exported ONNX graph (fp32, int8, int4), and
memory against context beside a softmax model of the same size, one process.

    gla bench cpu-generate [--preset demo --preset gla-340m | --ckpt DIR ...] [--prompt-len 256] [--new 64]
                           [--threads 2] [--variants eager,eager-compiled,eager-int8,onnx,onnx-int8,onnx-int4]
                           [--contexts 1024,16384,65536] [--context-model demo] [--out DIR] [--json]

For each model (a preset with random weights, or a checkpoint) and each variant, one greedy generation of --new
tokens after a random prompt of --prompt-len tokens, batch 1, as users run it: eager = gla.generate (fp32),
eager-compiled = the same with its decoding step compiled (`gla generate --compile`; the compilation falls in one
early gap, outside the median), eager-int8 = the eager model with torchao's int8 weight-only linears (an optional
package: the row is skipped without it; `gla generate --quantize` uses the faster ONNX Runtime route, see
benchmarks/NOTES.md), onnx / onnx-int8 / onnx-int4 = the `gla export` directory run by
gla.load_exported (ONNX Runtime). Time to first token = the prompt's prefill and the first token; decode = the
median gap between later tokens. File = the weights on disk (model.safetensors for eager, model.onnx for the
exports). Peak RSS = the process's peak resident memory while the variant loads and generates, the interpreter and
libraries loaded so far included, with no other variant's model alive (Linux; "–" elsewhere).

Memory against context (--contexts, "" for none): the --context-model preset with random weights, GLA and its
softmax twin (the same config with softmax attention and a KV cache in every layer), each prompt prefilled in
blocks of the shortest context's length (at most 4,096 tokens: the same activations at every context), then
decoded one token at a time as `gla bench decode` does (eager fp32, ms/token over 16 steps): the state each holds
for decoding, the process's resident-memory growth, and its peak resident memory while prefilling and decoding
(the interpreter and the model included), with a plot (cpu-generate-context.png).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from gla.bench import decode, md_table, write_report

VARIANTS = ("eager", "eager-compiled", "eager-int8", "onnx", "onnx-int8", "onnx-int4")
CONTEXTS = (1024, 16384, 65536)


def _torchao_int8(model):
    """The model with int8 weight-only linears (torchao), or a reason it cannot have them."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return "torchao is not installed (pip install torchao)"
    quantize_(model, Int8WeightOnlyConfig())
    return model


def _timed(run) -> tuple[float, float]:
    """run(callback) generates, calling callback per token -> (time to first token s, median decode gap s)."""
    stamps = []
    start = time.perf_counter()
    run(lambda _tok: stamps.append(time.perf_counter()))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return stamps[0] - start, statistics.median(gaps)


def measure(ckpt: str, variants, prompt_len: int, new: int, threads: int, workdir: str, name: str) -> list[dict]:
    from gla.export import export, load_exported
    from gla.generation import generate
    from gla.models import from_pretrained
    from .decode import peak_rss_bytes, reset_peak_rss
    model = from_pretrained(ckpt).eval()
    params, vocab = model.num_parameters(), model.config.vocab_size
    del model
    os.makedirs(workdir, exist_ok=True)
    prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(0))
    rows = []
    for variant in variants:
        if variant.startswith("eager"):
            measured = reset_peak_rss()
            model = from_pretrained(ckpt).eval()
            size = os.path.getsize(os.path.join(ckpt, "model.safetensors"))
            if variant == "eager-int8":
                model, size = _torchao_int8(model), None  # no file format of its own
                if isinstance(model, str):
                    rows.append(dict(model=name, params=params, variant=variant, skipped=model))
                    continue
            ttft, gap = _timed(lambda cb: generate(model, prompt[None], new, temperature=0,
                                                   callback=lambda t: cb(int(t[0])),
                                                   compile_step=variant == "eager-compiled"))
        else:
            out = os.path.join(workdir, variant)
            export(ckpt, out, quantize=variant.split("-")[1] if "-" in variant else None)
            size = os.path.getsize(os.path.join(out, "model.onnx"))
            measured = reset_peak_rss()  # after the export, which a deployed model never runs
            m = load_exported(out, threads)
            ttft, gap = _timed(lambda cb: m.generate(prompt.tolist(), new, temperature=0, callback=cb))
        peak = peak_rss_bytes() if measured else None
        model = m = None  # out of the next variant's resident set
        rows.append(dict(model=name, params=params, variant=variant, ttft_ms=ttft * 1e3, decode_ms=gap * 1e3,
                         tok_s=1.0 / gap, file_mb=None if size is None else size / 2 ** 20,
                         peak_rss_mb=None if peak is None else peak / 2 ** 20))
    return rows


def context_rows(preset: str, contexts, log=None) -> list[dict]:
    """`gla bench decode`'s rows for the preset's GLA model and its softmax twin (random weights) at each context."""
    from gla.models import GLAConfig, GLATransformer
    from .decode import measure as decode_steps, peak_rss_bytes, reset_peak_rss
    rows = []
    layers = GLAConfig.preset(preset).n_layers
    block = min(4096, *contexts)  # every context's prefill holds the activations of one such block
    for kind in ("gla", "softmax"):
        cfg = GLAConfig.preset(preset, max_seq_len=max(contexts) + 64,
                               attn_layers=tuple(range(layers)) if kind == "softmax" else ())
        torch.manual_seed(0)
        model = GLATransformer.from_config(cfg).eval()
        decode_steps(model, min(contexts), 2)  # untimed: first-call allocations
        for L in sorted(contexts):
            measured = reset_peak_rss()
            row = decode_steps(model, L, 16, prefill_chunk=block)
            rows.append({"model": kind, **row, "peak_rss_bytes": peak_rss_bytes() if measured else None})
            if log is not None:
                log(f"{preset} {kind} context {L}: {rows[-1]['ms_per_token']:.2f} ms/token")
        del model
    return rows


def table(rows) -> str:
    base = {r["model"]: r["decode_ms"] for r in rows if r["variant"] == "eager"}
    cells = [[r["model"], f"{r['params'] / 1e6:.1f}M", r["variant"], f"{r['ttft_ms']:.1f}", f"{r['decode_ms']:.2f}",
              f"{r['tok_s']:.1f}", f"{base[r['model']] / r['decode_ms']:.2f}" if r["model"] in base else "–",
              "–" if r["file_mb"] is None else f"{r['file_mb']:.1f}",
              "–" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.0f}"]
             for r in rows if "skipped" not in r]
    skipped = [f"{r['model']} {r['variant']}: skipped, {r['skipped']}" for r in rows if "skipped" in r]
    return "\n".join([md_table(["model", "params", "variant", "time to first token ms", "decode ms/token", "tok/s",
                                "x eager", "file MB", "peak RSS MiB"], cells), *(["", *skipped] if skipped else [])])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gla bench cpu-generate", description=__doc__.splitlines()[0])
    p.add_argument("--preset", action="append", default=[], help="a model preset with random weights (repeatable)")
    p.add_argument("--ckpt", action="append", default=[], help="a checkpoint or run directory (repeatable)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new", type=int, default=64, help="tokens to generate")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads for torch and ONNX Runtime (0: theirs)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)),
                   help="context lengths for memory against context ('' for none)")
    p.add_argument("--context-model", default="demo", help="the preset measured against its softmax twin")
    p.add_argument("--out", default=None, help="write DIR/cpu-generate.md, .json and cpu-generate-context.png")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    if not variants or set(variants) - set(VARIANTS):
        p.error(f"--variants: choose from {VARIANTS}")
    try:
        contexts = [int(c) for c in a.contexts.split(",") if c]
    except ValueError:
        p.error(f"--contexts must be comma-separated integers, got {a.contexts!r}")
    if any(c < 1 for c in contexts):
        p.error("--contexts must be positive")
    from gla.models import GLAConfig, GLATransformer
    try:
        GLAConfig.preset(a.context_model)
    except ValueError as e:
        p.error(f"--context-model: {e}")
    if a.prompt_len < 1 or a.new < 2:
        p.error("--prompt-len must be >= 1 and --new >= 2")
    if a.threads:
        torch.set_num_threads(a.threads)
    presets = a.preset or ([] if a.ckpt else ["demo"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="gla-bench-") as work:
        ckpts = list(a.ckpt)
        for name in presets:
            torch.manual_seed(0)
            path = os.path.join(work, name)
            GLATransformer.from_config(GLAConfig.preset(name)).save_pretrained(path)
            ckpts.append(path)
        names = [os.path.basename(os.path.normpath(c)) for c in ckpts]
        for i, ckpt in enumerate(ckpts):
            if not a.json:
                print(f"measuring {ckpt}: {', '.join(variants)}", flush=True)
            name = names[i] if names.count(names[i]) == 1 else os.path.normpath(ckpt)  # rows keyed by model
            rows += measure(ckpt, variants, a.prompt_len, a.new, a.threads or None, os.path.join(work, str(i)), name)
    log = None if a.json else lambda m: print(m, flush=True)
    ctx = context_rows(a.context_model, contexts, log) if contexts else []
    md = (f"CPU generation, {torch.get_num_threads()} thread(s), torch {torch.__version__}, batch 1, prompt "
          f"{a.prompt_len} tokens, {a.new} new, greedy\n\n{table(rows)}")
    if ctx:
        title = (f"Memory against context: {a.context_model} (GLA) and its softmax twin, random weights, eager fp32, "
                 f"batch 1, prefill in blocks of {min(4096, *contexts)} tokens")
        md += "\n\n" + decode.format_table(ctx, title)
    if a.json:
        print(json.dumps({"generate": rows, "context": ctx}))
    else:
        print("\n" + md)
    if a.out:
        write_report(a.out, "cpu-generate", md, {"generate": rows, "context": ctx})
        if ctx:
            try:
                decode.plot(ctx, os.path.join(a.out, "cpu-generate-context.png"), title)
            except ImportError as e:
                print(f"no plot: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    main()
