"""``gla export``: a checkpoint to a standalone ONNX directory (graph, tokenizer, config, runner, README).

One model serves prefill, scoring and decoding: token ids [B, T] (1 <= T <= max_block) and the model's state in, the
logits at every position and the new state out (the head over a block's positions costs a few percent of the
block). For small models (STEP_GRAPH_MAX_BYTES) it holds two traced graphs behind an If on T
(gla/export/merge.py), sharing one copy of the weights: for T = 1 the recurrence's single update, which runs a
small model's decoding step in four fifths of the block graph's time; for longer blocks, and for every T in larger
models, the "pairwise" backend (plain tensor ops, exact for any gate: gla/ops/pairwise.py). Neither has a custom
operator or a branch on data; softmax layers (hybrids) take their KV cache [B, H_kv, L, D] in and return it grown
by T (L starts at 0).
The state is fp32 whatever the weights: int8 or int4 quantisation (blockwise, ONNX Runtime's MatMulNBits:
_quantize) touches only the matmuls whose weights are constants, never the recurrence.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings

import torch

from gla.layers.fused import FusedProjections
from gla.layers.gla_attention import GLAState
from gla.layers.softmax import KVCache
from gla.models.state import ModelState

from .merge import all_nodes, merge_step_and_block
from .runner import FORMAT

GRAPH = "model.onnx"
MAX_BYTES = 2**31 - 2**27  # protobuf's 2 GiB limit on one file, less room for the graph itself
STEP_GRAPH_MAX_BYTES = 64 * 2**20
"""Models with at most this many bytes of fp32 weights get the one-token graph beside the block graph. A small
model's step is bound by its nodes (the demo model, 14 MB, int8: 0.41 ms with it, 0.49-0.51 without); a large one's
by reading its weights, where the step graph measured no faster (gla-340m's width at 4 layers, 480 MB: 13.1 vs
12.7 ms fp32, 4.5 vs 4.5 int8) and ONNX Runtime's per-branch pre-packing cost 20-34% more memory
(benchmarks/NOTES.md)."""
QUANTIZE = (None, "int8", "int4")


def state_layout(model) -> dict:
    """{graph input name: shape without the batch dim} of every state tensor, in the graph's order. A softmax
    layer's KV cache [H_kv, L, D] grows with the context: L is 0 in the layout (an empty cache)."""
    names = {}
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        if layer.mixer == "softmax":
            names[f"l{i}.k"] = names[f"l{i}.v"] = [attn.num_kv_heads, 0, attn.head_dim]
            continue
        names[f"l{i}.state"] = [attn.n_heads, attn.head_k, attn.head_v]
        if attn.convs is not None:
            for part, conv in zip("qkv", attn.convs):
                names[f"l{i}.conv_{part}"] = [conv.weight.shape[0], conv.kernel_size - 1]
    return names


class _Step(torch.nn.Module):
    """The graph's function: (ids [B, T], seen [B], *state) -> (logits [B, T, vocab], seen, *new state)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.kinds = ["kv" if layer.mixer == "softmax" else "conv" if layer.attn.convs is not None else "gla"
                      for layer in model.layers]

    def forward(self, ids, seen, *flat):
        layers, it = [], iter(flat)
        for kind in self.kinds:
            s = next(it)
            if kind == "kv":
                layers.append(KVCache(s, next(it)))
            else:
                layers.append(GLAState(s, (next(it), next(it), next(it)) if kind == "conv" else None))
        logits, new = self.model(ids, ModelState(layers, seen))
        out = [logits, new.seen]
        for s in new.layers:
            out.extend((s.k, s.v) if isinstance(s, KVCache) else (s.recurrent, *(s.conv or ())))
        return tuple(out)


def export(ckpt: str, out: str, quantize: str | None = None, max_block: int = 64) -> dict:
    """Write the export directory ``out`` (must not exist) from the checkpoint or run directory ``ckpt``.
    Returns export.json's contents."""
    from gla.data import tokenizer_for
    from gla.models import from_pretrained

    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    if max_block < 2:
        raise ValueError(f"max_block must be >= 2, got {max_block}")
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; choose a new --out")
    _require_exporter()
    model = from_pretrained(ckpt).float().eval()
    size = sum(p.numel() for p in model.parameters()) * 4
    if size > MAX_BYTES:
        raise ValueError(f"{ckpt}: {size / 2**30:.1f} GiB of fp32 weights; one ONNX file holds at most 2 GiB "
                         "(external weight files are not written yet)")
    tok = tokenizer_for(ckpt)
    layout = state_layout(model)
    names_in = ["ids", "seen", *layout]
    names_out = ["logits", "seen_out", *(f"{n}_out" for n in layout)]
    tmp = tempfile.mkdtemp(prefix=".gla-export-", dir=os.path.dirname(os.path.abspath(out)) or ".")
    try:
        graph = os.path.join(tmp, GRAPH)
        step_graph = size <= STEP_GRAPH_MAX_BYTES
        # (tokens traced, file): with a step graph both are merged into ``graph`` below; without, the block is it
        parts = ([(1, os.path.join(tmp, "step.onnx")), (min(4, max_block), os.path.join(tmp, "block.onnx"))]
                 if step_graph else [(min(4, max_block), graph)])
        for T, path in parts:
            try:
                _trace(model, layout, T, max_block, path, names_in, names_out)
            except (OSError, MemoryError):
                raise
            except Exception as e:  # the exporter's own errors are pages long; the cause is kept as __cause__
                first = (str(e).strip().splitlines() or [""])[0][:300]
                raise ValueError(f"{ckpt}: the ONNX exporter could not trace this model ({type(e).__name__}: "
                                 f"{first})") from e
            if quantize is not None:
                with _quiet():
                    _quantize(path, quantize)
        if step_graph:
            merge_step_and_block(parts[0][1], parts[1][1], graph)
            for _, path in parts:
                os.remove(path)
        meta = {"format": FORMAT, "graph": GRAPH, "vocab_size": model.config.vocab_size, "max_block": max_block,
                "states": layout, "tokenizer": tok.save(tmp), "quantize": quantize, "source": os.path.abspath(ckpt),
                "quant_block": QUANT_BLOCK if quantize else None, "step_graph": step_graph}
        with open(os.path.join(tmp, "export.json"), "w") as f:
            json.dump(meta, f, indent=1)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(model.config.to_dict(), f, indent=1)
        shutil.copyfile(os.path.join(os.path.dirname(__file__), "runner.py"), os.path.join(tmp, "run.py"))
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(_readme(meta))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _require_exporter() -> None:
    """torch.onnx's exporter needs onnx and onnxscript, which a CPU-only install of gla does not have."""
    import importlib.util
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"gla export needs {' and '.join(missing)}: pip install 'gla[edge]'")


