"""Tokenizers: UTF-8 bytes (the default: nothing to download) and Hugging Face `tokenizers` files (tokenizer.json).

Both map str -> list[int] and back. A run directory records which one it used (`spec()`), so `gla generate` and
`gla eval ppl` decode with the tokenizer the model was trained with.
"""
from __future__ import annotations

import os
import shutil


class ByteTokenizer:
    """One token per UTF-8 byte (vocab 256): character-level on ASCII text, lossless on any text."""

    vocab_size = 256
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        # A sampled byte sequence may cut a multi-byte character: show a replacement char instead of failing.
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, out_dir: str) -> str:
        return "bytes"


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer loaded from a tokenizer.json file (or a directory that holds one)."""

    name = "hf"

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError("tokenizer.json files need the `tokenizers` package: pip install 'gla[train]'") from e
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # the Rust library raises its own exception type for malformed files
            raise ValueError(f"could not read tokenizer file {path}: {e}") from None
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, out_dir: str) -> str:
        """Copy tokenizer.json next to the model so the run directory is self-contained."""
        dst = os.path.join(out_dir, "tokenizer.json")
        if os.path.abspath(dst) != os.path.abspath(self.path):
            shutil.copyfile(self.path, dst)
        return "tokenizer.json"


def load_tokenizer(spec: str | None, base_dir: str | None = None):
    """spec: "bytes" (or None) or a path to tokenizer.json / a directory holding one; relative paths resolve
    against base_dir when given (a run directory)."""
    if spec in (None, "", "bytes"):
        return ByteTokenizer()
    path = os.path.join(base_dir, spec) if base_dir and not os.path.isabs(spec) else spec
    return HFTokenizer(path)


def tokenizer_for(model_dir: str):
    """The tokenizer a checkpoint / run directory was trained with: its train_config.json says which; a bare model
    directory with a tokenizer.json uses that; otherwise bytes."""
    import json
    cfg_path = os.path.join(model_dir, "train_config.json")
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path) as f:
                spec = json.load(f).get("tokenizer", "bytes")
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(f"{cfg_path} is not a valid training config") from None
        return load_tokenizer(spec, base_dir=model_dir)
    if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        return HFTokenizer(model_dir)
    return ByteTokenizer()
