"""Tokenizers, corpora, packing with document boundaries, the train/validation split."""
import json
import os

import pytest
import torch

from gla.data import (CORPUS_LICENSE, IGNORE_INDEX, ByteTokenizer, HFTokenizer, encode_documents, eval_windows,
                      load_documents, load_tokenizer, make_batch, sample_offsets, split_stream, tokenizer_for)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "To be, or not to be — ça\n"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode()) and max(ids) < tok.vocab_size == 256
    assert tok.decode(ids) == text
    assert tok.decode(ids[:-3]).endswith("\ufffd")  # a cut multi-byte character decodes without an error


def _hf_tokenizer_file(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["the king is dead, long live the king"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.decoder = __import__("tokenizers").decoders.ByteLevel()
    tok.save(str(path))
    return path


def test_hf_tokenizer_file(tmp_path):
    path = _hf_tokenizer_file(tmp_path / "tokenizer.json")
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    ids = tok.encode("the king is dead")
    assert len(ids) < len("the king is dead") and tok.decode(ids) == "the king is dead"
    assert load_tokenizer(str(tmp_path)).vocab_size == tok.vocab_size   # a folder holding tokenizer.json
    run = tmp_path / "run"
    run.mkdir()
    assert tok.save(str(run)) == "tokenizer.json"
    (run / "train_config.json").write_text(json.dumps({"tokenizer": "tokenizer.json"}))
    assert tokenizer_for(str(run)).encode("the king") == tok.encode("the king")


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="could not read tokenizer"):
        load_tokenizer(str(bad))
    assert isinstance(tokenizer_for(str(tmp_path)), ByteTokenizer)


def test_default_corpus_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("GLA_CACHE_DIR", str(tmp_path))
    docs = load_documents()
    assert len(docs) == 38 and sum(map(len, docs)) > 4_000_000
    assert "public domain" in CORPUS_LICENSE
    cached = [f for f in os.listdir(tmp_path) if f.startswith("shakespeare")]
    assert len(cached) == 1
    assert load_documents("shakespeare") == docs
    hamlet = next(d for d in docs if d.startswith("Hamlet"))
    assert "HAMLET:\nTo be, or not to be" in hamlet and "**" not in hamlet


def test_local_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text('{"text": "second"}\n\n{"text": "third", "id": 3}\n')
    (tmp_path / "ignored.bin").write_bytes(b"\x00")
    assert load_documents(str(tmp_path / "a.txt")) == ["first document"]
    assert load_documents(str(tmp_path / "b.jsonl")) == ["second", "third"]
    assert load_documents(str(tmp_path)) == ["first document", "second", "third"]


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data not found"):
        load_documents(str(tmp_path / "nope.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a string field 'text'"):
        load_documents(str(tmp_path / "bad.jsonl"))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_documents(str(tmp_path / "latin1.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no"):
        load_documents(str(empty))


def test_hf_source_offline_error():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            load_documents("hf:tiny_shakespeare")
        return
    # offline, in a fresh process: the hub libraries read these variables when first imported
    import subprocess
    import sys
    code = "from gla.data import load_documents; load_documents('hf:no-such-user/no-such-dataset')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "without network access" in r.stderr


def _stream():
    docs = ["abcdefghij", "klmnop", "qrstuvwxyz0123"]  # starts at 0, 10, 16; 30 tokens
    return encode_documents(docs, ByteTokenizer())


def test_split_is_deterministic_and_keeps_boundaries():
    s = _stream()
    assert s.doc_starts.tolist() == [0, 10, 16]
    train, val = split_stream(s, 0.2)   # cut at 24: the last 20%
    assert len(train) == 24 and len(val) == 6
    assert train.doc_starts.tolist() == [0, 10, 16] and val.doc_starts.tolist() == [0]
    assert bytes(val.tokens.tolist()) == b"yz0123"
    with pytest.raises(ValueError, match="too small"):
        split_stream(encode_documents(["ab"], ByteTokenizer()), 0.1)


def test_make_batch_without_boundary_is_dense():
    s = _stream()
    b = make_batch(s, torch.tensor([0, 17]), 5)
    assert b["cu_seqlens"] is None and b["input_ids"].shape == (2, 5)
    assert bytes(b["input_ids"][0].tolist()) == b"abcde" and bytes(b["targets"][1].tolist()) == b"stuvw"


def test_make_batch_cuts_at_document_starts():
    s = _stream()
    b = make_batch(s, torch.tensor([7, 0]), 6)   # window 0: "hij|klm" + target "n"; window 1 inside doc 0
    x, y, cu = b["input_ids"][0], b["targets"][0], b["cu_seqlens"]
    assert x.shape == (12,) and cu.tolist() == [0, 3, 6, 12]
    assert bytes(x[:6].tolist()) == b"hijklm"
    assert y[2] == IGNORE_INDEX and bytes(y[3:6].tolist()) == b"lmn"   # "j" must not predict "k" across the cut
    assert (y != IGNORE_INDEX).sum() == 11
    # a document starting at the very last target needs no cut: that target is ignored instead
    b = make_batch(s, torch.tensor([4]), 6)
    assert b["cu_seqlens"] is None and b["targets"][0, -1] == IGNORE_INDEX


def test_sample_offsets_reproducible():
    s = _stream()
    a = sample_offsets(s, 8, 5, torch.Generator().manual_seed(0))
    b = sample_offsets(s, 8, 5, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and int(a.max()) <= len(s) - 9
    with pytest.raises(ValueError, match="shorter than --seq-len"):
        sample_offsets(s, 64, 1, torch.Generator())


def test_eval_windows_cover_each_document():
    s = _stream()
    wins = list(eval_windows(s, 4))
    assert sum(y.numel() for _, y, _ in wins) == 30 - 3   # every token but each document's first
    assert all(new for *_, new in wins)
    streamed = list(eval_windows(s, None, stream_window=4))
    assert [new for *_, new in streamed] == [True, False, False, True, False, True, False, False, False]
