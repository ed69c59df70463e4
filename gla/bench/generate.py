"""Generation benchmark: gla.generate (eager steps, CUDA-graph steps, compiled CUDA-graph steps) vs a same-size HF
Llama with a static KV cache and a compiled forward, and optionally FLA's GLA, one process, greedy.

    gla bench generate [--device cuda|cpu] [--preset gla-340m] [--batch 1 --batch 16] [--prompt-len 512 ...]
                       [--new 256] [--ours eager|graph|compiled ...] [--no-llama] [--fla] [--out DIR] [--json]

Ours: the preset with random weights (bf16 on CUDA, fp32 on a CPU), eager and, on CUDA, with the step captured as a
CUDA graph (the fused Triton step of gla.decoding_fused where it serves the model) and compiled then captured. The
Llama has the same width, depth, vocabulary and MLP size with softmax attention (Llama-341M beside gla-340m: hidden
1024, 24 layers, 8 heads of 128, MLP 2816), generating through transformers' `generate` with
`cache_implementation="static"`, under which transformers compiles its decoding forward on CUDA (as it documents for
fast decoding). ``--fla``: FLA's GLAForCausalLM at the preset's sizes through its own `generate` (needs
flash-linear-attention).

Per row, after a first call (compilation, capture: its time is reported): time to first token (a call for one new
token: prefill and one sample), decode ms/token ((the full call - the first-token call) / (new - 1)), tokens/s of
the full call, and on CUDA the peak memory of the full call.
"""
from __future__ import annotations

import argparse
import gc
import json

import torch

from gla.bench import md_table, timed, write_report


def ours(cfg, B, prompt_len, device, dtype, cuda_graph: bool, compile_step: bool = False):
    """(row name, mode, run(new_tokens)) for gla.generate."""
    from gla.generation import generate
    from gla.models import GLATransformer
    torch.manual_seed(0)
    model = GLATransformer.from_config(cfg).to(device, dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (B, prompt_len), device=device)

    ran = {}  # which step the captured decoder ran (the fused one where it serves the model); not the model itself,
    # which the caller frees with ``run`` before the next row

    def run(new):
        from gla.decoding import _DECODERS
        from gla.decoding_fused import FusedStep
        generate(model, ids, new, temperature=0, cuda_graph=cuda_graph, compile_step=compile_step)
        if cuda_graph:
            fused = any(isinstance(d.run, FusedStep) for d in _DECODERS.get(model, {}).values())
            ran["step"] = "fused step" if fused else "compile" if compile_step else "plain step"

    def mode():
        return "CUDA graph + " + ran.get("step", "?") if cuda_graph else "eager"
    return "gla (ours)", mode, run


def llama(cfg, B, prompt_len, device, dtype, max_new: int):
    from .peers import llama_twin
    torch.manual_seed(0)
    model = llama_twin(cfg, prompt_len + max_new + 8).to(device, dtype).eval()
    # With a static cache, transformers' generate compiles the decoding forward itself (its CompileConfig: fullgraph,
    # "reduce-overhead", i.e. CUDA graphs); compiling model.forward on top of that broke its graphs (transformers
    # 5.17: "accessing tensor output of CUDAGraphs that has been overwritten").
    model.generation_config.cache_implementation = "static"
    mode = "compiled" if device.type == "cuda" else "eager"
    return "HF Llama, static cache", mode, _hf_run(model, cfg, B, prompt_len, device)


def fla(cfg, B, prompt_len, device, dtype, max_new: int):
    from .peers import fla_twin
    torch.manual_seed(0)
    model = fla_twin(cfg, prompt_len + max_new + 8).to(device, dtype).eval()
    return "FLA GLAForCausalLM", "eager", _hf_run(model, cfg, B, prompt_len, device)


def _hf_run(model, cfg, B, prompt_len, device):
    ids = torch.randint(0, cfg.vocab_size, (B, prompt_len), device=device)

    def run(new):
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
    return run


