"""The GLA layer: chunk == recurrent, pieces with state == whole, padding and packing leave states clean."""
import pytest
import torch

from gla import GatedLinearAttention, GLALayer, SoftmaxAttention
from gla.layers.packing import packed_info
from tests.utils import rel_err

OPTIONS = [
    {},
    {"feature_map": "elu1", "output_gate": "sigmoid"},  # the seed's variant
    {"norm": "layer", "feature_map": "silu"},
    {"num_kv_heads": 1},
    {"use_short_conv": True, "conv_size": 3},
    {"clamp_min": -0.05, "output_gate": None, "feature_map": "relu"},
]


def layer(seed=0, **opts):
    torch.manual_seed(seed)
    return GatedLinearAttention(48, 4, expand_k=1.0, **opts)


@pytest.mark.parametrize("opts", OPTIONS)
def test_chunk_equals_recurrent(opts):
    x = torch.randn(2, 70, 48)
    ys, grads = [], []
    for backend in ("chunk", "recurrent"):
        m = layer(**opts, backend=backend)
        y, s = m(x)
        (y.square().sum() + s.recurrent.sum()).backward()
        ys.append((y, s.recurrent))
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert rel_err(ys[0][0], ys[1][0]) < 1e-5 and rel_err(ys[0][1], ys[1][1]) < 1e-5
    for n in grads[1]:
        assert rel_err(grads[0][n], grads[1][n]) < 1e-4, n


@pytest.mark.parametrize("opts", OPTIONS)
def test_pieces_with_state_equal_whole(opts):
    m = layer(**opts)
    x = torch.randn(2, 40, 48)
    y, s = m(x)
    y1, s1 = m(x[:, :17])
    y2, s2 = m(x[:, 17:18], s1)  # a single decode step in between
    y3, s3 = m(x[:, 18:], s2)
    assert rel_err(torch.cat([y1, y2, y3], 1), y) < 1e-5
    assert rel_err(s3.recurrent, s.recurrent) < 1e-5


@pytest.mark.parametrize("opts", OPTIONS)
def test_left_padding_is_invisible(opts):
    m = layer(**opts)
    x = torch.randn(2, 30, 48)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :11] = 0
    y, s = m(x, attention_mask=mask)
    y_short, s_short = m(x[1:, 11:])
    assert rel_err(y[1, 11:], y_short[0]) < 1e-5
    assert rel_err(s.recurrent[1], s_short.recurrent[0]) < 1e-5


@pytest.mark.parametrize("from_model", [True, False], ids=["seq_info", "alone"])
@pytest.mark.parametrize("opts", OPTIONS)
def test_packed_documents_equal_separate(opts, from_model):
    """Called by the model (which passes seq_info) or on its own (the layer derives it): no document sees another,
    the short convolution included."""
    m = layer(**opts)
    lens = [9, 0, 30, 1]
    x = torch.randn(1, sum(lens), 48)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)))
    info = packed_info(cu, x.shape[1], x.device)[:2] if from_model else None
    y, s = m(x, cu_seqlens=cu, seq_info=info)
    assert s.recurrent.shape[0] == len(lens)
    for n, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        if b == a:
            assert torch.all(s.recurrent[n] == 0)
            continue
        y_n, s_n = m(x[:, a:b])
        assert rel_err(y[:, a:b], y_n) < 1e-5
        assert rel_err(s.recurrent[n], s_n.recurrent[0]) < 1e-5
        if s.conv is not None:
            assert all(rel_err(c[n], c_n[0]) < 1e-6 for c, c_n in zip(s.conv, s_n.conv))


def test_options_are_validated():
    with pytest.raises(ValueError, match="feature_map"):
        GatedLinearAttention(32, 4, feature_map="tanh")
    with pytest.raises(ValueError, match="output_gate"):
        GatedLinearAttention(32, 4, output_gate="relu")
    with pytest.raises(ValueError, match="clamp_min"):
        GatedLinearAttention(32, 4, clamp_min=0.5)
    with pytest.raises(ValueError, match="divide"):
        GatedLinearAttention(30, 4)
    with pytest.raises(ValueError, match="mixer"):
        GLALayer(32, 4, 64, mixer="mamba")


def test_gate_decays_the_state_not_the_output():
    # With a forget gate of ~0 (strong decay) the past must vanish from the state: o_t depends on token t only.
    m = layer(gate_logit_normalizer=1e-3)
    x = torch.randn(1, 6, 48)
    y, _ = m(x)
    y_last, _ = m(x[:, -1:])
    assert rel_err(y[:, -1:], y_last) < 1e-4


def test_softmax_pieces_with_cache_equal_whole():
    torch.manual_seed(0)
    m = SoftmaxAttention(32, 4, num_kv_heads=2)
    x = torch.randn(2, 25, 32)
    pos = torch.arange(25).expand(2, 25)
    y, c = m(x, positions=pos)
    y1, c1 = m(x[:, :10], positions=pos[:, :10])
    y2, c2 = m(x[:, 10:], c1, positions=pos[:, 10:])
    assert rel_err(torch.cat([y1, y2], 1), y) < 1e-5
    assert c2.k.shape == (2, 2, 25, 8)
