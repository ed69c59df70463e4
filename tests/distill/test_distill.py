"""Distillation: the KL term, stage 1 (attention transfer) and `gla distill` end to end on tiny CPU models."""
import json

import pytest
import torch
import torch.nn.functional as F

from gla import GLATransformer
from gla.distill import convert
from gla.distill.transfer import attention_transfer, kl_sum, load_teacher, transfer_parameters
from gla.models import from_pretrained
from tests.utils import train_cut_at

TEXT = "Now is the winter of our discontent made glorious summer by this sun of York. " * 60


def test_kl_sum_is_the_summed_kl_over_scored_positions():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    y = torch.randint(0, 7, (2, 5), generator=gen)
    y[0, 1] = y[1, 4] = -100
    keep = y != -100
    want = F.kl_div(F.log_softmax(s[keep], -1), F.log_softmax(t[keep], -1), log_target=True, reduction="sum")
    assert torch.allclose(kl_sum(s, t, y, -100), want, rtol=1e-5)
    assert torch.allclose(kl_sum(s, t, y, -100, chunk=3), want, rtol=1e-5)  # chunks of positions: the same sum
    assert kl_sum(t, t, y, -100).abs() < 1e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A softmax teacher trained briefly on TEXT (gla train --mixer softmax), and its 2:1 GLA conversion."""
    from gla.training import TrainConfig, train
    tmp = tmp_path_factory.mktemp("distill")
    (tmp / "text.txt").write_text(TEXT)
    train(TrainConfig(data=str(tmp / "text.txt"), preset="tiny", n_layers=3, mixer="softmax", steps=150, seq_len=32,
                      batch_size=16, lr=3e-3, warmup=10, eval_every=150, eval_batches=1, sample_tokens=0,
                      dtype="fp32", out=str(tmp / "teacher")), progress=False)
    convert(str(tmp / "teacher" / "checkpoint"), str(tmp / "student"), "0,1")  # the last layer stays softmax
    return str(tmp / "teacher" / "checkpoint"), str(tmp / "student")


def test_attention_transfer_trains_only_the_mixing_parameters_and_lowers_the_error(pair):
    teacher, student = load_teacher(pair[0]), from_pretrained(pair[1])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    new = {id(p) for p in transfer_parameters(student)}
    names = {n for n, p in student.named_parameters() if id(p) in new}
    assert names and all(any(f".{m}." in n for m in ("gk_proj", "g_norm", "q_proj", "k_proj")) for n in names)
    windows = torch.tensor([list(TEXT[i:i + 32].encode()) for i in range(0, 160, 40)])  # [4, 32]
    batches = [{"input_ids": windows, "cu_seqlens": None} for _ in range(25)]  # one batch: errors comparable
    first, last = attention_transfer(student, teacher, batches, lr=3e-3)
    assert last < first
    assert all(p.grad is None and p.requires_grad for p in student.parameters())  # nothing left for stage 2
    after = student.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]) == (k not in names), k


def _kl_to_teacher(student_dir, teacher_dir, ids):
    s, t = from_pretrained(student_dir).eval(), load_teacher(teacher_dir)
    with torch.no_grad():
        return float(kl_sum(s(ids)[0], t(ids)[0], torch.zeros_like(ids), -100)) / ids.numel()


def test_gla_distill_lowers_the_students_kl_and_resumes(pair, tmp_path, capsys):
    from gla.cli import main
    teacher, student = pair
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    held_out = torch.tensor([list(TEXT[-200:-100].encode())])
    flags = ["--data", str(data), "--seq-len", "32", "--batch-size", "8", "--eval-every", "10", "--eval-batches", "1",
             "--sample-tokens", "0", "--lr", "3e-3", "--warmup", "2", "--json"]
    out = str(tmp_path / "run")
    assert main(["distill", "--teacher", teacher, "--student", student, "--out", out, "--steps", "20",
                 "--transfer-steps", "5", *flags]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 20
    assert _kl_to_teacher(f"{out}/checkpoint", teacher, held_out) < 0.8 * _kl_to_teacher(student, teacher, held_out)
    distilled = from_pretrained(f"{out}/checkpoint")
    assert [layer.mixer for layer in distilled.layers] == ["gla", "gla", "softmax"]
    assert main(["distill", "--out", out, "--resume", "--steps", "22", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 22


def test_bad_distill_requests(pair, tmp_path):
    from gla.cli import main
    from gla.training import TrainConfig
    with pytest.raises(ValueError, match="--teacher"):
        TrainConfig(transfer_steps=3)
    with pytest.raises(ValueError, match="--init-from"):
        TrainConfig(init_from=pair[1], d_model=64)
    assert main(["distill", "--teacher", pair[0], "--out", str(tmp_path / "x")]) == 2
    other = GLATransformer(100, 64, 2, 128, 3, mixer="softmax")
    other.save_pretrained(str(tmp_path / "other"))
    (tmp_path / "t.txt").write_text(TEXT)
    assert main(["distill", "--teacher", str(tmp_path / "other"), "--student", pair[1], "--data",
                 str(tmp_path / "t.txt"), "--seq-len", "16", "--out", str(tmp_path / "y"), "--steps", "1"]) == 2


def _metrics(run):
    """The losses, gradient norms and learning rates of a run's metrics.jsonl (not its timings)."""
    keep = ("step", "loss", "val_loss", "grad_norm", "lr")
    return [{k: v for k, v in json.loads(line).items() if k in keep} for line in open(f"{run}/metrics.jsonl")]


