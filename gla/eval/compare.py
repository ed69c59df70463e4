"""Perplexity across token mixers: the same `gla train` and `gla eval ppl` for each mixer, on the same data and
budget, in one command, with a table.

    gla eval compare --mixers gla,softmax,retnet,linear --data shakespeare --preset demo --d-model 128 \\
        --n-layers 4 --seq-len 64 --batch-size 12 --steps 1000 --out runs/compare

Each mixer trains in OUT/MIXER with identical settings and seed; its validation loss is reported over windows of
--seq-len tokens (the training context) and, for the recurrent mixers, with the whole text streamed through the
state (unbounded context; softmax has no constant-size state, so that column is left empty for it).
--gate-bias-init 0,3 trains gla (and seed) once per initial forget-gate bias, each in a row of its own, so the cost
of starting with less decay shows beside FLA's start (0).
"""
from __future__ import annotations

import argparse
import json
import os

from gla.bench import write_report
from gla.device import resolve_device
from gla.eval.variants import mixer_label, mixer_variants, parse_gate_biases, variant_slug
from gla.training import TrainConfig, checkpoint, train

RECURRENT = ("gla", "linear", "retnet", "seed")


def compare(mixers, out: str, device: str = "auto", gate_bias_inits=(0.0,), **train_flags) -> list[dict]:
    """Train and evaluate one model per (mixer, gate bias) of ``mixer_variants``; returns one row for each. A model
    trains in OUT/MIXER, or OUT/MIXER-biasB where its gate starts elsewhere than 0 (``variant_slug``)."""
    from gla.eval.ppl import evaluate

    variants = mixer_variants(mixers, gate_bias_inits)
    for mixer, bias in variants:  # all checked before the first model trains
        taken = os.path.join(out, variant_slug(mixer, bias))
        if checkpoint.find(taken) is not None:
            raise FileExistsError(f"--out {out!r}: {taken} holds a model of an earlier comparison; choose another "
                                  "--out, or remove it")
    rows = []
    for mixer, bias in variants:
        cfg = TrainConfig(out=os.path.join(out, variant_slug(mixer, bias)), mixer=mixer, device=device,
                          sample_tokens=0, gate_bias_init=bias, **train_flags)
        s = train(cfg, progress=False)
        dev = str(resolve_device(device))  # where the model trained
        window = evaluate(cfg.out, cfg.data, cfg.seq_len, "val", cfg.val_fraction, dev)
        row = {"mixer": mixer, "gate_bias_init": bias, "params": s["params"], "train_time_s": s["train_time_s"],
               "val_loss": window["loss"], "val_bpb": window["bpb"], "seq_len": cfg.seq_len}
        if mixer in RECURRENT:
            row["val_loss_unbounded"] = evaluate(cfg.out, cfg.data, None, "val", cfg.val_fraction, dev)["loss"]
        rows.append(row)
    return rows


def markdown_table(rows) -> str:
    lines = ["| mixer | params | train s | val loss (windows) | val bits/byte | val loss (unbounded) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        unb = f"{r['val_loss_unbounded']:.4f}" if "val_loss_unbounded" in r else "–"
        lines.append(f"| {mixer_label(r['mixer'], r.get('gate_bias_init', 0.0))} | {r['params'] / 1e6:.2f}M | "
                     f"{r['train_time_s']:.0f} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | {unb} |")
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--mixers", default="gla,softmax,retnet,linear")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines")
    p.add_argument("--gate-bias-init", default="0",
                   help="comma-separated initial biases of the forget gate: gla and seed train once per bias "
                        "(0 is FLA's; larger starts with less decay), the other mixers once")
    for name, kind in (("data", str), ("preset", str), ("d-model", int), ("n-layers", int), ("n-heads", int),
                       ("seq-len", int), ("batch-size", int), ("steps", int), ("lr", float), ("warmup", int),
                       ("beta2", float), ("eval-every", int), ("seed", int)):
        p.add_argument(f"--{name}", type=kind, default=argparse.SUPPRESS, help="as for gla train")


def run(args) -> list[dict]:
    flags = {k: v for k, v in vars(args).items() if k not in ("mixers", "out", "device", "json", "cmd", "task",
                                                              "func", "gate_bias_init")}
    biases = parse_gate_biases(args.gate_bias_init, "gla eval compare")
    rows = compare([m for m in args.mixers.split(",") if m], args.out, args.device, biases, **flags)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(markdown_table(rows))
    write_report(args.out, "compare", markdown_table(rows))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="gla eval compare", description=__doc__.splitlines()[0])
    add_arguments(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
