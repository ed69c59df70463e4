"""Perplexity: windows against a direct computation, the streamed state against one long forward, bits per byte."""
import math

import pytest
import torch
import torch.nn.functional as F

from gla import GLAConfig, GLATransformer
from gla.data import ByteTokenizer, encode_documents
from gla.eval import perplexity


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GLATransformer.from_config(GLAConfig.preset("tiny", n_layers=2)).eval()


def _direct(model, ids):
    with torch.no_grad():
        logits, _ = model(ids[None, :-1])
    return F.cross_entropy(logits[0], ids[1:], reduction="sum").item()


def test_windows_match_direct_computation(model):
    docs = ["Now is the winter of our discontent made glorious summer", "by this sun of York."]
    stream = encode_documents(docs, ByteTokenizer())
    res = perplexity(model, stream, ByteTokenizer(), seq_len=16)
    total, n = 0.0, 0
    for doc in docs:
        ids = torch.tensor(list(doc.encode()))
        for i in range(0, len(ids) - 1, 16):  # windows of 16 inputs, each from a fresh state
            total += _direct(model, ids[i:i + 17])
            n += min(16, len(ids) - 1 - i)
    assert res["tokens"] == n == sum(len(d) - 1 for d in docs)
    assert res["loss"] == pytest.approx(total / n, rel=1e-5)
    assert res["bpb"] == pytest.approx(res["loss"] / math.log(2), rel=1e-9)   # one byte per token
    assert res["ppl"] == pytest.approx(math.exp(res["loss"]))


def test_streamed_state_equals_one_long_forward(model):
    text = "O Romeo, Romeo! wherefore art thou Romeo? Deny thy father and refuse thy name. " * 3
    stream = encode_documents([text], ByteTokenizer())
    streamed = perplexity(model, stream, ByteTokenizer(), seq_len=None, stream_window=32)
    whole = _direct(model, stream.tokens) / (len(stream) - 1)
    assert streamed["loss"] == pytest.approx(whole, rel=1e-4)
    assert perplexity(model, stream, ByteTokenizer(), seq_len=8)["loss"] != pytest.approx(whole, rel=1e-4)


def test_bad_seq_len(model):
    with pytest.raises(ValueError, match="--seq-len"):
        perplexity(model, encode_documents(["abc"], ByteTokenizer()), ByteTokenizer(), seq_len=0)
