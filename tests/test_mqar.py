"""MQAR data: the structure the task relies on; lockstep (and, on CUDA, graph-captured) training; the sweep at
toy size. ``GLA_TEST_GPU=1`` adds the check that graph-captured training on CUDA matches eager training."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from gla.data import IGNORE_INDEX as IGNORE
from gla.eval.mqar import make_mqar, train_group
from gla.eval.mqar_report import main
from gla.models import GLATransformer


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """`gla eval mqar` writes its report to runs/mqar unless told otherwise: not into the repository."""
    monkeypatch.chdir(tmp_path)


def test_mqar_sequences_are_well_formed():
    x, y = make_mqar(50, 64, 4, vocab_size=128, seed=3)
    assert x.shape == y.shape == (50, 64)
    half = 64
    for i in range(50):
        keys, values = x[i, 0:8:2], x[i, 1:8:2]
        assert torch.all((keys >= 1) & (keys < half)) and torch.all(values >= half)
        assert len(set(keys.tolist())) == 4
        scored = (y[i] != IGNORE).nonzero().squeeze(1)
        assert len(scored) == 4
        for t in scored.tolist():  # the input at t is a key; the label is its value from the context
            j = keys.tolist().index(int(x[i, t]))
            assert int(y[i, t]) == int(values[j]) and t >= 8


def test_power_law_favours_short_gaps():
    x, y = make_mqar(400, 256, 4, vocab_size=512, seed=0)
    pos = (y != IGNORE).nonzero()[:, 1].float()
    assert pos.median() < 8 + (256 - 8) / 4


def test_loss_reads_the_scored_positions_only():
    from gla.eval.mqar import _loss_and_acc

    torch.manual_seed(0)
    model = GLATransformer(64, 16, 1, 32, 2, dropout=0.0)
    x, y = make_mqar(6, 32, 3, vocab_size=64, seed=1)
    loss, acc = _loss_and_acc(model, x, y, 3)
    logits = model(x)[0]
    scored = y != IGNORE
    assert torch.allclose(loss, F.cross_entropy(logits[scored], y[scored]), atol=1e-6)
    assert acc == (logits[scored].argmax(-1) == y[scored]).float().mean()


def test_lockstep_group_trains_each_model_as_alone():
    """A group shares one data stream; each model's training is exactly what it would be on its own."""
    specs = [dict(mixer="gla", d_model=16, lr=3e-3), dict(mixer="softmax", d_model=32, lr=1e-3)]
    kw = dict(seq_len=32, kv_pairs=4, steps=6, batch_size=8, n_test=20, vocab_size=64, short_conv=True)
    together = train_group(specs, **kw)
    for spec, r in zip(specs, together):
        alone = train_group([spec], **kw)[0]
        assert (r.mixer, r.d_model, r.lr) == (alone.mixer, alone.d_model, alone.lr)
        assert (r.final_loss, r.accuracy) == (alone.final_loss, alone.accuracy)


def test_evaluation_midway_leaves_training_unchanged(capsys):
    from gla.eval.mqar import _accuracy

    model = GLATransformer(64, 16, 1, 32, 2, dropout=0.0).train()
    _accuracy(model, *make_mqar(4, 32, 2, vocab_size=64), kv_pairs=2, device="cpu", bf16=False)
    assert model.training  # evaluation hands the model back in training mode
    specs = [dict(mixer="gla", d_model=16, lr=3e-3), dict(mixer="softmax", d_model=32, lr=1e-3)]
    kw = dict(seq_len=32, kv_pairs=4, steps=6, batch_size=8, n_test=20, vocab_size=64, short_conv=True)
    plain, evaluated = train_group(specs, **kw), train_group(specs, eval_every=2, **kw)
    assert [(r.final_loss, r.accuracy) for r in plain] == [(r.final_loss, r.accuracy) for r in evaluated]
    err = capsys.readouterr().err
    assert "step 2, accuracy gla/16/0.003=" in err and "step 4, accuracy" in err and "step 6" not in err


