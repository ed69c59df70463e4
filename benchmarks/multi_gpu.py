"""`gla train` on several GPUs of one host with NCCL: throughput, loss agreement with one GPU, exact resume.

    python benchmarks/multi_gpu.py throughput [--gpus 2] [--presets gla-340m,gla-1.3b] [--steps 40] [--out DIR]
    python benchmarks/multi_gpu.py scaling [--gpus 2] [--presets ...] [--per-gpu-batch 4,8] [--steps 40] [--out DIR]
    python benchmarks/multi_gpu.py resume [--gpus 2] [--out DIR]          (all: [--work SCRATCH_DIR])

throughput: each preset trains on the default corpus (bytes, seq 2048, global batch 16, 8 for 1.3B; bf16) on one
GPU, then under `torchrun --nproc_per_node=N` with --parallel ddp and fsdp at the same global batch, so every run
sees the same tokens. The table gives tokens/s after the first five steps (compilation excluded), the speed-up
over one GPU, rank 0's peak memory, and how far each step's training loss strays from the one-GPU run's (bf16 sums
in another order at step 1, then amplified by training).

scaling: the same batch per GPU instead: one GPU at b sequences per step against DDP at gpus * b; efficiency is
the DDP rate over gpus times the one-GPU rate.

resume: under torchrun, for ddp and fsdp, a run crashed after its step-8 checkpoint and resumed must reproduce the
uninterrupted run's loss curve (train and validation, dropout on) exactly. Each of the three runs is its own torchrun
launch; the crashed one is this script as the worker, killing its processes with os._exit before step 11.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0): on shared hosts it can take the GPUs out of service.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
ENV = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
BATCH = {"gla-340m": 16, "gla-1.3b": 8}   # global sequences per step; 1.3B at 16 does not fit one GPU's 140 GB
TRAIN = ["--data", "shakespeare", "--seq-len", "2048", "--warmup", "10", "--log-every", "1",
         "--eval-every", "1000", "--eval-batches", "2", "--sample-tokens", "0", "--device", "cuda", "--dtype", "bf16",
         "--json"]


def torchrun(gpus: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]


def run_train(launcher: list[str], args: list[str], out: str, log) -> dict:
    """One `gla train`; returns its JSON summary plus the metrics records."""
    from gla.training import report
    shutil.rmtree(out, ignore_errors=True)
    stdout = _launch([*launcher, "-m", "gla.cli", "train", *args, "--out", out], log)
    summary = json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith("{")))
    summary["metrics"] = report.read_metrics(out)
    shutil.rmtree(out, ignore_errors=True)   # checkpoints of 1.3B models fill the disk
    return summary


def steady_rate(metrics: list[dict]) -> float:
    """Median tokens/s per step after the first five (which hold kernel compilation and allocator warm-up)."""
    rates = [r["tok_per_s"] for r in metrics if "tok_per_s" in r][5:]
    return statistics.median(rates)


def _start(a, name: str):
    """Check --steps, make --out, open its log for mode `name`."""
    if a.steps < 10:
        raise SystemExit("--steps must be >= 10: the rate is a median over the steps after the first five")
    os.makedirs(a.out, exist_ok=True)
    return open(os.path.join(a.out, f"{name}.log"), "a")


def throughput(a) -> None:
    rows, work = [], os.path.join(a.work, "tput")
    with _start(a, "throughput") as log:
        for preset in a.presets.split(","):
            batch = BATCH.get(preset, 16)
            base = ["--preset", preset, "--steps", str(a.steps), "--batch-size", str(batch), *TRAIN]
            one = run_train([sys.executable], base, os.path.join(work, "one"), log)
            ref = {r["step"]: r["loss"] for r in one["metrics"] if "loss" in r}
            runs = [("1 GPU", one)]
            for par in ("ddp", "fsdp"):
                runs.append((f"{a.gpus} GPUs {par}", run_train(torchrun(a.gpus), [*base, "--parallel", par],
                                                               os.path.join(work, par), log)))
            base_rate = steady_rate(one["metrics"])
            for name, s in runs:
                loss = {r["step"]: r["loss"] for r in s["metrics"] if "loss" in r}
                gap = [abs(loss[k] - ref[k]) for k in sorted(ref)]
                rate = steady_rate(s["metrics"])
                rows.append(dict(preset=preset, params_m=round(s["params"] / 1e6, 1), run=name,
                                 batch=batch, tok_per_s=rate, speedup=rate / base_rate,
                                 peak_mem_gib=s.get("peak_mem_gib"), gap_step1=gap[0], gap_first10=max(gap[:10]),
                                 gap_max=max(gap), final_loss=s["loss"], val_loss=s["val_loss"],
                                 losses=[loss[k] for k in sorted(loss)]))
                log.write(json.dumps(rows[-1]) + "\n")
            _table(a.out, "throughput", rows, "| preset | params | batch | run | tokens/s | vs 1 GPU "
                   "| peak GiB (rank 0) | loss gap to 1 GPU: step 1 / max of 1-10 / max | final loss |", lambda r: (
                       f"| {r['preset']} | {r['params_m']}M | {r['batch']} | {r['run']} | {r['tok_per_s']:,.0f} | "
                       f"{r['speedup']:.2f}x | {r['peak_mem_gib']} | {r['gap_step1']:.1e} / "
                       f"{r['gap_first10']:.1e} / {r['gap_max']:.1e} | {r['final_loss']:.4f} |"))


def scaling(a) -> None:
    """Same batch per GPU: one GPU at b sequences per step against DDP on --gpus GPUs at gpus * b."""
    rows, work = [], os.path.join(a.work, "scaling")
    with _start(a, "scaling") as log:
        for preset in a.presets.split(","):
            for b in (int(x) for x in a.per_gpu_batch.split(",")):
                base = ["--preset", preset, "--steps", str(a.steps), *TRAIN]
                one = run_train([sys.executable], [*base, "--batch-size", str(b)], os.path.join(work, "one"), log)
                ddp = run_train(torchrun(a.gpus), [*base, "--batch-size", str(b * a.gpus), "--parallel", "ddp"],
                                os.path.join(work, "ddp"), log)
                r1, r2 = steady_rate(one["metrics"]), steady_rate(ddp["metrics"])
                rows.append(dict(preset=preset, per_gpu_batch=b, gpus=a.gpus, one_tok_per_s=r1, ddp_tok_per_s=r2,
                                 efficiency=r2 / (a.gpus * r1), one_peak_gib=one.get("peak_mem_gib"),
                                 ddp_peak_gib=ddp.get("peak_mem_gib")))
                log.write(json.dumps(rows[-1]) + "\n")
            _table(a.out, "scaling", rows, "| preset | batch per GPU | 1 GPU tokens/s | DDP tokens/s | efficiency "
                   "| peak GiB, 1 GPU / DDP rank 0 |", lambda r: (
                       f"| {r['preset']} | {r['per_gpu_batch']} | {r['one_tok_per_s']:,.0f} | "
                       f"{r['ddp_tok_per_s']:,.0f} ({r['gpus']} GPUs) | {r['efficiency']:.1%} | "
                       f"{r['one_peak_gib']} / {r['ddp_peak_gib']} |"))


def _table(out: str, name: str, rows: list[dict], header: str, line) -> None:
    """NAME.md (header, then line(row) per row) and NAME.jsonl in `out`; the table is printed too."""
    text = "\n".join([header, "|---" * header.count(" | ") + "|---|", *map(line, rows)]) + "\n"
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(text, flush=True)


RESUME = ["--data", "shakespeare", "--preset", "demo", "--seq-len", "512", "--batch-size", "16", "--steps", "12",
          "--warmup", "2", "--dropout", "0.1", "--eval-every", "4", "--eval-batches", "2", "--log-every", "1",
          "--sample-tokens", "0", "--device", "cuda", "--dtype", "bf16", "--json"]
CRASH_AT = 10   # the last checkpoint before it is step 8


def crash_worker(argv: list[str]) -> None:
    """`gla train` whose processes all die before step CRASH_AT + 1, as at a power cut (run under torchrun)."""
    from gla.cli import main as cli
    from gla.training import Trainer
    real_step = Trainer.train_step

    def crashing_step(self):
        if self.step == CRASH_AT:
            os._exit(1)   # no clean-up, no final checkpoint
        return real_step(self)

    Trainer.train_step = crashing_step
    sys.exit(cli(argv))


def _curves(out: str) -> tuple[list, list]:
    from gla.training import report
    recs = report.read_metrics(out)
    return ([(r["step"], r["loss"]) for r in recs if "loss" in r],
            [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r])


def resume(a) -> None:
    os.makedirs(a.out, exist_ok=True)
    results = []
    with open(os.path.join(a.out, "resume.log"), "a") as log:
        for par in ("ddp", "fsdp"):
            args = ["train", *RESUME, "--parallel", par]
            full, cut = os.path.join(a.work, f"{par}-full"), os.path.join(a.work, f"{par}-cut")
            for d in (full, cut):
                shutil.rmtree(d, ignore_errors=True)
            _launch([*torchrun(a.gpus), "-m", "gla.cli", *args, "--out", full], log)
            _launch([*torchrun(a.gpus), os.path.abspath(__file__), "crash-worker", *args, "--out", cut], log,
                    check=False)
            cut_train = _curves(cut)[0]
            if len(cut_train) != CRASH_AT:
                raise RuntimeError(f"the crashed {par} run logged {len(cut_train)} steps, not {CRASH_AT}")
            _launch([*torchrun(a.gpus), "-m", "gla.cli", *args, "--out", cut, "--resume"], log)
            ref, got = _curves(full), _curves(cut)
            results.append({"parallel": par, "world": a.gpus, "steps_before_crash":
                            len(cut_train), "exact": ref == got, "train_steps": len(ref[0]), "val_points": len(ref[1]),
                            "max_train_diff": max(abs(x[1] - y[1]) for x, y in zip(ref[0], got[0])),
                            "full": ref, "resumed": got})
            print(json.dumps({k: v for k, v in results[-1].items() if k not in ("full", "resumed")}), flush=True)
    with open(os.path.join(a.out, "resume.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    if not all(r["exact"] for r in results):
        raise SystemExit("a resumed run did not reproduce the uninterrupted one")


def _launch(cmd: list[str], log, check: bool = True) -> str:
    """Run cmd (stdout and stderr tails to the log); its stdout, or raise if it failed and check is set."""
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    p = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True)
    log.write(f"rc {p.returncode}\n{p.stdout[-3000:]}{p.stderr[-3000:]}\n")
    log.flush()
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with {p.returncode}:\n{p.stderr[-3000:]}")
    return p.stdout


def main() -> None:
    if sys.argv[1:2] == ["crash-worker"]:
        return crash_worker(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("throughput", "scaling", "resume"))
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--presets", default="gla-340m,gla-1.3b")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--per-gpu-batch", default="4,8", help="scaling: sequences per GPU per step, comma-separated")
    ap.add_argument("--out", default="runs/multi_gpu")
    ap.add_argument("--work", default="/tmp/gla-multi-gpu")
    a = ap.parse_args()
    {"throughput": throughput, "scaling": scaling, "resume": resume}[a.mode](a)


if __name__ == "__main__":
    main()
