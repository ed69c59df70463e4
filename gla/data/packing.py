"""Packing: documents -> one token stream with document starts kept, a deterministic train/validation split, random
training windows (nanoGPT style) and sequential evaluation windows.

Windows never let information cross a document boundary: a window that spans one is cut into segments described by
`cu_seqlens` (the recurrent state resets at each), and the target that would predict a document's first token from
the previous document is ignored (IGNORE_INDEX).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # the target of a position no loss is taken at; also Hugging Face's label convention


@dataclass
class TokenStream:
    """tokens: [L] int64, documents concatenated; doc_starts: [D] int64 sorted offsets of document starts (0 first)."""

    tokens: torch.Tensor
    doc_starts: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.numel()

    def segments(self) -> list[tuple[int, int]]:
        """[(start, end)] of each document piece in the stream, in order."""
        bounds = self.doc_starts.tolist() + [len(self)]
        return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def encode_documents(docs: list[str], tokenizer) -> TokenStream:
    """Tokenize each document and concatenate, remembering where each one starts."""
    if not docs:
        raise ValueError("no documents to encode")
    pieces, starts, n = [], [], 0
    for doc in docs:
        if not doc:  # (frombuffer refuses an empty buffer)
            continue
        ids = torch.frombuffer(bytearray(doc.encode("utf-8")), dtype=torch.uint8).long() \
            if getattr(tokenizer, "name", "") == "bytes" else torch.tensor(tokenizer.encode(doc), dtype=torch.long)
        if ids.numel() == 0:
            continue
        starts.append(n)
        pieces.append(ids)
        n += ids.numel()
    if n == 0:
        raise ValueError("the data holds no text (empty file or documents)")
    return TokenStream(torch.cat(pieces), torch.tensor(starts, dtype=torch.long))


def split_stream(stream: TokenStream, val_fraction: float = 0.1) -> tuple[TokenStream, TokenStream]:
    """Deterministic split: the last `val_fraction` of the tokens is validation (nanoGPT's convention), the rest
    training. A document cut by the split point continues as a new document in the validation stream."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(stream) * (1.0 - val_fraction))
    if cut < 2 or len(stream) - cut < 2:
        raise ValueError(f"the data ({len(stream)} tokens) is too small to split into train and validation")
    s = stream.doc_starts
    train = TokenStream(stream.tokens[:cut], s[s < cut])
    val_starts = torch.cat([torch.zeros(1, dtype=torch.long), s[s > cut] - cut])
    return train, TokenStream(stream.tokens[cut:], val_starts)


def sample_offsets(stream: TokenStream, seq_len: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """[n] random window starts; each window holds seq_len + 1 tokens (inputs and shifted targets)."""
    hi = len(stream) - seq_len - 1
    if hi < 1:
        raise ValueError(f"the training data ({len(stream)} tokens) is shorter than --seq-len {seq_len} + 1")
    return torch.randint(0, hi, (n,), generator=generator)


def make_batch(stream: TokenStream, offsets: torch.Tensor, seq_len: int) -> dict:
    """Windows starting at `offsets` -> {"input_ids", "targets", "cu_seqlens"}.

    Without a document boundary inside any window: input_ids, targets [B, T] and cu_seqlens None. Otherwise the
    windows are flattened to [1, B*T] with cu_seqlens [N+1] marking every window and document start.
    """
    idx = offsets[:, None] + torch.arange(seq_len + 1)            # [B, T+1]
    win = stream.tokens[idx]
    x, y = win[:, :-1], win[:, 1:].clone()
    new_doc = torch.isin(idx[:, 1:], stream.doc_starts)           # [B, T]: target t+1 begins a document
    y[new_doc] = IGNORE_INDEX
    if not bool(new_doc[:, :-1].any()):                           # a start at the last target needs no cut
        return {"input_ids": x, "targets": y, "cu_seqlens": None}
    B = x.shape[0]
    cuts = new_doc[:, :-1].nonzero()                              # (row, t): inputs from t+1 on are a new document
    bounds = sorted({b * seq_len for b in range(B + 1)} | {int(r) * seq_len + int(t) + 1 for r, t in cuts.tolist()})
    return {"input_ids": x.reshape(1, -1), "targets": y.reshape(1, -1),
            "cu_seqlens": torch.tensor(bounds, dtype=torch.int32)}


def eval_windows(stream: TokenStream, seq_len: int | None, stream_window: int = 2048):
    """Yield (input_ids [1, n], targets [1, n], new_doc) covering every document of the stream in order:
    non-overlapping windows of at most seq_len inputs, the state reset at each window (seq_len given) or windows
    of stream_window inputs with the state reset only at document starts (seq_len None: new_doc says when to
    reset; the caller carries the state otherwise)."""
    for a, b in stream.segments():
        if b - a < 2:
            continue
        x, y = stream.tokens[a:b - 1], stream.tokens[a + 1:b]
        step = seq_len or stream_window
        for i in range(0, x.numel(), step):
            yield x[None, i:i + step], y[None, i:i + step], i == 0 or seq_len is not None