def test_a_model_that_reaches_stop_at_trains_no_further(monkeypatch):
    """The d=16 model 'solves' the task at the first evaluation and stops; the other trains on, unaffected."""
    import gla.eval.mqar as mqar

    monkeypatch.setattr(mqar, "_accuracy", lambda model, *a: 1.0 if model.config.d_model == 16 else 0.0)
    done, going = dict(mixer="gla", d_model=16, lr=3e-3), dict(mixer="linear", d_model=32, lr=3e-3)
    kw = dict(seq_len=32, kv_pairs=4, steps=6, batch_size=8, n_test=20, vocab_size=64)
    a, b = train_group([done, going], eval_every=2, stop_at=0.99, **kw)
    assert (a.stopped_at, b.stopped_at) == (2, None)
    assert b.final_loss == train_group([going], **kw)[0].final_loss
    assert a.final_loss == train_group([done], eval_every=2, stop_at=0.99, **kw)[0].final_loss
    assert a.final_loss != train_group([done], **kw)[0].final_loss  # six steps would have moved it further


def test_progress_hears_of_every_step_of_every_group(monkeypatch):
    """progress(done, skipped) accounts for every step of every group: trained steps as done, the steps of a group
    whose models all stopped early as skipped (the bar's ETA counts on both)."""
    import gla.eval.mqar as mqar

    monkeypatch.setattr(mqar, "_accuracy", lambda model, *a: 1.0 if model.config.d_model == 16 else 0.0)
    done, skipped = [], []

    def progress(n, s=0):
        done.append(n)
        skipped.append(s)
    kw = dict(steps=6, batch_size=8, vocab_size=64, eval_every=2, stop_at=0.99, mlp="none", progress=progress)
    runs = mqar.sweep(["gla"], [16, 32], [(32, 4)], [3e-3], **kw)  # two groups: d=16 stops at step 2
    assert [r.stopped_at for r in runs] == [2, None]
    assert (sum(done), sum(skipped)) == (2 + 6, 4) and min(done + skipped) >= 0


def test_defaults_are_the_setting_that_learns_on_a_cpu():
    """`gla eval mqar` with no flags: the task and budget that show GLA's gate learning recall in minutes on a CPU
    (docs/results.md: GLA 94.6% against RetNet 19.4% and linear attention 24.0% at d=64)."""
    import argparse

    from gla.eval.mqar_report import add_arguments
    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args([])
    assert (a.mixers, a.d_model, a.seq_len, a.kv_pairs) == ("softmax,gla,retnet,linear", "64", "64", "4")
    assert (a.steps, a.lrs, a.vocab_size, a.mlp, a.eval_every, a.stop_at) == (3000, "3e-3", 256, "none", 500, "auto")