def measure(name, mode, run, B: int, new: int, device) -> dict:
    """Time ``run`` (built by ours / llama / fla) as the module docstring says; the caller drops it afterwards."""
    first = timed(lambda: run(new), device)
    ttft = timed(lambda: run(1), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    total = timed(lambda: run(new), device)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    decode = (total - ttft) / (new - 1) if new > 1 else total
    return dict(model=name, mode=mode, B=B, first_s=first, ttft_s=ttft, total_s=total, ms_token=decode * 1e3,
                tok_s=B * new / total, peak_gib=peak)


def table(rows) -> str:
    def gib(r):
        return "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
    return md_table(["model", "mode", "B", "prompt", "tok/s", "decode ms/token", "first token ms", "peak GiB",
                     "first call s"],
                    [[r["model"], r["mode"], str(r["B"]), str(r["prompt"])] + (["out of memory"] + ["-"] * 4
                     if r.get("oom") else [f"{r['tok_s']:,.1f}", f"{r['ms_token']:.2f}", f"{r['ttft_s'] * 1e3:.1f}",
                                           gib(r), f"{r['first_s']:.1f}"]) for r in rows])


OURS = {"eager": (False,), "graph": (True,), "compiled": (True, True)}  # --ours: ours()'s cuda_graph, compile_step


def main(argv=None) -> int:
    from gla.device import resolve_device
    from gla.models import GLAConfig
    p = argparse.ArgumentParser(prog="gla bench generate", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--preset", default="gla-340m")
    p.add_argument("--batch", type=int, action="append", default=None, help="batch sizes (default 1 and 16)")
    p.add_argument("--prompt-len", type=int, action="append", default=None, help="prompt lengths (default 512)")
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--ours", action="append", choices=OURS, default=None,
                   help="our rows (default all: eager, and on CUDA the captured step and the compiled one)")
    p.add_argument("--no-llama", action="store_true", help="leave out the HF Llama rows")
    p.add_argument("--fla", action="store_true", help="add FLA's GLAForCausalLM (flash-linear-attention)")
    p.add_argument("--out", default=None, help="write DIR/generate.md and .json")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    prompts = a.prompt_len or [512]
    if min(prompts) < 1 or a.new < 1:
        p.error("--prompt-len and --new must be >= 1")
    device = resolve_device(a.device)
    if device.type != "cuda" and set(a.ours or ()) - {"eager"}:
        p.error("--ours graph and compiled capture CUDA graphs: they need --device cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = GLAConfig.preset(a.preset, max_seq_len=max(prompts) + a.new)
    rows = []
    for L in prompts:
        for B in a.batch or [1, 16]:
            makers = [lambda graph=OURS[kind]: ours(cfg, B, L, device, dtype, *graph)
                      for kind in a.ours or (OURS if device.type == "cuda" else ["eager"])]
            if not a.no_llama:
                makers.append(lambda: llama(cfg, B, L, device, dtype, a.new))
            if a.fla:
                makers.append(lambda: fla(cfg, B, L, device, dtype, a.new))
            for make in makers:
                gc.collect()  # the previous row's model and captured graphs out of this row's peak memory
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                name, mode, run = make()
                try:
                    r = {**measure(name, mode, run, B, a.new, device), "prompt": L}
                    r["mode"] = mode() if callable(mode) else mode
                except torch.OutOfMemoryError:  # a model that cannot hold this shape is a result, not a crash
                    r = dict(model=name, mode=mode() if callable(mode) else mode, B=B, prompt=L, oom=True)
                del run
                rows.append(r)
                if not a.json:
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    md = (f"Generation on {where}, torch {torch.__version__}, {a.preset} and its peers, {dtype}, {a.new} new tokens, "
          f"greedy\n\n{table(rows)}")
    print(json.dumps(rows) if a.json else "\n" + md)
    if a.out:
        write_report(a.out, "generate", md, rows)
    return 0


if __name__ == "__main__":
    main()
