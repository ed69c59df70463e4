"""MQAR across token mixers from the command line: the grid, its tables (best learning rate per cell) and plot.

    gla eval mqar --mixers gla,softmax,retnet,linear --d-model 64,128 --seq-len 64 --kv-pairs 4 --steps 400 --json
    gla eval mqar --device cuda --group 16 --d-model 64,128,256 --seq-len 64,128,256 --kv-pairs 4,8,16 ...  (grid)
    gla eval mqar --from-runs a/mqar-runs.jsonl b/mqar-runs.jsonl --out docs/results/mqar-gpu  (a grid in parts)
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

from gla.eval.mqar import MQARResult, check_seeds, check_stopping, make_mqar, sweep
from gla.training.report import say

DEFAULT_OUT = os.path.join("runs", "mqar")
from gla.eval.variants import mixer_label, mixer_variants, parse_gate_biases


def _record(r: MQARResult) -> str:
    """One JSON line of mqar-runs.jsonl (every run), read back by load_runs."""
    return json.dumps(dataclasses.asdict(r))


def _budget(r: dict) -> tuple:
    """One table (plot panel): a task at one training budget (steps of a batch size), precision and model."""
    return r["seq_len"], r["kv_pairs"], r["steps"], r["batch_size"], r["precision"], r["mlp"], r["short_conv"]


def _label(budget: tuple) -> str:
    t, kv, steps, batch_size, precision, mlp, short_conv = budget
    return (f"T={t}, {kv} KV pairs, {steps} steps" + ("" if batch_size is None else f" of batch {batch_size}")
            + ("" if precision == "fp32" else f", {precision}") + ("" if mlp == "swiglu" else f", mlp {mlp}")
            + (", short conv" if short_conv else ""))


def _row(r: dict) -> tuple:
    """A table row (plot line): the mixer and its gate's initial bias (0: the default, and mixers without one)."""
    return r["mixer"], float(r["gate_bias_init"])


def _cell(r: dict) -> tuple:
    """A table cell: one budget, one row, one width (learning rates compete within it)."""
    return *_budget(r), _row(r), r["d_model"]


PER_RUN = ("seed", "accuracy", "final_loss", "stopped_at", "seconds")  # what differs between the seeds of a rate


def best_per_cell(runs) -> list[dict]:
    """Each cell's best learning rate as one record, cells in the order they first appear in ``runs``.

    The best rate is the one whose runs (one per seed) have the highest mean accuracy, so with as many seeds per
    rate a single lucky run does not pick it (rates with fewer seeds are noisier). The record holds the runs'
    shared fields, accuracy (their mean), accuracy_min, accuracy_max and ``runs``: each seed's PER_RUN fields.
    Two runs of one cell, rate and seed (the same run merged twice) are an error."""
    by_rate = {}
    for r in map(dataclasses.asdict, runs):
        rs = by_rate.setdefault((_cell(r), r["lr"]), [])
        if any(o["seed"] == r["seed"] for o in rs):
            raise ValueError(f"two runs of {mixer_label(*_row(r))}, d_model {r['d_model']}, lr {r['lr']:g}, "
                             f"seed {r['seed']} at {_label(_budget(r))}: pass each run once")
        rs.append(r)
    best = {}
    for (cell, _), rs in by_rate.items():
        accs = [r["accuracy"] for r in rs]
        mean = sum(accs) / len(accs)
        if cell not in best or mean > best[cell]["accuracy"]:
            best[cell] = {**{k: v for k, v in rs[0].items() if k not in PER_RUN}, "accuracy": mean,
                          "accuracy_min": min(accs), "accuracy_max": max(accs),
                          "runs": [{k: r[k] for k in PER_RUN} for r in rs]}
    return list(best.values())


