"""Regenerate docs/results.md: MQAR recall and perplexity across token mixers, decode cost vs context, and the CPU
operator benchmark, each with the exact command that produced it.

    python -m gla.bench.results [--out docs] [--quick]     (make results)
    python -m gla.bench.results --gpu-only                 (after new GPU MQAR runs: re-splice that section only)

The CPU settings are the small end of each experiment (about an hour on 2 cores; --quick: a few minutes, for
checking the pipeline). The full MQAR grid of the GLA paper (Fig. 4) needs a GPU: add --device cuda and larger
--d-model / --steps to the mqar command.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import shutil
import subprocess
import sys

import torch


def _run(cmd: list[str]) -> str:
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, "-m", "gla.cli", *cmd], check=True, capture_output=True, text=True).stdout


def _mqar(mixers: str, d_model: str, steps: str, lrs: str, conv: list, seeds: str, stop: list, out: str) -> list:
    """The page's MQAR task (T=64, 4 pairs, vocabulary 256, blocks without MLP) as a `gla eval mqar` command."""
    return ["eval", "mqar", "--mixers", mixers, "--d-model", d_model, "--seq-len", "64", "--kv-pairs", "4", "--steps",
            steps, "--lrs", lrs, "--vocab-size", "256", "--mlp", "none", *conv, "--seeds", seeds, *stop, "--out", out]


def build(out: str, quick: bool) -> str:
    res = os.path.join(out, "results")
    os.makedirs(res, exist_ok=True)
    steps = "40" if quick else "600"
    seeds = "0" if quick else "0,1,2"
    mqar = _mqar("softmax,gla,retnet,linear", "32" if quick else "32,64", steps, "1e-3,3e-3", ["--short-conv"],
                 seeds, ["--eval-every", "0"], res)
    no_conv = os.path.join(res, "mqar-no-conv")
    nc_d, nc_steps, nc_lr = ("32", "40", "3e-3") if quick else ("64", "3000", "3e-3")
    mqar_no_conv = _mqar("gla,retnet,linear", nc_d, nc_steps, nc_lr, [], seeds,
                         ["--eval-every", "20" if quick else "500", "--stop-at", "0.99"], no_conv)
    compare = ["eval", "compare", "--mixers", "gla,softmax,retnet,linear", "--data", "shakespeare", "--preset", "demo",
               "--d-model", "128", "--n-layers", "4", "--n-heads", "4", "--seq-len", "64", "--batch-size", "12",
               "--steps", "40" if quick else "1000", "--lr", "1e-3", "--beta2", "0.99", "--device", "cpu",
               "--gate-bias-init", "0,3", "--out", os.path.join("runs", "compare")]
    decode = ["bench", "decode", "--contexts", "1024,4096" if quick else "1024,4096,16384,65536", "--out", res]
    ops = ["bench", "ops", "--T", "1024" if quick else "4096"]
    shutil.rmtree(os.path.join("runs", "compare"), ignore_errors=True)  # the comparison's own runs start afresh
    sections = [("MQAR recall across token mixers", mqar, lambda: open(os.path.join(res, "mqar.md")).read(),
                 f"![MQAR accuracy](results/mqar.png)\n\nThis is the CPU budget ({steps} steps of batch 64, "
                 "vocabulary 256, blocks without MLP as in Zoology, a short convolution before each recurrent mixer; "
                 "each cell is the mean over the seeds at the better of two rates, with their range): a check that "
                 "runs in minutes. The GLA paper's grid (Fig. 4) needs the GPU: see the GPU section below. GLA "
                 "with its forget gate starting nearly open (--gate-bias-init 3) at these settings, paired seed by "
                 "seed with the runs above: docs/results/mqar-cpu-gate-bias. Without the short convolution no "
                 "recurrent mixer learns the task in this budget (docs/results/mqar-cpu-short-conv); given more "
                 "steps, only GLA does (next section)."),
                ("MQAR without the short convolution (gla's default model)", mqar_no_conv,
                 lambda: open(os.path.join(no_conv, "mqar.md")).read(),
                 "The same task as above with the recurrent mixers as `gla`'s default model builds them (like FLA's "
                 f"GLA: no short convolution), {int(nc_steps) // int(steps)}x the steps, at d={nc_d} and lr {nc_lr} "
                 "(the better of 1e-3 and 3e-3 for all three mixers at d=64 in docs/results/mqar-cpu-short-conv); "
                 "softmax, which never has the convolution, is in the table above. This is the GLA paper's claim in "
                 "small: the data-dependent forget gate learns recall that linear attention (no decay) and RetNet (a "
                 "fixed decay) do not. On the GPU, at Zoology's three tasks (vocabulary 8192), d=64 and 128, GLA is "
                 "ahead of both in each of three seeds "
                 "(each mixer at its best rate): \"Without the short convolution\" in the GPU section."),
                ("Perplexity across token mixers (character-level Shakespeare)", compare,
                 lambda: open(os.path.join("runs", "compare", "compare.md")).read(),
                 "\"gla, gate bias 3.0\" is GLA with its forget gate starting nearly open, the start that helped it "
                 "leave the chance plateau in MQAR on the GPU (see below); three seeds of both starts: "
                 "docs/results/gate-bias-ppl."),
                ("Decoding: per-token latency and memory vs context", decode,
                 lambda: open(os.path.join(res, "decode.md")).read(), "![decode](results/decode.png)"),
                ("CPU operator", ops, None, "Times on a shared 2-core machine vary from run to run (the recurrent "
                 "reference by up to several times between runs minutes apart), so the ratios hold for this run "
                 "only: benchmarks/NOTES.md keeps repeated measurements.")]
    parts = [f"# Results\n\nRegenerated by `make results` on {datetime.date.today()} (torch {torch.__version__}, "
             f"{os.cpu_count()} CPU threads){' — quick mode' if quick else ''}. Each section gives its command.\n"]
    for title, cmd, table, extra in sections:
        stdout = _run(cmd)
        body = table() if table else stdout
        parts.append(f"## {title}\n\n    gla {shlex.join(cmd)}\n\n{body.strip()}\n\n{extra}\n")
    gpu = gpu_mqar_section(res)
    if gpu:
        parts.append(gpu)
    text = "\n".join(parts)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    return text


