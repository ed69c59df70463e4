"""MQAR groups saved midway continue exactly (CPU), finished groups are not trained again, and a state that is not
the group's own is a clear error."""
import json
import math
import os

import pytest
import torch

import gla.eval.mqar as mqar
from gla.eval.mqar import SEED_STRIDE, train_group
from gla.eval.mqar_report import main

SPECS = [dict(mixer="gla", d_model=16, lr=3e-3), dict(mixer="linear", d_model=32, lr=3e-3, gate_bias_init=0.0)]
KW = dict(seq_len=16, kv_pairs=2, steps=6, batch_size=4, n_test=8, vocab_size=32, seed=1, eval_every=2)


def _cut_at(monkeypatch, step: int):
    """make_mqar fails when the group asks for the batch of `step`, as if the machine were lost there."""
    real = mqar.make_mqar

    def draw(*a, seed=0, **k):
        if seed == KW["seed"] * SEED_STRIDE + step:
            raise RuntimeError("machine lost")
        return real(*a, seed=seed, **k)
    monkeypatch.setattr(mqar, "make_mqar", draw)


def _whole_cut_resumed(tmp_path, monkeypatch, kw: dict, cut: int, every: int):
    """The group trained straight through, then cut at step `cut` with saves every `every` steps and resumed.
    Returns (whole, the state saved before the cut, resumed, the batch seeds the resumed run drew)."""
    whole = train_group(SPECS, **kw)
    path = str(tmp_path / "group.pt")
    with monkeypatch.context() as m:
        _cut_at(m, cut)
        with pytest.raises(RuntimeError, match="machine lost"):
            train_group(SPECS, state_path=path, save_every=every, **kw)
    saved = torch.load(path, weights_only=True)
    asked, real = [], mqar.make_mqar
    with monkeypatch.context() as m:
        m.setattr(mqar, "make_mqar", lambda *a, seed=0, **k: asked.append(seed) or real(*a, seed=seed, **k))
        resumed = train_group(SPECS, state_path=path, save_every=every, **kw)
    return whole, saved, resumed, asked


@pytest.mark.parametrize("stop", [False, True])
def test_a_group_cut_short_continues_as_if_never_stopped(tmp_path, monkeypatch, stop):
    if stop:  # the gla model reaches the target at its first evaluation (step 2) and stops there
        monkeypatch.setattr(mqar, "_accuracy", lambda model, *a: 1.0 if model.config.d_model == 16 else 0.0)
    kw = dict(KW, stop_at=0.99 if stop else None)
    whole, saved, resumed, asked = _whole_cut_resumed(tmp_path, monkeypatch, kw, cut=5, every=2)
    assert saved["step"] == 4  # the last save before the cut at step 5
    assert asked[1:] == [KW["seed"] * SEED_STRIDE + s for s in (4, 5)]  # (after the test set) only steps 4 and 5
    assert all(r.seconds >= saved["seconds"] for r in resumed)
    key = [(r.final_loss, r.accuracy, r.stopped_at) for r in whole]
    assert [(r.final_loss, r.accuracy, r.stopped_at) for r in resumed] == key
    assert [r.stopped_at for r in resumed] == ([2, None] if stop else [None, None])
    monkeypatch.setattr(mqar, "_member", lambda *a: pytest.fail("a finished group trained again"))
    again = train_group(SPECS, state_path=str(tmp_path / "group.pt"), save_every=2, **kw)
    assert [(r.final_loss, r.accuracy, r.stopped_at) for r in again] == key


def test_a_state_that_is_not_the_groups_own_is_an_error(tmp_path):
    path = tmp_path / "group.pt"
    train_group(SPECS, state_path=str(path), **KW)
    with pytest.raises(ValueError, match=r"holds another MQAR group \(differs in \['steps'\]\)"):
        train_group(SPECS, state_path=str(path), **dict(KW, steps=8))
    with pytest.raises(ValueError, match="differs in \\['models'\\]"):
        train_group(SPECS[:1], state_path=str(path), **KW)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable MQAR group state"):
        train_group(SPECS, state_path=str(path), **KW)
    with pytest.raises(ValueError, match="save_every needs a state_path"):
        train_group(SPECS, save_every=2, **KW)