def test_stop_at_values_and_the_default_out(monkeypatch, tmp_path, capsys):
    """--stop-at auto is 0.99 only with evaluations; off trains every model to the end. Without --out a grid writes
    to runs/mqar, once: an earlier grid's results there are not overwritten."""
    import gla.eval.mqar_report as report
    assert (report._stop_at("auto", 500), report._stop_at("auto", 0), report._stop_at("off", 500)) == (0.99, None, None)
    assert report._stop_at("0.5", 10) == 0.5
    with pytest.raises(SystemExit, match="--stop-at takes a number, auto or off"):
        report._stop_at("most", 10)
    flags = ["--mixers", "gla", "--d-model", "16", "--seq-len", "32", "--kv-pairs", "2", "--steps", "2",
             "--vocab-size", "64", "--lrs", "1e-3", "--json"]
    main(flags)
    assert (tmp_path / "runs" / "mqar" / "mqar-runs.jsonl").is_file()  # cwd is tmp_path (_in_tmp)
    monkeypatch.setattr(report, "sweep", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(SystemExit, match="holds an earlier grid's results"):
        main(flags)


def test_one_host_thread_restores_the_pool():
    """The pool goes to one thread inside the block and back to the caller's setting after it, also on an error;
    off, it is left alone."""
    from gla.eval.mqar import _one_host_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with _one_host_thread(False):
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="inside"):
            with _one_host_thread(True):
                assert torch.get_num_threads() == 1
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _threads_seen_by_make_mqar(monkeypatch, device: str) -> tuple[set, int]:
    import gla.eval.mqar as mqar

    seen, real = set(), mqar.make_mqar
    monkeypatch.setattr(mqar, "make_mqar", lambda *a, **k: seen.add(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train_group([dict(mixer="gla", d_model=16, lr=1e-3)], seq_len=16, kv_pairs=2, steps=2, batch_size=2,
                    n_test=4, vocab_size=32, device=device)
        return seen, torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_cpu_training_keeps_the_callers_threads(monkeypatch):
    """On the CPU the models train on the host too, with the threads the caller set."""
    assert _threads_seen_by_make_mqar(monkeypatch, "cpu") == ({2}, 2)


@pytest.mark.skipif(os.environ.get("GLA_TEST_GPU") != "1" or not torch.cuda.is_available(),
                    reason="GLA_TEST_GPU=1 with a CUDA device")
def test_cuda_training_draws_batches_with_one_host_thread(monkeypatch):
    assert _threads_seen_by_make_mqar(monkeypatch, "cuda") == ({1}, 2)


def test_bf16_autocast_grid(tmp_path, capsys):
    main(["--mixers", "gla,softmax", "--d-model", "16", "--seq-len", "32", "--kv-pairs", "2", "--steps", "3",
          "--batch-size", "4", "--lrs", "1e-3", "--vocab-size", "64", "--precision", "bf16", "--short-conv", "--json",
          "--out", str(tmp_path)])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["precision"], r["batch_size"]) for r in records] == [("bf16", 4), ("bf16", 4)]
    runs = [json.loads(line) for line in (tmp_path / "mqar-runs.jsonl").read_text().splitlines()]
    assert len(runs) == 2 and all(math.isfinite(r["final_loss"]) for r in runs)
    assert "T=32, 2 KV pairs, 3 steps of batch 4, bf16, mlp none, short conv:" in (tmp_path / "mqar.md").read_text()


def test_bad_training_settings_are_clear_errors():
    spec = [dict(mixer="gla", d_model=16, lr=1e-3)]
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        train_group(spec, 32, 2, steps=2, vocab_size=64, graphs=True)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        train_group(spec, 32, 2, steps=0, vocab_size=64)
    with pytest.raises(ValueError, match="precision must be"):
        train_group(spec, 32, 2, steps=1, vocab_size=64, precision="fp16")
    for eval_every, stop_at in [(0, 0.99), (10, 1.5), (-1, None)]:
        with pytest.raises(ValueError, match="stop_at needs eval_every > 0"):
            train_group(spec, 32, 2, steps=1, vocab_size=64, eval_every=eval_every, stop_at=stop_at)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        train_group(spec, 32, 2, steps=1, vocab_size=64, seed=-1)


def test_sweep_prints_one_record_per_mixer_and_width(tmp_path, capsys):
    main(["--mixers", "gla,linear", "--d-model", "16", "--seq-len", "32", "--kv-pairs", "2", "--steps", "3",
          "--batch-size", "4", "--lrs", "1e-3", "--vocab-size", "64", "--json", "--out", str(tmp_path),
          "--log-every", "2", "--mlp", "swiglu"])
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert err.count("mqar T=32, 2 pairs, 1 models: step 2/3") == 2  # one group per mixer
    losses = [float(line.rsplit("losses ", 1)[1]) for line in err.splitlines() if "step 2/3" in line]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)  # ln(64) = 4.2 at chance
    assert all(r["precision"] == "fp32" and r["mlp"] == "swiglu" for r in records)
    assert [(r["mixer"], r["d_model"]) for r in records] == [("gla", 16), ("linear", 16)]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in records)
    md = (tmp_path / "mqar.md").read_text()
    assert (tmp_path / "mqar.png").stat().st_size > 0 and "| gla |" in md
    assert "T=32, 2 KV pairs, 3 steps of batch 4:" in md