def load_runs(paths) -> list:
    """MQARResult records from mqar-runs.jsonl files (a clear error for a missing or malformed file)."""
    runs = []
    for path in paths:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                try:
                    runs.append(MQARResult(**json.loads(line)))
                except (json.JSONDecodeError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: not an MQAR run record ({e})") from None
    if not runs:
        raise ValueError(f"no MQAR runs in {', '.join(paths)}")
    return runs


def _percent(r: dict) -> str:
    """A cell's accuracy; with several seeds their mean and (min-max)."""
    if len(r["runs"]) == 1:
        return f"{100 * r['accuracy']:.1f}%"
    return f"{100 * r['accuracy']:.1f}% ({100 * r['accuracy_min']:.1f}-{100 * r['accuracy_max']:.1f})"


def markdown_table(results: list[dict]) -> str:
    """One table per budget (task, steps, batch size, precision, MLP, short conv): rows mixers, columns d_model,
    cells the accuracy at the best learning rate (best_per_cell's records)."""
    dims = sorted({r["d_model"] for r in results})
    cell = {_cell(r): r for r in results}
    parts = []
    for budget in dict.fromkeys(map(_budget, results)):
        rows = [r for r in results if _budget(r) == budget]
        seeds = max(len(r["runs"]) for r in rows)
        lines = [f"{_label(budget)}" + (f", up to {seeds} seeds (mean, min-max):" if seeds > 1 else ":"), "",
                 "| mixer | " + " | ".join(f"d={d}" for d in dims) + " |", "|---|" + "---|" * len(dims)]
        for m in dict.fromkeys(map(_row, rows)):
            cells = [_percent(cell[(*budget, m, d)]) if (*budget, m, d) in cell else "–" for d in dims]
            lines.append(f"| {mixer_label(*m)} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot(results, path: str, title: str) -> None:
    """Accuracy vs d_model per mixer (best_per_cell's records; bars span the seeds), one panel per budget, saved as
    PNG (needs matplotlib: pip install "gla[train]")."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError('plotting needs matplotlib: pip install "gla[train]"') from e
    budgets = list(dict.fromkeys(map(_budget, results)))
    cols = min(3, len(budgets))  # a grid in parts has many budgets: rows of three stay readable
    rows = -(-len(budgets) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False,
                             layout="constrained")  # unlike tight_layout, leaves room for the suptitle
    for ax in axes.flat[len(budgets):]:
        ax.set_visible(False)
    color = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(map(_row, results)))}  # one per row throughout
    for ax, budget in zip(axes.flat, budgets):
        sub = [r for r in results if _budget(r) == budget]
        for m in color:
            pts = sorted((r["d_model"], 100 * r["accuracy"], 100 * r["accuracy_min"], 100 * r["accuracy_max"])
                         for r in sub if _row(r) == m)
            if pts:
                d, mean, lo, hi = zip(*pts)
                # max(0, .): the mean of equal accuracies can round a hair past them, and negative bars are an error
                bars = [[max(0.0, a - b) for a, b in zip(mean, lo)], [max(0.0, b - a) for a, b in zip(mean, hi)]]
                ax.errorbar(d, mean, yerr=bars if any(map(any, bars)) else None, marker="o", capsize=3,
                            label=mixer_label(*m), color=color[m])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("d_model")
        ax.set_ylabel("MQAR accuracy (%)")
        ax.set_title(_label(budget), fontsize=9)
        ax.set_ylim(0, 102)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _csv(s: str, cast=str) -> list:
    """A comma-separated flag value as a list ("64,128," -> [64, 128] with cast=int)."""
    return [cast(x) for x in s.split(",") if x]


def add_arguments(p) -> None:
    """Flags of `gla eval mqar` (shared by the CLI and ``python -m gla.eval.mqar_report``)."""
    p.add_argument("--mixers", default="softmax,gla,retnet,linear",
                   help="comma-separated token mixers: gla, softmax, retnet, linear, seed")
    p.add_argument("--d-model", default="64", help="comma-separated model widths")
    p.add_argument("--seq-len", default="64", help="comma-separated; paired in order with --kv-pairs")
    p.add_argument("--kv-pairs", default="4", help="comma-separated, one per --seq-len")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seeds", default="0",
                   help="comma-separated seeds: each (mixer, width, rate) trains from each seed's initial weights "
                        "and data order; tables show the mean at the best rate and the range")
    p.add_argument("--lrs", default="3e-3",
                   help="learning rates swept; the best (by mean over seeds) is reported. Without MLP, vocab 8192, "
                        "the recurrent mixers trained best at 1e-3 to 1e-2 and softmax at d=64 only at 1e-2 "
                        "(docs/results/mqar-gpu)")
    p.add_argument("--vocab-size", type=int, default=256,
                   help="the default learns in minutes on a laptop CPU; Zoology's setting is 8192 (with "
                        "--d-model 64,128 --lrs 1e-3,3e-3,1e-2 on a GPU: docs/results.md)")
    p.add_argument("--short-conv", action="store_true", help="a short causal convolution before each linear mixer")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: the model under bf16 autocast (as `gla train` on a GPU); the optimizer stays fp32")
    p.add_argument("--mlp", choices=("swiglu", "none"), default="none",
                   help="none (Zoology's MQAR models): blocks are the token mixer alone; swiglu adds a SwiGLU MLP, "
                        "with which wide recurrent models stayed at chance far longer (docs/results/mqar-gpu)")
    p.add_argument("--gate-bias-init", default="0",
                   help="comma-separated initial biases of the forget gate (0 is FLA's; larger starts with less "
                        "decay): gla and seed train once per bias, each in rows of its own (in one lockstep group "
                        "where --group is large enough)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--group", type=int, default=1,
                   help="models of a task and seed trained in lockstep on one data stream (on CUDA: concurrent CUDA "
                        "graphs); a group never mixes seeds")
    p.add_argument("--jobs", type=int, default=1, help="groups trained at once, in separate processes")
    p.add_argument("--log-every", type=int, default=0, help="print each group's progress to stderr every N steps")
    p.add_argument("--eval-every", type=int, default=500,
                   help="print each model's held-out accuracy to stderr every N steps (needed by --stop-at; 0: never)")
    p.add_argument("--stop-at", default="auto",
                   help="stop training a model once its test accuracy reaches this; its record keeps the step "
                        "(stopped_at); the rest of its group trains on. auto: 0.99 (Zoology's) when --eval-every > 0; "
                        "off: every model trains all --steps")
    p.add_argument("--out", default=None,
                   help="directory for mqar.md, mqar.png, mqar.jsonl (best per cell) and mqar-runs.jsonl (every run); "
                        f"a grid trained without --out writes to {DEFAULT_OUT}, unless an earlier grid's results are "
                        "there")
    p.add_argument("--save-every", type=int, default=0,
                   help="save each group's progress in OUT/state every N steps (OUT/state also keeps each finished "
                        "group's results), so --resume can continue a grid cut short")
    p.add_argument("--resume", action="store_true",
                   help="continue the same command's grid from OUT/state: finished groups are not trained again, "
                        "unfinished ones go on from their last save (with nothing saved yet, the grid starts)")
    p.add_argument("--json", action="store_true",
                   help="print only one JSON record per (task, mixer, d_model): its best rate, mean accuracy and runs")
    p.add_argument("--from-runs", nargs="+", metavar="JSONL",
                   help="train nothing: tabulate and plot mqar-runs.jsonl files (a grid split over several calls)")


def _stop_at(value: str, eval_every: int) -> float | None:
    """--stop-at: a number, "off", or "auto" (0.99 when evaluations run)."""
    if value == "auto":
        return 0.99 if eval_every else None
    if value == "off":
        return None
    try:
        return float(value)
    except ValueError:
        raise SystemExit(f"gla eval mqar: --stop-at takes a number, auto or off, got {value!r}") from None


def _progress_bar(total: int, desc: str):
    """(bar, advance): a tqdm bar on stderr over the grid's group-steps and sweep's progress callback for it, or
    (None, None) without tqdm (an extra: `pip install gla[train]`). advance(done, skipped): the steps a group skips
    (its models all reached --stop-at, or a resumed grid's earlier steps) leave the total rather than count as done,
    so the rate and ETA are those of the steps that train."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None, None
    bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)

    def advance(done: int, skipped: int = 0) -> None:
        if skipped:
            bar.total -= skipped
            bar.refresh()
        if done:
            bar.update(done)
    return bar, advance


def _train_grid(args) -> tuple:
    """Train the grid the flags describe; returns (best per cell, title)."""
    from gla.layers.block import MIXERS

    mixers = _csv(args.mixers)
    unknown = [m for m in mixers if m not in MIXERS]
    if unknown:
        raise SystemExit(f"gla eval mqar: unknown mixers {unknown}; choose from {list(MIXERS)}")
    seq_lens, kv_pairs = _csv(args.seq_len, int), _csv(args.kv_pairs, int)
    if len(seq_lens) != len(kv_pairs):
        raise SystemExit(f"gla eval mqar: --seq-len {args.seq_len} and --kv-pairs {args.kv_pairs} must pair up")
    for t, kv in zip(seq_lens, kv_pairs):
        make_mqar(1, t, kv, args.vocab_size)  # bad task settings fail here, before any training
    if min(args.group, args.jobs, args.steps) < 1:
        raise SystemExit(f"gla eval mqar: --group, --jobs and --steps must be >= 1, "
                         f"got {args.group}, {args.jobs} and {args.steps}")
    stop_at = _stop_at(args.stop_at, args.eval_every)
    check_stopping(args.eval_every, stop_at)  # before any training, like the task settings
    lrs = _csv(args.lrs, float)
    seeds = _csv(args.seeds, int)
    check_seeds(seeds)  # before any training, like the stopping settings
    biases = parse_gate_biases(args.gate_bias_init, "gla eval mqar")
    if (args.resume or args.save_every) and not args.out:
        raise SystemExit("gla eval mqar: --resume and --save-every keep their state in --out; give one")
    if args.out is None:
        if os.path.isfile(os.path.join(DEFAULT_OUT, "mqar-runs.jsonl")):
            raise SystemExit(f"gla eval mqar: {DEFAULT_OUT} holds an earlier grid's results: give --out (--out "
                             f"{DEFAULT_OUT} replaces them)")
        args.out = DEFAULT_OUT
    if args.save_every < 0 or (args.resume and not args.save_every):
        raise SystemExit(f"gla eval mqar: --save-every must be >= 0, and > 0 with --resume (the saves go on), "
                         f"got {args.save_every}")
    state_dir = os.path.join(args.out, "state") if args.save_every else None
    saved = bool(state_dir) and os.path.isdir(state_dir) and any(f.endswith(".pt") for f in os.listdir(state_dir))
    if args.resume and not saved:  # a call cut before its first save: the same command starts the grid
        print(f"gla eval mqar: --resume: nothing saved in {state_dir} yet; starting the grid", file=sys.stderr)
    if saved and not args.resume:
        raise SystemExit(f"gla eval mqar: {state_dir} holds saved groups: pass --resume to continue them, or remove "
                         "it or choose another --out to start over")
    runs_log = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)

    def on_run(r):
        nonlocal runs_log
        if args.out:
            if runs_log is None:  # opened at the first result: a grid refused before training keeps the old log
                runs_log = open(os.path.join(args.out, "mqar-runs.jsonl"), "w")
            runs_log.write(_record(r) + "\n")
            runs_log.flush()
        if not args.json:
            say(f"  {_record(r)}", sys.stdout)

    d_models = _csv(args.d_model, int)
    n_models = len(mixer_variants(mixers, biases)) * len(d_models) * len(lrs)
    n_groups = -(-n_models // args.group) * len(seq_lens) * len(seeds)
    bar, advance = _progress_bar(n_groups * args.steps, f"{n_models * len(seq_lens) * len(seeds)} models")
    try:
        runs = sweep(mixers, d_models, list(zip(seq_lens, kv_pairs)), lrs, args.steps, args.batch_size,
                     args.vocab_size, args.device, args.short_conv, args.jobs, args.group, on_run,
                     args.log_every, args.precision, args.eval_every, stop_at, args.mlp, seeds, biases,
                     state_dir, args.save_every, progress=advance)
    except ValueError as e:
        if not args.resume or "holds another MQAR group" not in str(e):
            raise
        raise SystemExit(f"gla eval mqar: --resume: {e}; it needs the grid flags of the run that saved {state_dir} "
                         "(--group, --mixers, --lrs, --steps, ...)") from None
    finally:
        if bar:
            bar.close()
        if runs_log:
            runs_log.close()
    # the training settings head each table (_label); the title holds what the tables do not
    return best_per_cell(runs), f"MQAR, vocab {args.vocab_size}"


def run(args) -> list:
    if args.from_runs:
        runs = load_runs(args.from_runs)
        results, title = best_per_cell(runs), f"MQAR, best learning rate of {len(runs)} runs"
    else:
        results, title = _train_grid(args)
    table = markdown_table(results)
    if args.json:
        for r in results:
            print(json.dumps(r))
    else:
        print(f"\n{title}\n\n{table}")
    if args.out:
        from gla.bench import write_report
        write_report(args.out, "mqar", f"{title}\n\n{table}")
        with open(os.path.join(args.out, "mqar.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
        plot(results, os.path.join(args.out, "mqar.png"), title)
    return results


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="gla eval mqar", description="MQAR recall across token mixers")
    add_arguments(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