def test_lora_distill_trains_adapters_saves_merged_weights_and_resumes_exactly(pair, tmp_path):
    """--lora: only the adapters, gates and output norms change; the checkpoint is an ordinary model (adapters
    merged) with lora.safetensors beside it; a run cut after its step-4 checkpoint and resumed reproduces the
    uninterrupted one bit for bit; the distilled student is closer to the teacher than the converted one."""
    pytest.importorskip("peft")
    from gla.training import TrainConfig, resume_config, train
    teacher, student = pair
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    cfg = dict(data=str(data), seq_len=32, batch_size=8, steps=8, eval_every=4, eval_batches=1, log_every=1,
               sample_tokens=0, lr=1e-2, warmup=1, teacher=teacher, init_from=student, lora=4, device="cpu",
               dtype="fp32")
    train(TrainConfig(out=str(tmp_path / "full"), **cfg), progress=False)
    ckpt = tmp_path / "full" / "checkpoint"
    assert (ckpt / "lora.safetensors").is_file()
    before, after = from_pretrained(student).state_dict(), from_pretrained(str(ckpt)).state_dict()
    assert set(before) == set(after)
    trained = {k for k in before if not torch.equal(before[k], after[k])}
    assert trained and all(".attn." in k and int(k.split(".")[1]) < 2 for k in trained)  # GLA layers 0, 1 only
    assert any(k.endswith("q_proj.weight") for k in trained) and any(k.endswith("o_proj.weight") for k in trained)
    held_out = torch.tensor([list(TEXT[-200:-100].encode())])
    assert _kl_to_teacher(str(ckpt), teacher, held_out) < _kl_to_teacher(student, teacher, held_out)

    train_cut_at(TrainConfig(out=str(tmp_path / "cut"), **cfg), 6)  # after the step-4 checkpoint
    train(resume_config(str(tmp_path / "cut"), {}), resume=True, progress=False)
    full = _metrics(tmp_path / "full")
    assert len(full) == 8 + 2 and _metrics(tmp_path / "cut") == full  # bit-exact
    resumed = from_pretrained(str(tmp_path / "cut" / "checkpoint")).state_dict()
    assert all(torch.equal(resumed[k], after[k]) for k in after)
    with pytest.raises(ValueError, match="--lora"):
        TrainConfig(lora=4)