def test_grid_over_tasks_in_worker_processes(tmp_path, capsys):
    main(["--mixers", "gla,softmax", "--d-model", "16", "--seq-len", "16,32", "--kv-pairs", "2,4", "--steps", "2",
          "--batch-size", "4", "--lrs", "1e-3,3e-3", "--vocab-size", "64", "--jobs", "2", "--group", "3",
          "--short-conv", "--seeds", "0,1", "--json", "--out", str(tmp_path)])
    best = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["seq_len"], r["kv_pairs"], r["mixer"]) for r in best] == [
        (16, 2, "gla"), (16, 2, "softmax"), (32, 4, "gla"), (32, 4, "softmax")]
    runs = [json.loads(line) for line in (tmp_path / "mqar-runs.jsonl").read_text().splitlines()]
    assert len(runs) == 16 and all(r["short_conv"] for r in runs)
    for b in best:  # the reported cell is the best of its learning rates, each rate the mean over the seeds
        means = []
        for lr in (1e-3, 3e-3):
            mine = [r for r in runs if (r["seq_len"], r["mixer"], r["lr"]) == (b["seq_len"], b["mixer"], lr)]
            assert sorted(r["seed"] for r in mine) == [0, 1]
            means.append(sum(r["accuracy"] for r in mine) / 2)
        assert b["accuracy"] == pytest.approx(max(means))
    md = (tmp_path / "mqar.md").read_text()
    assert "T=16, 2 KV pairs, 2 steps of batch 4, mlp none, short conv, up to 2 seeds" in md
    assert "T=32, 4 KV pairs" in md


