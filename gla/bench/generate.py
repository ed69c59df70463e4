"""Generation benchmark: gla.generate (eager steps, CUDA-graph steps, compiled CUDA-graph steps) vs a same-size HF
Llama with a static KV cache and a compiled forward, one process, greedy.

    gla bench generate [--device cuda|cpu] [--preset gla-340m] [--batch 1 --batch 16] [--prompt-len 512]
                       [--new 256] [--no-llama] [--out DIR] [--json]

Ours: the preset with random weights (bf16 on CUDA, fp32 on a CPU). The Llama has the same width, depth, vocabulary
and MLP size with softmax attention (Llama-341M beside gla-340m: hidden 1024, 24 layers, 8 heads of 128, MLP 2816),
generating through transformers' `generate` with `cache_implementation="static"`, under which transformers compiles
its decoding forward on CUDA (as it documents for fast decoding). Per row: tokens/s over the new tokens, the time
of the first call (prefill + compile / capture), and ms per token of a second call (its whole time over the new
tokens).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from gla.bench import md_table, write_report


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def ours(cfg, B: int, prompt_len: int, new: int, device, dtype, cuda_graph: bool, compile_step: bool = False) -> dict:
    from gla.generation import generate
    from gla.models import GLATransformer
    torch.manual_seed(0)
    model = GLATransformer.from_config(cfg).to(device, dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (B, prompt_len), device=device)
    run = lambda: generate(model, ids, new, temperature=0, cuda_graph=cuda_graph,  # noqa: E731
                           compile_step=compile_step)
    first = _time(run, device)
    total = _time(run, device)
    mode = ("CUDA graph + compile" if compile_step else "CUDA graph") if cuda_graph else "eager"
    return dict(model="gla (ours)", mode=mode, first_s=first, total_s=total)


def llama(cfg, B: int, prompt_len: int, new: int, device, dtype) -> dict:
    from .peers import llama_twin
    torch.manual_seed(0)
    model = llama_twin(cfg, prompt_len + new + 8).to(device, dtype).eval()
    # With a static cache, transformers' generate compiles the decoding forward itself (its CompileConfig: fullgraph,
    # "reduce-overhead", i.e. CUDA graphs); compiling model.forward on top of that broke its graphs (transformers
    # 5.17: "accessing tensor output of CUDAGraphs that has been overwritten").
    model.generation_config.cache_implementation = "static"
    ids = torch.randint(0, cfg.vocab_size, (B, prompt_len), device=device)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    run = lambda: model.generate(ids, attention_mask=torch.ones_like(ids), **kw)  # noqa: E731
    with torch.inference_mode():
        first = _time(run, device)
        total = _time(run, device)
    return dict(model="HF Llama, static cache", mode="compiled" if device.type == "cuda" else "eager",
                first_s=first, total_s=total)


def table(rows) -> str:
    return md_table(["model", "mode", "B", "tok/s", "ms/token", "first call s"],
                    [[r["model"], r["mode"], str(r["B"]), f"{r['tok_s']:,.1f}", f"{r['ms_token']:.2f}",
                      f"{r['first_s']:.1f}"] for r in rows])


def main(argv=None) -> int:
    from gla.device import resolve_device
    from gla.models import GLAConfig
    p = argparse.ArgumentParser(prog="gla bench generate", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--preset", default="gla-340m")
    p.add_argument("--batch", type=int, action="append", default=None, help="batch sizes (default 1 and 16)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--no-llama", action="store_true", help="leave out the HF Llama rows")
    p.add_argument("--out", default=None, help="write DIR/generate.md and .json")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.prompt_len < 1 or a.new < 1:
        p.error("--prompt-len and --new must be >= 1")
    device = resolve_device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = GLAConfig.preset(a.preset)
    rows = []
    for B in a.batch or [1, 16]:
        runs = [lambda: ours(cfg, B, a.prompt_len, a.new, device, dtype, False)]
        if device.type == "cuda":
            runs.append(lambda: ours(cfg, B, a.prompt_len, a.new, device, dtype, True))
            runs.append(lambda: ours(cfg, B, a.prompt_len, a.new, device, dtype, True, compile_step=True))
        if not a.no_llama:
            runs.append(lambda: llama(cfg, B, a.prompt_len, a.new, device, dtype))
        for run in runs:
            r = run()
            r.update(B=B, tok_s=B * a.new / r["total_s"], ms_token=r["total_s"] / a.new * 1e3)
            rows.append(r)
            if not a.json:
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    md = (f"Generation on {where}, torch {torch.__version__}, {a.preset} and its Llama twin, {dtype}, prompt "
          f"{a.prompt_len}, {a.new} new tokens, greedy (ms/token: the whole second call over the new tokens)\n\n"
          f"{table(rows)}")
    print(json.dumps(rows) if a.json else "\n" + md)
    if a.out:
        write_report(a.out, "generate", md, rows)
    return 0


if __name__ == "__main__":
    main()