def _trace(model, layout: dict, T: int, max_block: int, path: str, names_in: list, names_out: list) -> None:
    """Export ``_Step(model)`` for ids [B, T] to ``path``: T = 1 as the one-token step (the recurrence's single
    update), any other T as the block graph of 1..max_block tokens (the "pairwise" backend: plain tensor ops, exact
    for any gate). The input projections that share an input are traced fused (gla.layers.fused): half the
    matmuls per layer."""
    for layer in model.layers:
        layer.attn.backend = "recurrent" if T == 1 else "pairwise"
    B, L = 2, 3  # sizes 0 and 1 would be fixed by the tracer: trace at B = 2 and a KV length of 3
    flat = [torch.zeros(B, s[0], L, s[2]) if s[1] == 0 else torch.zeros(B, *s) for s in layout.values()]
    args = (torch.zeros(B, T, dtype=torch.long), torch.full((B,), L, dtype=torch.long), *flat)
    batch, context = torch.export.Dim("batch", max=4096), torch.export.Dim("context", max=2**20)
    ids = {0: batch} if T == 1 else {0: batch, 1: torch.export.Dim("block", max=max_block)}
    dynamic = (ids, {0: batch}, tuple({0: batch, 2: context} if s[1] == 0 else {0: batch} for s in layout.values()))
    with _quiet(), torch.no_grad(), FusedProjections(model):
        torch.onnx.export(_Step(model), args, path, dynamo=True, dynamic_shapes=dynamic, input_names=names_in,
                          output_names=names_out, external_data=False, verbose=False)


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's and quantiser's advice (torchvision operators, pre-processing) for one call."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._export", "onnxruntime", "")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


QUANT_BLOCK = 32
"""Weights per quantisation scale: one fp32 scale for each block of 32 weights along a column's input dim."""


def _quantize(graph: str, kind: str) -> None:
    """The weights of the constant-weight matmuls to int8 or int4 in place, in blocks of QUANT_BLOCK with symmetric
    scales (ONNX Runtime's MatMulNBits), multiplied with int8-quantised activations (accuracy level 4).

    Measured against per-tensor dynamic quantisation (benchmarks/NOTES.md): on a trained 4-layer GLA the dynamic
    quantiser's int8 cost 5.6% of validation loss (per-channel weight scales did not help: the loss came from the
    activations' single scale), blockwise int8 0.04%, blockwise int4 0.44%."""
    try:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                     MatMulNBitsQuantizer)
    except ImportError as e:
        raise ImportError(f"--quantize {kind} needs onnxruntime: pip install 'gla[edge]'") from e
    config = DefaultWeightOnlyQuantConfig(block_size=QUANT_BLOCK, is_symmetric=True, accuracy_level=4,
                                          bits=8 if kind == "int8" else 4)
    quantizer = MatMulNBitsQuantizer(onnx.load(graph), algo_config=config)
    quantizer.process()
    if not any(n.op_type == "MatMulNBits" for n in all_nodes(quantizer.model.model.graph)):
        raise ValueError(f"--quantize {kind}: ONNX Runtime's quantiser found no weight matmul it could quantise in "
                         "this model; export it without --quantize")
    quantizer.model.save_model_to_file(graph, False)


def _readme(meta: dict) -> str:
    q = meta["quantize"] or "none (fp32)"
    return f"""# gla export

A GLA language model exported by `gla export` (format {meta['format']}); source: {meta['source']}.
Weights: {q}; recurrent state: fp32.

Run with ONNX Runtime and numpy only (add `tokenizers` if the tokenizer below is a tokenizer.json):

    pip install onnxruntime numpy
    python run.py --prompt "Hello" --max-new-tokens 100 --temperature 0.8

or from Python with gla installed: `gla.load_exported(DIR).generate(...)`, or `gla generate --ckpt DIR`.

Files: `{meta['graph']}` (the graph: token ids [B, T <= {meta['max_block']}] and the state in, logits [B, T, vocab]
and the new state out), `export.json` (state tensor names and shapes, vocabulary, tokenizer), tokenizer:
`{meta['tokenizer']}`, `run.py` (the runner).
"""
