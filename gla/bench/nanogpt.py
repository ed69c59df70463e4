"""`gla bench nanogpt`: nanoGPT's CPU recipe run by nanoGPT itself and by `gla train`, one after the other.

nanoGPT's README trains a character-level GPT on tiny-shakespeare on a CPU with
    train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1
    --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000
    --dropout=0.0
(AdamW, lr 1e-3 with 100 warmup steps and cosine decay to 1e-4, beta2 0.99, the last 10% of the text as
validation, evaluations every 250 steps: with --steps not a multiple of 250 nanoGPT's last one comes before the
end, gla's at it). `gla train` runs the same sizes and schedule with a GLA model whose SwiGLU MLP has nanoGPT's
MLP parameter count (D_FF). Both are separate processes started the same way; each row is
the wall time of the whole process (data preparation excluded) and its last validation loss in nats per character
(nanoGPT: the mean of 20 random batches; gla: of 20 batches of fixed windows). nanoGPT is not a dependency: pass a
checkout (git clone https://github.com/karpathy/nanoGPT); it is copied to a temporary directory and run there with
its own prepare.py on the given text, which needs numpy and requests.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

LAYERS, HEADS, WIDTH, CONTEXT, BATCH = 4, 4, 128, 64, 12  # the recipe's sizes, given to both runs
# nanoGPT's MLP has two 128 x 512 matrices (131,072 weights); SwiGLU's three 128 x d_ff ones match that at
# d_ff = 341.3, here the nearest multiple of 8 (132,096). (384, used before, gave the GLA model 12% more MLP.)
D_FF = 344
NANOGPT_FLAGS = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", f"--block_size={CONTEXT}",
                 f"--batch_size={BATCH}", f"--n_layer={LAYERS}", f"--n_head={HEADS}", f"--n_embd={WIDTH}",
                 "--dropout=0.0"]
VAL_LINE = re.compile(r"step (\d+): train loss ([0-9.]+), val loss ([0-9.]+)")


def _run(cmd: list[str], cwd: str) -> tuple[float, str]:
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}) in {cwd}:\n{out.stderr[-3000:]}")
    return wall, out.stdout


def run_nanogpt(checkout: str, data: str, steps: int, work: str) -> dict:
    """nanoGPT's CPU recipe in a copy of ``checkout`` under ``work``: {wall_s, val_loss, step}."""
    if not os.path.isfile(os.path.join(checkout, "train.py")):
        raise FileNotFoundError(f"--nanogpt {checkout!r}: no train.py there (a nanoGPT checkout is expected)")
    repo = os.path.join(work, "nanoGPT")
    shutil.copytree(checkout, repo, ignore=shutil.ignore_patterns(".git", "out-*"))
    prep = os.path.join(repo, "data", "shakespeare_char")
    shutil.copyfile(data, os.path.join(prep, "input.txt"))  # prepare.py downloads only when this is missing
    _run([sys.executable, "prepare.py"], prep)
    wall, out = _run([sys.executable, "train.py", "config/train_shakespeare_char.py", *NANOGPT_FLAGS,
                      f"--max_iters={steps}", f"--lr_decay_iters={steps}", f"--out_dir={os.path.join(work, 'out')}"],
                     repo)
    last = VAL_LINE.findall(out)
    if not last:
        raise RuntimeError(f"nanoGPT printed no validation line:\n{out[-2000:]}")
    step, _, val = last[-1]
    return dict(run="nanoGPT (GPT, softmax attention)", wall_s=wall, val_loss=float(val), step=int(step))


def run_gla(data: str, steps: int, work: str) -> dict:
    """`gla train` at the same sizes and schedule: {wall_s, val_loss, step}."""
    flags = ["--data", data, "--n-layers", str(LAYERS), "--n-heads", str(HEADS), "--d-model", str(WIDTH),
             "--d-ff", str(D_FF), "--seq-len", str(CONTEXT), "--batch-size", str(BATCH), "--steps", str(steps),
             "--lr", "1e-3", "--min-lr", "1e-4", "--warmup", "100", "--dropout", "0", "--beta2", "0.99",
             "--eval-every", "250", "--eval-batches", "20", "--sample-tokens", "0", "--device", "cpu",
             "--out", os.path.join(work, "gla"), "--json"]
    wall, out = _run([sys.executable, "-m", "gla.cli", "train", *flags], os.getcwd())
    summary = json.loads(out.strip().splitlines()[-1])
    return dict(run="gla train (GLA)", wall_s=wall, val_loss=summary["val_loss"], step=summary["step"])


def table(rows: list[dict], title: str) -> str:
    base = rows[0]["wall_s"]
    lines = [title, "", "| run | last evaluation (step) | wall s | vs nanoGPT | val loss (nats/char) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['step']} | {r['wall_s']:.1f} | {r['wall_s'] / base:.2f}x | {r['val_loss']:.4f} |"
              for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gla bench nanogpt", description=__doc__.split("\n\n")[0])
    p.add_argument("--nanogpt", required=True, help="a nanoGPT checkout (not modified: it runs in a copy)")
    p.add_argument("--data", required=True, help="the text, e.g. tiny-shakespeare's input.txt")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps of each run (the recipe's 2000)")
    p.add_argument("--out", help="write DIR/nanogpt.md and DIR/nanogpt.json")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    if args.steps < 1 or not os.path.isfile(args.data):
        p.error(f"need --steps >= 1 and an existing --data file, got {args.steps} and {args.data!r}")
    import torch
    with tempfile.TemporaryDirectory() as work:
        try:
            rows = [run_nanogpt(args.nanogpt, args.data, args.steps, work), run_gla(args.data, args.steps, work)]
        except (FileNotFoundError, RuntimeError) as e:  # a foreign checkout, a run that failed: its own message
            p.exit(2, f"gla bench nanogpt: error: {e}\n")
    title = (f"nanoGPT's CPU recipe, {args.steps} steps, {os.cpu_count()} CPUs, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if args.json:
        print(json.dumps(rows))
    else:
        print(table(rows, title))
    if args.out:
        from gla.bench import write_report
        write_report(args.out, "nanogpt", table(rows, title), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