def test_seeds_train_apart_on_one_test_set(tmp_path, capsys, monkeypatch):
    """Each seed is its own lockstep group with its own initial weights and batches; every seed is scored on the
    same test set; a cell reports the mean over seeds at its best rate, and the range."""
    import gla.eval.mqar as mqar

    drawn = []  # (rows, seed) of every make_mqar call during training
    make = mqar.make_mqar
    monkeypatch.setattr(mqar, "make_mqar",
                        lambda n, *a, seed=0, **k: drawn.append((n, seed)) or make(n, *a, seed=seed, **k))
    main(["--mixers", "gla", "--d-model", "16", "--seq-len", "32", "--kv-pairs", "2", "--steps", "3",
          "--batch-size", "4", "--lrs", "1e-3", "--vocab-size", "64", "--seeds", "0,2", "--json",
          "--out", str(tmp_path)])
    (best,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    runs = [json.loads(line) for line in (tmp_path / "mqar-runs.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in runs] == [0, 2] and runs[0]["final_loss"] != runs[1]["final_loss"]
    test_seeds = {s for n, s in drawn if n == 1000}
    train_seeds = [s for n, s in drawn if n == 4]
    assert test_seeds == {10 ** 6} and train_seeds == [0, 1, 2, 2 * 10 ** 7, 2 * 10 ** 7 + 1, 2 * 10 ** 7 + 2]
    assert [r["seed"] for r in best["runs"]] == [0, 2]
    assert [r["final_loss"] for r in best["runs"]] == [r["final_loss"] for r in runs]
    assert best["accuracy"] == pytest.approx(sum(r["accuracy"] for r in runs) / 2)
    assert (best["accuracy_min"], best["accuracy_max"]) == (min(r["accuracy"] for r in runs),
                                                            max(r["accuracy"] for r in runs))
    alone = train_group([dict(mixer="gla", d_model=16, lr=1e-3)], 32, 2, steps=3, batch_size=4, vocab_size=64,
                        seed=2, mlp="none")
    assert (alone[0].final_loss, alone[0].seed) == (runs[1]["final_loss"], 2)
    assert "T=32, 2 KV pairs, 3 steps of batch 4, mlp none, up to 2 seeds (mean, min-max):" in (
        tmp_path / "mqar.md").read_text()


@pytest.mark.parametrize("flags, message", [(["--seq-len", "16,32", "--kv-pairs", "2"], "must pair up"),
                                            (["--seq-len", "8", "--kv-pairs", "4"], "too short"),
                                            (["--stop-at", "0.99", "--eval-every", "0"], "stop_at needs eval_every"),
                                            (["--seeds", "0,0"], "distinct integers >= 0"),
                                            (["--seeds", "-1"], "distinct integers >= 0"),
                                            (["--gate-bias-init", "nan"], "distinct finite numbers"),
                                            (["--gate-bias-init", "0,0"], "distinct finite numbers")])
def test_bad_task_settings_fail_before_training(flags, message, monkeypatch):
    import gla.eval.mqar_report as report

    monkeypatch.setattr(report, "sweep", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises((SystemExit, ValueError), match=message):
        main(["--mixers", "gla", "--d-model", "16", "--steps", "1", "--vocab-size", "64", *flags])


@pytest.mark.parametrize("biases", [(), (0.0, 0.0), (float("nan"),)])
def test_bad_gate_bias_lists_fail_before_training(biases, monkeypatch):
    import gla.eval.mqar as mqar

    monkeypatch.setattr(mqar, "train_group", lambda **k: pytest.fail("training started"))
    with pytest.raises(ValueError, match="distinct finite numbers"):
        mqar.sweep(["gla"], [16], [(16, 2)], [1e-3], steps=1, gate_bias_inits=biases)


def test_gate_bias_init_trains_gated_mixers_and_gets_its_own_row(tmp_path, capsys):
    """--gate-bias-init starts GLA's forget gate elsewhere and is recorded for the mixers with that gate only, so
    a linear-attention run with it is the same cell as one without (merging both is an error), while GLA's gets
    its own row beside the default GLA in one table. A list of biases trains the gated mixers once per bias."""
    flags = ["--d-model", "16", "--seq-len", "32", "--kv-pairs", "2", "--steps", "2", "--batch-size", "4",
             "--lrs", "1e-3", "--vocab-size", "64", "--json"]
    main(["--mixers", "gla,linear,seed", *flags, "--gate-bias-init", "3", "--out", str(tmp_path / "b3")])
    main(["--mixers", "gla,linear", *flags, "--out", str(tmp_path / "b0")])
    capsys.readouterr()
    b3, b0 = ([json.loads(line) for line in (tmp_path / d / "mqar-runs.jsonl").read_text().splitlines()]
              for d in ("b3", "b0"))
    assert [(r["mixer"], r["gate_bias_init"]) for r in b3] == [("gla", 3.0), ("linear", 0.0), ("seed", 3.0)]
    assert b3[0]["final_loss"] != b0[0]["final_loss"] and b3[1]["final_loss"] == b0[1]["final_loss"]
    main(["--mixers", "gla,linear", *flags, "--gate-bias-init", "0,3", "--group", "3", "--out", str(tmp_path / "both")])
    capsys.readouterr()
    both = [json.loads(line) for line in (tmp_path / "both" / "mqar-runs.jsonl").read_text().splitlines()]
    assert [(r["mixer"], r["gate_bias_init"]) for r in both] == [("gla", 0.0), ("gla", 3.0), ("linear", 0.0)]
    # one group holding both starts trains each model as its own command did
    assert [r["final_loss"] for r in both] == [b0[0]["final_loss"], b3[0]["final_loss"], b0[1]["final_loss"]]
    with pytest.raises(ValueError, match="two runs of linear, d_model 16"):
        main(["--from-runs", str(tmp_path / "b3" / "mqar-runs.jsonl"), str(tmp_path / "b0" / "mqar-runs.jsonl")])
    (tmp_path / "gla0.jsonl").write_text(json.dumps(b0[0]) + "\n")
    main(["--from-runs", str(tmp_path / "b3" / "mqar-runs.jsonl"), str(tmp_path / "gla0.jsonl"),
          "--out", str(tmp_path / "merged")])
    md = (tmp_path / "merged" / "mqar.md").read_text()
    rows = [line.split(" | ")[0] for line in md.splitlines() if line.startswith("| ") and "%" in line]
    assert rows == ["| gla, gate bias 3.0", "| linear", "| seed, gate bias 3.0", "| gla"]
    near = {**b3[0], "gate_bias_init": 3.0000001}  # its own row, not a second run of bias 3.0
    (tmp_path / "near.jsonl").write_text(json.dumps(near) + "\n")
    capsys.readouterr()
    main(["--from-runs", str(tmp_path / "b3" / "mqar-runs.jsonl"), str(tmp_path / "near.jsonl"), "--json"])
    assert [r["gate_bias_init"] for r in map(json.loads, capsys.readouterr().out.splitlines())] == [
        3.0, 0.0, 3.0, 3.0000001]


def test_tables_from_saved_runs(tmp_path, capsys):
    """A grid split over several calls is tabulated from its run logs: best learning rate per cell, one table per
    budget (a record from before batch sizes were logged has none). With several seeds the best rate is the one
    with the best mean, not the one with the single best run."""
    rec = dict(mixer="gla", d_model=64, seq_len=64, kv_pairs=4, lr=1e-3, accuracy=0.9, steps=100, seconds=1.0,
               batch_size=32)
    runs = [rec, {**rec, "lr": 3e-3, "accuracy": 0.2}, {**rec, "mixer": "linear", "accuracy": 0.5},
            {**rec, "steps": 50, "accuracy": 0.1}, {k: v for k, v in rec.items() if k != "batch_size"}]
    seeded = {**rec, "mixer": "retnet"}
    runs += [{**seeded, "seed": 0, "accuracy": 1.0}, {**seeded, "seed": 1, "accuracy": 0.0},
             {**seeded, "lr": 3e-3, "seed": 0, "accuracy": 0.6}, {**seeded, "lr": 3e-3, "seed": 1, "accuracy": 0.8}]
    runs += [{**rec, "mixer": "softmax", "seed": s, "accuracy": 0.7} for s in range(3)]  # a mean that rounds below
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in runs[:2]))
    b.write_text("".join(json.dumps(r) + "\n" for r in runs[2:]))
    main(["--from-runs", str(a), str(b), "--json", "--out", str(tmp_path / "out")])
    best = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["mixer"], r["steps"], r["batch_size"], r["accuracy"]) for r in best] == [
        ("gla", 100, 32, 0.9), ("linear", 100, 32, 0.5), ("gla", 50, 32, 0.1), ("gla", 100, None, 0.9),
        ("retnet", 100, 32, pytest.approx(0.7)), ("softmax", 100, 32, pytest.approx(0.7))]
    assert (best[4]["lr"], [r["seed"] for r in best[4]["runs"]], best[0]["runs"]) == (3e-3, [0, 1], [
        dict(seed=0, accuracy=0.9, final_loss=None, stopped_at=None, seconds=1.0)])
    md = (tmp_path / "out" / "mqar.md").read_text()
    for label in ("T=64, 4 KV pairs, 100 steps of batch 32, up to 3 seeds (mean, min-max):",
                  "T=64, 4 KV pairs, 50 steps of batch 32:", "T=64, 4 KV pairs, 100 steps:"):
        assert label in md
    assert "| gla | 90.0% |" in md and "| retnet | 70.0% (60.0-80.0) |" in md
    assert (tmp_path / "out" / "mqar.png").stat().st_size > 0
    with pytest.raises(ValueError, match="two runs of gla, d_model 64, lr 0.001, seed 0 at T=64, 4 KV pairs"):
        main(["--from-runs", str(a), str(a)])
    b.write_text('{"mixer": "gla"}\n')
    with pytest.raises(ValueError, match="b.jsonl:1: not an MQAR run record"):
        main(["--from-runs", str(a), str(b)])


