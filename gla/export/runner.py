"""Run a model exported by ``gla export``: ONNX Runtime and numpy only, no torch and no gla model code.

This file is copied into every export directory as ``run.py``, so the directory runs on a machine that has only
``onnxruntime`` and ``numpy`` (plus ``tokenizers`` when the model uses a tokenizer.json):

    python run.py --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8

The graph (model.onnx) takes token ids [B, T] (1 <= T <= max_block) with the model's state and returns the logits
at every position and the new state; the state is explicit: one tensor per input named in export.json, fp32
(GLA's recurrent states and short-convolution caches, and the KV caches of a hybrid's softmax layers, whose
context dim has size 0 in export.json: they start empty and grow), zeros at the start of a sequence. Longer inputs
run in blocks of max_block tokens, so a GLA model's memory does not grow with the prompt.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

FORMAT = 1
BLOCKWISE_ORT = (1, 22)  # the first onnxruntime with 8-bit MatMulNBits (blockwise int8 / int4 exports)


class ByteCodec:
    """One token per UTF-8 byte (gla's default tokenizer, re-stated here so the runner needs no gla import)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class FileCodec:
    """A Hugging Face ``tokenizers`` tokenizer.json."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer
        self._tok = Tokenizer.from_file(path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def export_meta(path: str) -> dict | None:
    """The export.json of an export directory, or None where ``path`` is not one (a checkpoint, say)."""
    meta_path = os.path.join(path, "export.json")
    if not os.path.isfile(meta_path):
        return None
    with open(meta_path) as f:
        return json.load(f)


class ExportedModel:
    """An export directory loaded into ONNX Runtime. ``threads``: intra-op threads (default: the runtime's)."""

    def __init__(self, path: str, threads: int | None = None):
        import onnxruntime as ort
        self.meta = export_meta(path)
        if self.meta is None:
            raise FileNotFoundError(f"{path} is not a gla export directory (no export.json)")
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{os.path.join(path, 'export.json')}: export format {self.meta.get('format')!r}, this runner reads {FORMAT}")
        graph = os.path.join(path, self.meta["graph"])
        if not os.path.isfile(graph):
            raise FileNotFoundError(f"the graph file is missing: {graph}")
        found = tuple(int(p) for p in ort.__version__.split(".")[:2] if p.isdigit())
        if self.meta.get("quant_block") and found < BLOCKWISE_ORT:
            raise RuntimeError(f"{path} holds blockwise {self.meta.get('quantize')} weights, which need onnxruntime >= "
                               f"{'.'.join(map(str, BLOCKWISE_ORT))} (found {ort.__version__}): "
                               "pip install -U onnxruntime")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
        self.states = self.meta["states"]  # {input name: shape without the batch dim}
        self.max_block = int(self.meta["max_block"])
        self.vocab_size = int(self.meta["vocab_size"])
        tok = self.meta["tokenizer"]
        self.codec = ByteCodec() if tok == "bytes" else FileCodec(os.path.join(path, tok))

    def new_state(self, batch: int = 1) -> dict:
        """The state of ``batch`` empty sequences."""
        state = {name: np.zeros((batch, *shape), dtype=np.float32) for name, shape in self.states.items()}
        state["seen"] = np.zeros(batch, dtype=np.int64)
        return state

    def forward(self, ids, state: dict, all_logits: bool = False) -> tuple[np.ndarray, dict]:
        """ids: [B, T] int (T >= 1) continuing ``state`` -> (logits at the last position [B, vocab], or at every
        position [B, T, vocab] with all_logits, and the new state)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"ids must be [B, T] with T >= 1, got shape {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        blocks = []
        for s in range(0, ids.shape[1], self.max_block):
            out = self.session.run(None, {"ids": ids[:, s:s + self.max_block], **state})
            blocks.append(out[0] if all_logits else out[0][:, -1])
            state = dict(zip(["seen", *self.states], out[1:]))
        return (np.concatenate(blocks, 1) if all_logits else blocks[-1]), state

    def generate(self, prompt: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, eos_token_id: int | None = None, callback=None):
        """New token ids continuing ``prompt`` (temperature 0 = greedy); callback(token) on each one."""
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        rng = np.random.default_rng(seed)
        logits, state = self.forward([prompt], self.new_state(1))
        new = []
        for i in range(max_new_tokens):
            tok = sample(logits[0], temperature, top_k, top_p, rng)
            new.append(tok)
            if callback is not None:
                callback(tok)
            if tok == eos_token_id or i + 1 == max_new_tokens:
                break
            logits, state = self.forward([[tok]], state)
        return new


def sample(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None, rng) -> int:
    """One token from logits [vocab]: greedy at temperature 0, else softmax sampling after top-k / top-p."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = np.sort(z)[-min(top_k, z.size)]
        z = np.where(z < kth, -np.inf, z)
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        order = np.argsort(-z)
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        drop = np.cumsum(p) - p > top_p  # keep the smallest prefix whose mass reaches top_p
        z[order[drop]] = -np.inf
    p = np.exp(z - z.max())
    return int(rng.choice(z.size, p=p / p.sum()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Sample from a gla export directory (ONNX Runtime).")
    p.add_argument("--dir", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    m = ExportedModel(args.dir)
    new = m.generate(m.codec.encode(args.prompt), args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                     args.seed)
    sys.stdout.write(args.prompt + m.codec.decode(new) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