GPU_HEADING = "## MQAR on the GPU (kept from its own runs)"


def splice_gpu_section(out: str) -> str:
    """Replace the GPU MQAR section of OUT/results.md (always its last) with one built from OUT/results/mqar-gpu,
    leaving the CPU sections as they were measured: they take about an hour to regenerate."""
    path = os.path.join(out, "results.md")
    if not os.path.exists(path):
        raise SystemExit(f"--gpu-only: {path} does not exist; build the page first (make results)")
    gpu = gpu_mqar_section(os.path.join(out, "results"))
    if gpu is None:
        raise SystemExit(f"--gpu-only: {os.path.join(out, 'results', 'mqar-gpu', 'mqar.md')} does not exist")
    text = open(path).read()
    heading = re.search(rf"^{re.escape(GPU_HEADING)}$", text, re.M)  # a whole line: a quote of it is not the cut
    text = (text[:heading.start()] if heading else text.rstrip("\n") + "\n\n") + gpu
    with open(path, "w") as f:
        f.write(text)
    return text


def gpu_mqar_section(res: str) -> str | None:
    """The MQAR grid measured on a GPU (RES/mqar-gpu), kept as measured: this CPU page does not repeat it."""
    gpu = os.path.join(res, "mqar-gpu")
    if not os.path.exists(os.path.join(gpu, "mqar.md")):
        return None
    notes = open(os.path.join(gpu, "README.md")).read().strip()
    table = open(os.path.join(gpu, "mqar.md")).read().strip()
    return (f"{GPU_HEADING}\n\n{notes}\n\n{table}\n\n"
            "![MQAR on the GPU](results/mqar-gpu/mqar.png)\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs")
    p.add_argument("--quick", action="store_true", help="tiny settings: checks the pipeline in a few minutes")
    p.add_argument("--gpu-only", action="store_true",
                   help="train nothing: rebuild only the GPU MQAR section from OUT/results/mqar-gpu")
    a = p.parse_args(argv)
    if a.gpu_only and a.quick:
        p.error("--gpu-only trains nothing, so --quick does not apply")
    if a.gpu_only:
        splice_gpu_section(a.out)
    else:
        build(a.out, a.quick)
    print(f"wrote {os.path.join(a.out, 'results.md')}")


if __name__ == "__main__":
    main()
