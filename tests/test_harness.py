"""lm-eval adapter: a local text file as a rolling-loglikelihood task gives our own bits per byte."""
import math

import torch
import torch.nn.functional as F

import gla
from gla.eval.harness import evaluate, hf_tokenizer


def test_byte_tokenizer_matches_gla_bytes(tmp_path):
    gla.GLATransformer(256, 16, 2, 32, 1).save_pretrained(str(tmp_path))
    tok = hf_tokenizer(str(tmp_path))
    text = "Hello, wörld!\n\tÆ ~ \x00 ok"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(list(text.encode("utf-8"))) == text


def test_local_text_task_equals_direct_bits_per_byte(tmp_path):
    torch.manual_seed(0)
    m = gla.GLATransformer(256, 32, 2, 64, 2, dropout=0.0).eval()
    m.save_pretrained(str(tmp_path))
    paragraphs = ["First paragraph.\nIts second line.", "Another one, with more words in it.\n"]
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(paragraphs))
    res = evaluate(str(tmp_path), text=str(text))
    (name, metrics), = res.items()
    nll = n_bytes = 0
    with torch.no_grad():
        for p in paragraphs:  # each document is conditioned on a newline prefix token
            ids = torch.tensor([[10] + list(p.encode())])
            logits, _ = m(ids[:, :-1])
            nll += F.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
            n_bytes += len(p.encode())
    assert math.isclose(metrics["bits_per_byte,none"], nll / n_bytes / math.log(2), rel_tol=1e-5)
