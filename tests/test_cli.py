"""The `gla` command end to end, as a user runs it: train -> resume -> generate -> eval ppl, and its errors."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gla(*args, check=True):
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "gla.cli", *args], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"gla {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    data = d / "text.txt"
    data.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 60)
    out = d / "run"
    r = gla("train", "--data", str(data), "--preset", "tiny", "--seq-len", "32", "--batch-size", "4",
            "--steps", "4", "--eval-every", "2", "--eval-batches", "1", "--sample-tokens", "16",
            "--out", str(out), "--json")
    summary = json.loads(r.stdout)
    assert summary["step"] == 4 and os.path.isfile(summary["plot"])
    return str(data), str(out)


def test_train_resume_with_more_steps(run):
    data, out = run
    r = gla("train", "--out", out, "--resume", "--steps", "6", "--json")
    assert json.loads(r.stdout)["step"] == 6
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
    assert steps[-1] == 6


def test_generate_streams(run):
    _, out = run
    r = gla("generate", "--ckpt", out, "--prompt", "All:", "--max-new-tokens", "12", "--temperature", "0")
    assert r.stdout.startswith("All:") and len(r.stdout.encode()) >= 4 + 1
    j = json.loads(gla("generate", "--ckpt", out, "--prompt", "All:", "--max-new-tokens", "5", "--json").stdout)
    assert j["new_tokens"] == 5


def test_generate_stops_at_a_stop_string(run, capsys):
    """The completion ends where a stop string starts (left out), in the streamed text and in --json."""
    from gla.cli import main
    _, out = run
    args = ["generate", "--ckpt", out, "--prompt", "All:", "--max-new-tokens", "40", "--temperature", "0"]
    assert main([*args, "--json"]) == 0
    full = json.loads(capsys.readouterr().out)["completion"]
    stop = full[6:9]
    cut = full[:full.find(stop)]
    assert main([*args, "--json", "--stop", stop, "--stop", "never seen"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["completion"] == cut and j["new_tokens"] < 40
    assert main([*args, "--stop", stop]) == 0
    assert capsys.readouterr().out == "All:" + cut + "\n"


def test_generate_compiled_step_gives_the_same_text(run, capsys):
    from gla.cli import main
    _, out = run
    args = ["generate", "--ckpt", out, "--prompt", "All:", "--max-new-tokens", "20", "--temperature", "0", "--json"]
    assert main(args) == 0
    eager = json.loads(capsys.readouterr().out)["completion"]
    assert main([*args, "--compile"]) == 0
    assert json.loads(capsys.readouterr().out)["completion"] == eager
    assert main([*args, "--compile", "--quantize", "int8"]) == 2
    assert "ONNX Runtime" in capsys.readouterr().err


def test_eval_ppl_json(run):
    data, out = run
    windows = json.loads(gla("eval", "ppl", "--ckpt", out, "--data", data, "--seq-len", "64", "--json").stdout)
    assert {"loss", "bpb", "ppl", "tokens", "bytes"} <= set(windows) and windows["seq_len"] == 64
    streamed = json.loads(gla("eval", "ppl", "--ckpt", out, "--data", data, "--split", "val", "--json").stdout)
    assert streamed["seq_len"] is None and streamed["tokens"] < windows["tokens"]
    assert 0 < streamed["loss"] < 6


def test_clear_errors(run, tmp_path, capsys, monkeypatch):
    """Bad input ends with one clear line and exit status 2, never a traceback (in-process: fast)."""
    from gla.cli import main
    data, out = run
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "train_config.json"):
        (broken / name).write_text(open(os.path.join(out, name)).read())
    (broken / "model.safetensors").write_bytes(b"\x00" * 10)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    from tests.data.test_data import _hf_tokenizer_file
    tok = _hf_tokenizer_file(tmp_path / "tokenizer.json")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(128, 256)) * 20)
    cases = [
        (["eval", "ppl", "--ckpt", str(tmp_path / "nope"), "--data", data], "no config.json"),
        (["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")], "data not found"),
        (["train", "--out", out, "--steps", "2"], "--resume"),
        (["train", "--out", str(tmp_path / "empty"), "--resume"], "no checkpoint"),
        (["train", "--seq-len", "0", "--out", str(tmp_path / "o")], "--seq-len must be >= 1"),
        (["generate", "--ckpt", str(broken)], "safetensors"),
        (["eval", "ppl", "--ckpt", out, "--data", data, "--seq-len", "-3"], "--seq-len must be >= 1"),
        (["train", "--gate-bias-init", "nan", "--out", str(tmp_path / "o")], "--gate-bias-init must be a finite"),
        (["train", "--mixer", "softmax", "--gate-bias-init", "2", "--out", str(tmp_path / "o")], "has none"),
        (["train", "--out", out, "--resume", "--gate-bias-init", "3"], "this run started from 0.0, got 3.0"),
        (["train", "--out", out, "--resume", "--tokenizer", str(tok)], "was trained with another tokenizer (bytes)"),
        (["train", "--data", str(empty), "--preset", "tiny", "--out", str(tmp_path / "o")], "holds no text"),
        (["train", "--data", str(binary), "--preset", "tiny", "--out", str(tmp_path / "o")], "is not UTF-8 text"),
        (["train", "--data", data, "--preset", "tiny", "--seq-len", "100000", "--out", str(tmp_path / "o")],
         "--seq-len 100000: --data"),
        (["train", "--out", out, "--resume", "--steps", "2"], "leaves nothing to train"),
        (["train", "--lr", "inf", "--out", str(tmp_path / "o")], "need a finite lr"),
        (["train", "--weight-decay", "nan", "--out", str(tmp_path / "o")], "--weight-decay must be finite"),
        (["train", "--device", "nosuch", "--preset", "tiny", "--data", data, "--out", str(tmp_path / "o")],
         "unknown device 'nosuch'"),
        (["generate", "--ckpt", out, "--max-new-tokens", "-3"], "--max-new-tokens must be >= 0"),
        (["generate", "--ckpt", out, "--temperature", "nan"], "temperature must be a finite number"),
        # the preset is checked before the data: a missing data file is not what the user hears about
        (["train", "--preset", "nosuch", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")],
         "--preset 'nosuch' is not a preset"),
    ]
    for args, msg in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (args, err)
    import gla.data.corpus

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(gla.data.corpus, "open", unreadable, raising=False)  # found before the builtin
    assert main(["train", "--data", data, "--preset", "tiny", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot be read (Permission denied)" in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as e:
        main(["train", "--dtype", "fp8"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_bench_ops_help():
    r = gla("bench", "ops", "--help")
    assert "--json" in r.stdout


def test_device_auto_is_the_gpu_when_there_is_one(monkeypatch):
    import torch
    from gla.device import resolve_device
    for available, kind in ((False, "cpu"), (True, "cuda")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        assert resolve_device("auto") == torch.device(kind)
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("cpu") == torch.device("cpu")


def test_host_allocator_keeps_freed_memory_where_glibc_is():
    """After gla/device.py's call (in a fresh process: the setting is process-wide) 40 MiB blocks freed and taken
    again are mostly not page-faulted in anew; without it glibc maps every such block afresh (10,240 pages of 4 KiB
    each). A page now and then is faulted in again anyway (the host may reclaim idle pages), hence the loose bound.
    Elsewhere than glibc the call reports that it did nothing."""
    import platform
    code = ("import resource, sys, torch\n"
            "from gla.device import hold_freed_host_memory\n"
            "took = hold_freed_host_memory() if sys.argv[1] == 'on' else False\n"
            "torch.empty(10 << 20).fill_(1)\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(8):\n"
            "    torch.empty(10 << 20).fill_(1)\n"
            "print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    runs = {}
    for mode in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        took, faults = out.stdout.split()
        runs[mode] = (took == "True", int(faults))
    glibc = platform.libc_ver()[0] == "glibc"
    assert runs["on"][0] is glibc
    if glibc:
        assert runs["off"][1] >= 8 * 10000 and runs["on"][1] <= 0.75 * runs["off"][1], runs


def test_diverged_run_exits_3_with_one_line(run, tmp_path, capsys, monkeypatch):
    """The issue's case (lr 50, no clipping) as the CLI reports it, with the divergence made immediate: every loss
    from the third step on is infinite. Exit status 3, one line naming the remedy, no traceback."""
    from gla.cli import main
    from gla.training.trainer import Trainer
    data, _ = run
    real = Trainer._nll
    monkeypatch.setattr(Trainer, "_nll", lambda self, b: real(self, b) * (float("inf") if self.step >= 2 else 1.0))
    rc = main(["train", "--data", data, "--preset", "tiny", "--lr", "50", "--warmup", "1", "--grad-clip", "0",
               "--steps", "60", "--seq-len", "32", "--batch-size", "4", "--eval-every", "2", "--eval-batches", "1",
               "--nonfinite-limit", "4", "--out", str(tmp_path / "div"), "--json"])
    err = capsys.readouterr().err
    final = [line for line in err.splitlines() if line.startswith("gla train: training diverged")]
    assert rc == 3 and len(final) == 1 and "Traceback" not in err, err
    assert "steps 3-6" in final[0] and "checkpoint of step 2" in final[0] and "Lower --lr (now 50)" in final[0]


def test_streamed_tokens_reach_the_host_in_batches():
    """gla generate on a GPU hands tokens to the printer n at a time (one host transfer each); a stop raised by the
    printer ends the stream at once, and flush() hands over the remainder."""
    import torch

    from gla.cli import _batched
    got, transfers = [], []
    collect, flush = _batched(lambda v: got.append(v), 3)
    for i in range(7):
        transfers.append(len(got))
        collect(torch.tensor([i, 99]))  # [B] with B = 2: the CLI's row is the first
    flush()
    assert got == list(range(7)) and transfers == [0, 0, 0, 3, 3, 3, 6]

    def printer(v):
        if v == 4:
            raise KeyboardInterrupt
        got.append(v)
    got.clear()
    collect, flush = _batched(printer, 3)
    with pytest.raises(KeyboardInterrupt):
        for i in range(9):
            collect(torch.tensor([i]))
    assert got == [0, 1, 2, 3]