@pytest.mark.skipif(os.environ.get("GLA_TEST_GPU") != "1" or not torch.cuda.is_available(),
                    reason="GLA_TEST_GPU=1 with a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mixer", ["gla", "softmax", "retnet", "linear"])
def test_captured_steps_train_like_eager_steps(mixer, precision):
    """The CUDA-graph replays (learning rate read from a tensor each step, static batch buffers refilled, one stream
    per model) must follow the eager trajectory: a learning rate frozen at capture or a stale batch would not."""
    specs = [dict(mixer=mixer, d_model=64, lr=1e-2), dict(mixer=mixer, d_model=128, lr=3e-3)]
    kw = dict(seq_len=64, kv_pairs=4, steps=12, batch_size=64, n_test=256, device="cuda", short_conv=True,
              precision=precision)
    eager, graphed = train_group(specs, graphs=False, **kw), train_group(specs, graphs=True, **kw)
    for e, g in zip(eager, graphed):  # graphs sharing one capture stream raced here: 3e-4 to 7e-4 apart
        assert math.isfinite(e.final_loss) and g.final_loss == pytest.approx(e.final_loss, rel=1e-4)


@pytest.mark.skipif(os.environ.get("GLA_TEST_GPU") != "1" or not torch.cuda.is_available(),
                    reason="GLA_TEST_GPU=1 with a CUDA device")