FLAGS = ["--mixers", "gla,linear", "--d-model", "16", "--seq-len", "16", "--kv-pairs", "2", "--steps", "4",
         "--batch-size", "4", "--lrs", "1e-3", "--vocab-size", "32", "--group", "2", "--save-every", "2", "--json"]


def test_resume_a_grid_cut_short_from_its_out_directory(tmp_path, monkeypatch, capsys):
    main(FLAGS + ["--out", str(tmp_path / "whole")])
    whole = (tmp_path / "whole" / "mqar-runs.jsonl").read_text()
    out = str(tmp_path / "cut")
    with monkeypatch.context() as m:
        _cut_at(m, 3)
        with pytest.raises(RuntimeError, match="machine lost"):
            main(FLAGS + ["--out", out, "--seeds", str(KW["seed"])])
    with pytest.raises(SystemExit, match="holds saved groups: pass --resume"):
        main(FLAGS + ["--out", out, "--seeds", str(KW["seed"])])
    with pytest.raises(SystemExit, match="needs the grid flags of the run that saved"):
        main(FLAGS[:-5] + ["--group", "1", "--save-every", "2", "--json", "--out", out, "--seeds", str(KW["seed"]),
                           "--resume"])
    main(FLAGS + ["--out", out, "--seeds", str(KW["seed"]), "--resume"])
    main(FLAGS + ["--out", str(tmp_path / "whole1"), "--seeds", str(KW["seed"])])
    fields = ("mixer", "final_loss", "accuracy", "seed")
    records = [[{k: json.loads(line)[k] for k in fields} for line in (tmp_path / d / "mqar-runs.jsonl").read_text()
                .splitlines()] for d in ("whole1", "cut")]
    assert records[0] == records[1] and len(records[0]) == 2
    monkeypatch.setattr(mqar, "_member", lambda *a: pytest.fail("a finished group trained again"))
    main(FLAGS + ["--out", str(tmp_path / "whole"), "--resume"])
    assert (tmp_path / "whole" / "mqar-runs.jsonl").read_text() == whole
    capsys.readouterr()


@pytest.mark.parametrize("flags, message", [(["--resume"], "keep their state in --out"),
                                            (["--save-every", "2"], "keep their state in --out"),
                                            (["--save-every", "-1", "--out", "X"], "--save-every must be >= 0"),
                                            (["--resume", "--out", "X"], "> 0 with --resume")])
def test_bad_resume_flags(flags, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=message):
        main(["--mixers", "gla", "--d-model", "16", "--steps", "1", "--vocab-size", "64", *flags])


def test_the_identity_is_every_argument_but_how_the_group_runs():
    """A new train_group argument is part of what a saved state must match unless it is excluded on purpose."""
    import inspect

    identity = mqar._identity(dict(specs=SPECS, **KW))
    args = set(inspect.signature(train_group).parameters) - set(mqar.NOT_IDENTITY)
    assert set(identity) == args | {"version", "models"} and identity["device"] == "cpu"


@pytest.mark.skipif(os.environ.get("GLA_TEST_GPU") != "1" or not torch.cuda.is_available(),
                    reason="GLA_TEST_GPU=1 with a CUDA device")
def test_a_captured_group_cut_short_continues_like_the_uninterrupted_one(tmp_path, monkeypatch):
    """On CUDA the resumed group runs eager steps again before it captures (learning rate tensors moved back to the
    device, optimizer step counts restored); it must follow the uninterrupted replays."""
    kw = dict(KW, steps=12, device="cuda", precision="bf16", short_conv=True)
    whole, saved, resumed, _ = _whole_cut_resumed(tmp_path, monkeypatch, kw, cut=9, every=4)
    assert saved["step"] == 8
    for w, r in zip(whole, resumed):
        assert math.isfinite(w.final_loss) and r.final_loss == pytest.approx(w.final_loss, rel=1e-4)
