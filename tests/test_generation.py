"""Generation: greedy == argmax of full forwards, ragged batches, eos, streaming, constant GLA state."""
import pytest
import torch

import gla
from gla import GLATransformer
from gla.generation import sample_next


def model(**kw):
    torch.manual_seed(0)
    return GLATransformer(64, 32, 2, 64, 2, dropout=0.0, **kw).eval()


@pytest.mark.parametrize("kw", [{}, {"attn_layers": (1,)}])
def test_greedy_equals_argmax_of_full_forwards(kw):
    m = model(**kw)
    ids = torch.randint(0, 64, (2, 7))
    out = gla.generate(m, ids, 12, temperature=0, prefill_chunk=3)
    seq = ids
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, m(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("kw", [{}, {"attn_layers": (0,)}])
def test_ragged_prompts_equal_one_by_one(kw):
    m = model(**kw)
    prompts = [[5, 9, 2], [7, 1, 1, 3, 8, 2, 4], [11]]
    out = gla.generate(m, prompts, 6, temperature=0)
    for i, p in enumerate(prompts):
        alone = gla.generate(m, torch.tensor([p]), 6, temperature=0)
        assert torch.equal(out[i, -6:], alone[0, -6:])


def test_eos_stops_rows_and_stream_matches_generate():
    m = model()
    ids = torch.randint(0, 64, (3, 4))
    free = gla.generate(m, ids, 10, temperature=0)
    eos = int(free[0, 6])  # the token row 0 produces third
    out = gla.generate(m, ids, 10, temperature=0, eos_token_id=eos)
    row = out[0, 4:]
    first = int((row == eos).nonzero()[0])
    assert torch.all(row[first:] == eos)
    got = []
    streamed = list(gla.stream(m, ids, 10, temperature=0, eos_token_id=eos))
    gla.generate(m, ids, 10, temperature=0, eos_token_id=eos, callback=got.append)
    assert torch.equal(torch.stack(streamed, 1), out[:, 4:]) and len(got) == len(streamed)


def test_sampling_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert all(int(sample_next(logits, 1.0, top_k=1, generator=g)) == 1 for _ in range(20))
    assert all(int(sample_next(logits, 1.0, top_p=0.01, generator=g)) == 1 for _ in range(20))
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {1, 2}
    with pytest.raises(ValueError):
        sample_next(logits, -1.0)
    with pytest.raises(ValueError):
        sample_next(logits, 1.0, top_p=0.0)


def test_gla_state_does_not_grow_with_context():
    m = model()

    def state_bytes(n):
        _, s = m(torch.randint(0, 64, (1, n)))
        return sum(x.numel() * x.element_size() for layer in s.layers for x in (layer.recurrent,))

    assert state_bytes(10) == state_bytes(500)
    _, s = m(torch.randint(0, 64, (1, 10)))
    assert s.key_mask is None
