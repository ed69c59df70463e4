"""Perplexity of a trained model on text: `gla eval ppl --ckpt DIR --data PATH [--seq-len N] [--split val] --json`.

With --seq-len N the text is scored in non-overlapping windows of N tokens, each from a fresh state (the context
seen in training); without it each document streams through the recurrent state in windows of 2048 tokens, the
state carried across windows, so every token sees its whole document (unbounded context).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from gla.data import ByteTokenizer, TokenStream, eval_windows

STREAM_WINDOW = 2048


@torch.inference_mode()
def perplexity(model, stream: TokenStream, tokenizer, seq_len: int | None = None, batch_size: int = 64,
               device="cpu", stream_window: int = STREAM_WINDOW) -> dict:
    """Score every next-token prediction inside the documents of `stream`.

    Returns {"loss": nats/token, "bpb": bits per UTF-8 byte of the predicted text, "ppl", "tokens", "bytes"}.
    """
    if seq_len is not None and seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {seq_len}")
    model.eval()
    total, n_tok, targets = 0.0, 0, []

    def score(x, y, state=None):
        logits, state = model(x.to(device), state)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum")
        return float(nll), state

    if seq_len is None:
        state = None
        for x, y, new_doc in eval_windows(stream, None, stream_window):
            nll, state = score(x, y, None if new_doc else state)
            total, n_tok = total + nll, n_tok + y.numel()
            targets.append(y)
    else:
        full, rest = [], []
        for x, y, _ in eval_windows(stream, seq_len):
            (full if x.shape[1] == seq_len else rest).append((x, y))
            targets.append(y)
        for i in range(0, len(full), batch_size):   # equal windows in batches: same result, much faster
            xs, ys = zip(*full[i:i + batch_size])
            nll, _ = score(torch.cat(xs), torch.cat(ys))
            total, n_tok = total + nll, n_tok + sum(y.numel() for y in ys)
        for x, y in rest:
            nll, _ = score(x, y)
            total, n_tok = total + nll, n_tok + y.numel()
    if n_tok == 0:
        raise ValueError("no tokens to score: the text is shorter than two tokens")
    ids = torch.cat([t.flatten() for t in targets])
    n_bytes = ids.numel() if isinstance(tokenizer, ByteTokenizer) else len(tokenizer.decode(ids.tolist()).encode())
    loss = total / n_tok
    return {"loss": loss, "bpb": total / math.log(2) / max(n_bytes, 1), "ppl": math.exp(min(loss, 700.0)),
            "tokens": n_tok, "bytes": n_bytes}


class _Exported:
    """An export directory scored like a model: (x [B, T], state) -> (logits [B, T, vocab] tensor, state)."""

    def __init__(self, path: str):
        from gla.export import load_exported
        self.m = load_exported(path)

    def eval(self):
        return self

    def __call__(self, x, state=None):
        logits, state = self.m.forward(x.numpy(), state if state is not None else self.m.new_state(x.shape[0]),
                                       all_logits=True)
        return torch.from_numpy(logits), state


def load_scorer(ckpt: str, device: str):
    """(model, torch device): a checkpoint's model on ``device`` ("auto": the GPU if there is one), or an export
    directory's graph, which runs on the CPU (ONNX Runtime)."""
    from gla.device import resolve_device
    from gla.export import export_meta
    if export_meta(ckpt) is not None:
        if device not in ("auto", "cpu"):
            raise ValueError(f"{ckpt} is an export directory: it runs on the CPU (ONNX Runtime), not {device}")
        return _Exported(ckpt), torch.device("cpu")
    from gla.models import from_pretrained
    dev = resolve_device(device)
    return from_pretrained(ckpt).to(dev), dev


def evaluate(ckpt: str, data: str, seq_len: int | None = None, split: str = "all", val_fraction: float = 0.1,
             device: str = "auto") -> dict:
    """Load a checkpoint / run directory (or a `gla export` directory) and score `data` (any source
    gla.data.load_documents accepts); split "val" / "train" uses the same deterministic split as training."""
    from gla.data import encode_documents, load_documents, split_stream, tokenizer_for
    if split not in ("all", "train", "val"):
        raise ValueError(f"--split must be all, train or val, got {split!r}")
    model, dev = load_scorer(ckpt, device)
    tokenizer = tokenizer_for(ckpt)
    stream = encode_documents(load_documents(data), tokenizer)
    if split != "all":
        stream = split_stream(stream, val_fraction)[0 if split == "train" else 1]
    t0 = time.perf_counter()
    out = perplexity(model, stream, tokenizer, seq_len, device=dev)
    return {**out, "seq_len": seq_len, "split": split, "data": data, "ckpt": ckpt,
            "time_s": round(time.perf_counter() - t0, 2)}
