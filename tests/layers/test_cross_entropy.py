"""The fused head + cross-entropy against the plain one (logits, then F.cross_entropy), loss and gradients."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

from gla import GLAConfig, GLATransformer
from gla.layers import cross_entropy
from gla.layers.cross_entropy import linear_cross_entropy


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 512 bytes of fp32 logits: the tests' small inputs go through several blocks of the blockwise
    function (with the default 64 MiB every one would fit one block and take the plain head)."""
    monkeypatch.setattr(cross_entropy, "BLOCK_BYTES", 512)


def _plain(h, w, y, ignore_index=-100):
    return F.cross_entropy((h @ w.t()).float().flatten(0, -2), y.flatten(), ignore_index=ignore_index,
                           reduction="sum")


def _grads(fn, h, w, y, scale):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(h, w, y)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("n,d,vocab,block", [(1, 8, 5, None), (63, 60, 101, 7), (1000, 24, 37, 128), (50, 16, 300, 50)])
def test_matches_plain_fp32(n, d, vocab, block):
    g = torch.Generator().manual_seed(n)
    h, w = torch.randn(n, d, generator=g), torch.randn(vocab, d, generator=g) * 0.5
    y = torch.randint(0, vocab, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.2] = -100
    ours = _grads(lambda a, b, c: linear_cross_entropy(a, b, c, block_rows=block), h, w, y, 0.37)
    ref = _grads(_plain, h, w, y, 0.37)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_close_to_plain_autocast():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(2, 45, 32, generator=g), torch.randn(77, 32, generator=g)
    y = torch.randint(0, 77, (2, 45), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _grads(lambda a, b, c: linear_cross_entropy(a, b, c, block_rows=16), h, w, y, 1.0)
        ref = _grads(lambda a, b, c: F.cross_entropy(F.linear(a, b).float().flatten(0, 1), c.flatten(),
                                                     reduction="sum"), h, w, y, 1.0)
    assert ours[1].dtype == h.dtype and ours[2].dtype == w.dtype
    for a, b in zip(ours, ref):  # both round the logits and their gradient to bf16; the block sums differ
        assert (a - b).abs().max() <= 1e-2 * b.abs().max()


def test_all_ignored_gives_zero_loss_and_gradients():
    h, w = torch.randn(9, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.full((9,), -1, dtype=torch.long), ignore_index=-1)
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0


def test_without_grad_and_bad_input():
    h, w, y = torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, y), _plain(h, w, y))
    with pytest.raises(ValueError, match="targets must be"):
        linear_cross_entropy(h, w, y[:3])
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(h, w[:, :7], y)
    with pytest.raises(ValueError, match="torch.long"):
        linear_cross_entropy(h, w, y.int())


@pytest.mark.parametrize("tie", [False, True])
def test_model_targets_path_equals_logits_path(tie):
    cfg = GLAConfig.preset("tiny", tie_embeddings=tie)
    torch.manual_seed(0)
    model = GLATransformer.from_config(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 33))
    y = torch.randint(0, cfg.vocab_size, (2, 33))
    y[1, :4] = -100
    losses, grads = [], []
    for fused in (True, False):
        model.zero_grad()
        if fused:
            loss, _ = model(x, use_cache=False, targets=y)
        else:
            logits, _ = model(x, use_cache=False)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for name, ref in grads[1].items():  # fp32 sums in another order: error relative to the tensor's largest entry
        err = ((grads[0][name] - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-5, (name, err)


def test_no_rows():
    h, w = torch.randn(0, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and h.grad.shape == (0, 8) and w.grad.abs().sum() == 0


DEVICES = ["cpu"] + (["cuda"] if os.environ.get("GLA_TEST_GPU") == "1" and torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_model_gradients_equal_eager(device):
    """The whole model under torch.compile, loss through the fused head (bf16 autocast on CUDA, as training runs
    it): loss and every parameter's gradient equal the eager model's."""
    cfg = GLAConfig.preset("tiny", tie_embeddings=True)
    torch.manual_seed(0)
    eager = GLATransformer.from_config(cfg).to(device)
    compiled = copy.deepcopy(eager)
    x = torch.randint(0, cfg.vocab_size, (2, 64), device=device)
    y = torch.randint(0, cfg.vocab_size, (2, 64), device=device)
    out = []
    for m, fn in ((eager, eager), (compiled, torch.compile(compiled))):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = fn(x, use_cache=False, targets=y)[0]
        loss.backward()
        out.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-3, atol=0)
    for name, g in out[0][1].items():
        assert g.abs().max() > 0, name
        err = (out[1][1][name] - g).abs().max() / g.abs().max()
        assert err < (2e-2 if device == "cuda" else 1e-4), (name, err.item())


def test_frozen_weight_and_no_second_order():
    """A frozen head (weight without grad) still gives h its gradient; through the blockwise function a second
    derivative is refused, not wrong (inputs of one default block take the plain head, which has one)."""
    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(7, 8, generator=g).requires_grad_(), torch.randn(11, 8, generator=g)
    y = torch.randint(0, 11, (7,), generator=g)
    (ours,) = torch.autograd.grad(linear_cross_entropy(h, w, y, block_rows=4), h, create_graph=True)
    (ref,) = torch.autograd.grad(_plain(h, w, y), h)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="does not require grad"):  # no graph to differentiate again
        ours.sum().backward()


def test_one_default_block_takes_the_plain_head(monkeypatch):
    """Rows that fit one default block (64 MiB of fp32 logits) take the plain head and loss: equal loss and
    gradients, and the blockwise function is not called."""
    monkeypatch.setattr(cross_entropy, "BLOCK_BYTES", 1 << 26)
    calls = []
    real = cross_entropy._LinearCrossEntropy.apply
    monkeypatch.setattr(cross_entropy._LinearCrossEntropy, "apply", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(6)
    h, w = torch.randn(40, 12, generator=g), torch.randn(30, 12, generator=g)
    y = torch.randint(0, 30, (40,), generator=g)
    y[:5] = -100
    for a, b in zip(_grads(linear_cross_entropy, h, w, y, 0.5), _grads(_plain, h, w, y, 0.5)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not calls
    linear_cross_entropy(h, w, y, block_rows=64)  # an explicit block size keeps the blockwise function
    assert calls


def test_compiled_with_its_options_equals_eager():
    """The loss as compile_blocks compiles it: the cap on fused buffers is passed (the fp32 sum of 20 blocks' weight
    gradients then spans several kernels), and loss and gradients equal the eager function's."""
    import torch._inductor.config as inductor

    opts = cross_entropy.compile_options({})
    if not hasattr(inductor, "max_fusion_unique_io_buffers"):  # an Inductor without the setting: nothing added
        assert opts == {}
    else:
        assert opts["options"]["max_fusion_unique_io_buffers"] == cross_entropy.FUSED_BUFFERS
        assert cross_entropy.compile_options({"options": {"max_fusion_unique_io_buffers": 4}})["options"] == {
            "max_fusion_unique_io_buffers": 4}
    for kept in ({"mode": "max-autotune"}, {"backend": "aot_eager"}):
        assert cross_entropy.compile_options(kept) == kept
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(200, 16, generator=g), torch.randn(37, 16, generator=g)
    y = torch.randint(0, 37, (200,), generator=g)
    compiled = torch.compile(linear_cross_entropy, **opts)
    ours = _grads(lambda a, b, c: compiled(a, b, c, block_rows=10), h, w, y, 0.5)
    ref = _grads(lambda a, b, c: linear_cross_entropy(a, b, c, block_rows=10), h, w, y, 0.5)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
