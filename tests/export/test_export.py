"""gla export: an ONNX directory that ONNX Runtime runs without torch, giving the checkpoint's greedy tokens."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from gla import GLAConfig, GLATransformer  # noqa: E402
from gla.export import export, load_exported  # noqa: E402
from gla.export.merge import all_nodes  # noqa: E402
from gla.generation import generate  # noqa: E402

# the tiny preset, with a short convolution and feature map, or with a softmax layer (GQA: 4 query heads on 2 KV
# heads) whose KV cache grows in the state
KINDS = {"gla": {}, "conv": {"use_short_conv": True, "feature_map": "elu1"},
         "hybrid": {"attn_layers": (1,), "attn_heads": 4, "attn_kv_heads": 2}}


def _ckpt(tmp_path, kind="gla", **kw):
    torch.manual_seed(0)
    m = GLATransformer.from_config(GLAConfig.preset("tiny", **{**KINDS[kind], **kw})).eval()
    with torch.no_grad():  # gates from strong to weak, some far below the range where log(sigmoid(x)) underflows
        for layer in (la for la in m.layers if la.mixer != "softmax"):
            layer.attn.gk_proj[1].bias.copy_(torch.linspace(-120.0, 6.0, layer.attn.gk_proj[1].bias.numel()))
    path = str(tmp_path / f"ckpt-{kind}")
    m.save_pretrained(path)
    return m, path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    out = {}
    for kind in KINDS:
        m, path = _ckpt(tmp, kind)
        export(path, str(tmp / f"onnx-{kind}"), max_block=8)
        out[kind] = (m, str(tmp / f"onnx-{kind}"))
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_greedy_tokens_equal_the_checkpoint(exported, kind):
    """A prompt longer than one block (8): several prefill calls, then one-token steps; 60 greedy tokens."""
    m, path = exported[kind]
    prompt = list(b"To be, or not to be, that is")
    want = generate(m, torch.tensor([prompt]), 60, temperature=0)[0, len(prompt):].tolist()
    assert load_exported(path).generate(prompt, 60, temperature=0) == want


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_and_state_equal_the_model_for_a_batch(exported, kind):
    m, path = exported[kind]
    ids = torch.randint(0, 256, (3, 21), generator=torch.Generator().manual_seed(1))
    e = load_exported(path)
    logits, state = e.forward(ids.numpy(), e.new_state(3))
    with torch.no_grad():
        ref, ref_state = m(ids)
    assert np.allclose(logits, ref[:, -1].numpy(), rtol=1e-4, atol=1e-4)
    assert np.allclose(state["l0.state"], ref_state.layers[0].recurrent.numpy(), rtol=1e-4, atol=1e-5)
    if kind == "hybrid":
        assert np.allclose(state["l1.k"], ref_state.layers[1].k.numpy(), rtol=1e-4, atol=1e-5)
        assert state["l1.k"].shape == (3, 2, 21, 64 // 4)  # [B, KV heads, T, d_model / query heads]
    assert (state["seen"] == 21).all()


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_one_token_branch_equals_the_block_branch(exported, kind):
    """ids of one token run the step graph, longer blocks the block graph: fed one token at a time, the export gives
    the logits and state that blocks of 8, 5 and 2 give, for rows that started with different states."""
    import onnx
    m, path = exported[kind]
    model = onnx.load(os.path.join(path, "model.onnx"))
    branch = next(n for n in model.graph.node if n.op_type == "If")
    assert {a.name for a in branch.attribute} == {"then_branch", "else_branch"}
    ids = torch.randint(0, 256, (2, 15), generator=torch.Generator().manual_seed(2)).numpy()
    e = load_exported(path)
    _, start = e.forward(torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3)).numpy(),
                         e.new_state(2))
    steps, state = [], start
    for t in range(ids.shape[1]):
        logits, state = e.forward(ids[:, t:t + 1], state)
        steps.append(logits)
    blocks, block_state, t = [], start, 0
    for n in (8, 5, 2):
        logits, block_state = e.forward(ids[:, t:t + n], block_state, all_logits=True)
        blocks.append(logits)
        t += n
    assert np.allclose(np.stack(steps, 1), np.concatenate(blocks, 1), rtol=1e-4, atol=1e-4)
    for name in block_state:
        assert np.allclose(state[name], block_state[name], rtol=1e-4, atol=1e-5), name


def test_a_large_model_gets_the_block_graph_alone(tmp_path, monkeypatch):
    """Above STEP_GRAPH_MAX_BYTES of weights there is no If: the block graph also serves one-token steps."""
    import onnx

    from gla.export import to_onnx
    monkeypatch.setattr(to_onnx, "STEP_GRAPH_MAX_BYTES", 0)
    m, path = _ckpt(tmp_path, "hybrid")
    meta = export(path, str(tmp_path / "e"), max_block=8)
    assert meta["step_graph"] is False
    assert not any(n.op_type == "If" for n in onnx.load(str(tmp_path / "e" / "model.onnx")).graph.node)
    prompt = list(b"To be, or not")
    want = generate(m, torch.tensor([prompt]), 20, temperature=0)[0, len(prompt):].tolist()
    assert load_exported(str(tmp_path / "e")).generate(prompt, 20, temperature=0) == want


def test_runs_without_torch(exported):
    """run.py, copied into the directory, imports no torch and no gla."""
    _, path = exported["gla"]
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.modules['gla'] = None; "
            f"sys.argv = ['run.py', '--prompt', 'abc', '--max-new-tokens', '5', '--temperature', '0']; "
            f"runpy.run_path({os.path.join(path, 'run.py')!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("abc") and len(r.stdout) > 4


# Logits of the tiny random model against fp32: int4's symmetric step over a block of 32 Gaussian weights is about
# max/7 ~ 0.3 sigma, a rounding error of ~0.09 sigma per weight (int8: ~0.005 sigma), so int4 keeps less correlation.
@pytest.mark.parametrize("kind,bits,corr", [("int8", 8, 0.99), ("int4", 4, 0.97)])
def test_quantized_export_keeps_a_float_state(tmp_path, kind, bits, corr, monkeypatch):
    import onnx
    m, path = _ckpt(tmp_path)
    meta = export(path, str(tmp_path / kind), quantize=kind)
    assert meta["quantize"] == kind
    graph = onnx.load(str(tmp_path / kind / "model.onnx"))
    quantized = [n for n in all_nodes(graph.graph) if n.op_type == "MatMulNBits"]
    assert quantized and all(a.i == bits for n in quantized for a in n.attribute if a.name == "bits")
    floats = {i.name: i.type.tensor_type.elem_type for i in list(graph.graph.input) + list(graph.graph.output)}
    assert all(floats[n] == onnx.TensorProto.FLOAT for n in ("l0.state", "l0.state_out", "logits"))
    import onnxruntime
    with monkeypatch.context() as patch:  # an onnxruntime without 8-bit MatMulNBits: a clear error
        patch.setattr(onnxruntime, "__version__", "1.21.1")
        with pytest.raises(RuntimeError, match=r"need onnxruntime >= 1\.22"):
            load_exported(str(tmp_path / kind))
    e = load_exported(str(tmp_path / kind))
    prompt = list(b"hello")
    logits, _ = e.forward([prompt], e.new_state(1))
    with torch.no_grad():
        ref = m(torch.tensor([prompt]))[0][0, -1].numpy()
    assert np.isfinite(logits).all() and np.corrcoef(logits[0], ref)[0, 1] > corr


def test_bad_requests_get_clear_errors(tmp_path, exported):
    _, path = _ckpt(tmp_path)
    with pytest.raises(FileExistsError):
        export(path, path)
    with pytest.raises(ValueError, match="quantize"):
        export(path, str(tmp_path / "x"), quantize="int2")
    with pytest.raises(FileNotFoundError, match="export.json"):
        load_exported(path)
    e = load_exported(exported["gla"][1])
    with pytest.raises(ValueError, match="token ids"):
        e.forward([[0, 300]], e.new_state(1))
    bad = tmp_path / "bad"
    os.makedirs(bad)
    (bad / "export.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="format"):
        load_exported(str(bad))


def test_cli_export_and_generate_json(tmp_path, capsys):
    from gla.cli import main
    _, path = _ckpt(tmp_path)
    assert main(["export", "--ckpt", path, "--out", str(tmp_path / "e")]) == 0
    capsys.readouterr()
    for ckpt in (path, str(tmp_path / "e")):
        assert main(["generate", "--ckpt", ckpt, "--prompt", "ab", "--max-new-tokens", "7", "--temperature", "0",
                     "--json"]) == 0
    a, b = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert a == b and a["new_tokens"] == 7


def test_eval_ppl_scores_an_export_as_its_checkpoint(tmp_path):
    """All-position logits through blocks and across windows: the same loss as the checkpoint, with and without
    --seq-len (the state carried between windows)."""
    from gla.eval.ppl import evaluate
    _, path = _ckpt(tmp_path, "conv")
    export(path, str(tmp_path / "e"), max_block=8)
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 4)
    for seq_len in (None, 50):
        a = evaluate(path, str(text), seq_len, device="cpu")
        b = evaluate(str(tmp_path / "e"), str(text), seq_len, device="auto")
        assert a["tokens"] == b["tokens"] and abs(a["loss"] - b["loss"]) < 1e-5 * a["loss"], (a, b)
    with pytest.raises(ValueError, match="CPU"):
        evaluate(str(tmp_path / "e"), str(text), device="cuda")


def test_cli_offers_the_exporters_formats():
    from gla.cli import QUANTIZE
    from gla.export.to_onnx import QUANTIZE as formats
    assert set(QUANTIZE) == set(formats) - {None}


def test_quantize_flag_of_generate_and_ppl(tmp_path, capsys):
    """--quantize int8 / int4 on a checkpoint runs an export made for the call (ONNX Runtime): close to fp32."""
    from gla.cli import main
    _, path = _ckpt(tmp_path)
    text = tmp_path / "t.txt"
    text.write_text("Some text to score, long enough for a few windows of thirty-two tokens each. " * 3)
    losses = []
    for extra in ([], ["--quantize", "int8"], ["--quantize", "int4"]):
        assert main(["eval", "ppl", "--ckpt", path, "--data", str(text), "--seq-len", "32", "--json", *extra]) == 0
        losses.append(json.loads(capsys.readouterr().out)["loss"])
    assert all(q != losses[0] and abs(q - losses[0]) < 0.02 * losses[0] for q in losses[1:]), losses
    for kind in ("int8", "int4"):
        assert main(["generate", "--ckpt", path, "--prompt", "ab", "--max-new-tokens", "4", "--quantize", kind,
                     "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["new_tokens"] == 4


def _left_behind(directory) -> list:
    return sorted(p for p in os.listdir(directory) if p.startswith(".gla-export-") or p == "out")


def test_models_the_exporter_cannot_take_get_clear_errors_and_leave_nothing(tmp_path, monkeypatch):
    """Too large for one ONNX file, a graph the tracer fails on, a graph with nothing to quantise: a one-line
    ValueError each (the CLI prints it), and neither the output nor the temporary directory is left behind."""
    import gla.export.to_onnx as to_onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    _, path = _ckpt(tmp_path)
    out = str(tmp_path / "out")
    with monkeypatch.context() as m:
        m.setattr(to_onnx, "MAX_BYTES", 1000)
        with pytest.raises(ValueError, match="GiB of fp32 weights"):
            export(path, out)
    assert _left_behind(tmp_path) == []

    def fail(*_args, **_kw):
        raise RuntimeError("unsupported operator aten::something\nand a long trace")
    with monkeypatch.context() as m:
        m.setattr(to_onnx, "_trace", fail)
        with pytest.raises(ValueError, match=r"could not trace this model \(RuntimeError: unsupported operator"):
            export(path, out)
    assert _left_behind(tmp_path) == []
    with monkeypatch.context() as m:
        m.setattr(MatMulNBitsQuantizer, "process", lambda self: None)  # a quantiser that finds nothing to do
        with pytest.raises(ValueError, match="no weight matmul"):
            export(path, out, quantize="int8")
    assert _left_behind(tmp_path) == []


def test_missing_exporter_packages_are_named(tmp_path, monkeypatch):
    import importlib.util
    _, path = _ckpt(tmp_path)
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else find(name, *a))
    with pytest.raises(ImportError, match=r"onnxscript: pip install 'gla\[edge\]'"):
        export(path, str(tmp_path / "out"))
    assert _left_behind(tmp_path) == []


def test_an_export_is_not_quantised_again(tmp_path, exported, capsys):
    """--quantize on an export directory: its own format runs; another is refused, not silently ignored."""
    from gla.cli import main
    fp32 = exported["gla"][1]
    assert main(["generate", "--ckpt", fp32, "--prompt", "ab", "--max-new-tokens", "3", "--quantize", "int8"]) == 2
    assert "fp32 weights, which cannot be quantised again" in capsys.readouterr().err
    _, path = _ckpt(tmp_path)
    export(path, str(tmp_path / "q"), quantize="int8")
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(tmp_path / "q"), "--prompt", "ab", "--max-new-tokens", "3", "--quantize",
                 "int8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 3