@pytest.mark.parametrize("stop_step", [2, 6])  # before and after the capture (at step EAGER_STEPS = 3)
def test_captured_group_stops_a_model_like_eager(monkeypatch, stop_step):
    """A stopped model (never captured, or captured and no longer replayed) and the one still training follow
    eager training."""
    import gla.eval.mqar as mqar

    monkeypatch.setattr(mqar, "_accuracy", lambda model, *a: 1.0 if model.config.d_model == 64 else 0.0)
    specs = [dict(mixer="gla", d_model=64, lr=3e-3), dict(mixer="gla", d_model=128, lr=3e-3)]
    kw = dict(seq_len=64, kv_pairs=4, steps=12, batch_size=64, n_test=256, device="cuda", short_conv=True,
              precision="bf16", eval_every=stop_step, stop_at=0.99)
    eager, graphed = train_group(specs, graphs=False, **kw), train_group(specs, graphs=True, **kw)
    assert [r.stopped_at for r in graphed] == [r.stopped_at for r in eager] == [stop_step, None]
    for e, g in zip(eager, graphed):
        assert math.isfinite(e.final_loss) and g.final_loss == pytest.approx(e.final_loss, rel=1e-4)


@pytest.mark.skipif(os.environ.get("GLA_TEST_GPU") != "1" or not torch.cuda.is_available(),
                    reason="GLA_TEST_GPU=1 with a CUDA device")
def test_captured_group_evaluated_midway_trains_like_eager():
    """Evaluation runs on the main stream between the replays on the models' streams; it must read finished updates
    and must not race the next replay."""
    specs = [dict(mixer="gla", d_model=64, lr=3e-3), dict(mixer="softmax", d_model=128, lr=3e-3)]
    kw = dict(seq_len=64, kv_pairs=4, steps=12, batch_size=64, n_test=256, device="cuda", short_conv=True,
              precision="bf16")
    plain, evaluated = train_group(specs, graphs=False, **kw), train_group(specs, graphs=True, eval_every=2, **kw)
    for e, g in zip(plain, evaluated):
        assert math.isfinite(e.final_loss) and g.final_loss == pytest.approx(e.final_loss, rel=1e-4)
