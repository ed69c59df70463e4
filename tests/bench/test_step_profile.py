"""gla bench step-profile: what a decode step must move, and the per-step summary of profiled kernels."""
import pytest
import torch

from gla.bench.step_profile import main, step_bytes, summarize
from gla.decoding import StaticDecoder
from gla.models import GLATransformer


@pytest.mark.parametrize("tied", [False, True])
def test_step_bytes_counts_weights_rows_and_states(tied):
    torch.manual_seed(0)
    m = GLATransformer(300, 32, 2, 64, 2, dropout=0.0, tie_embeddings=tied).eval()
    ids = torch.randint(0, 300, (3, 5))
    with torch.no_grad():
        _, state = m(ids)
    dec = StaticDecoder(m, state, capture=False)
    emb = 300 * 32 * 4
    layers = sum(p.numel() * 4 for n, p in m.named_parameters() if not n.startswith(("embeddings", "lm_head")))
    head = emb if tied else sum(p.numel() * 4 for n, p in m.named_parameters() if n.startswith("lm_head"))
    states = 2 * sum(layer.recurrent.numel() * 4 for layer in dec.state.layers)  # read and written
    seen = dec.state.seen.numel() * 8
    assert step_bytes(m, dec) == layers + head + 3 * 32 * 4 + states + seen


def test_summary_of_two_steps():
    events = [("gemv", 0.0, 4.0), ("decode", 5.0, 7.0), ("gemv", 7.5, 9.5),  # step 1: gaps 1.0, 0.5
              ("gemv", 100.0, 104.0), ("decode", 104.5, 106.5), ("gemv", 107.5, 109.5)]  # step 2: 0.5, 1.0
    r = summarize(events, 2)
    assert r["kernels"] == 3
    assert r["busy_ms"] == pytest.approx(8e-3)
    assert r["gap_us"] == pytest.approx(0.75)  # the 90.5 us between the steps left out
    assert r["top"][0] == ("gemv", 2.0, 6.0) and r["top"][1] == ("decode", 1.0, 2.0)


def test_needs_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["--batch", "1"])
