"""gla.layers.gemv: few-row linear layers as a batched product over the weight's row blocks where that measures
faster, equal to F.linear."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gla.layers.gemv as gemv
from gla.layers.gemv import MIN_WEIGHT, ROWS_MAX, _blocks, gemv_linears, linear


@pytest.fixture
def two_threads(monkeypatch):
    """Two threads, and the batched route taken wherever it applies, whatever this CPU measured (the route is what
    these tests check; which one a CPU takes is test_route_follows_the_measurement's)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(gemv, "_batched_faster", lambda n: n >= 2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(1, 1024), (2, 1, 1024), (ROWS_MAX, 1024), (3, 1, 1024)])
@pytest.mark.parametrize("bias", [False, True])
def test_batched_route_equals_f_linear(shape, bias, two_threads):
    g = torch.Generator().manual_seed(len(shape) + shape[0])
    w = torch.randn(MIN_WEIGHT // 1024 + 6, 1024, generator=g)  # 1030 rows: even, over the size threshold
    b = torch.randn(w.shape[0], generator=g) if bias else None
    x = torch.randn(*shape, generator=g)
    assert _blocks(x, w) == 2
    y = linear(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.shape == ref.shape and y.dtype == torch.float32 and y.is_contiguous()  # F.linear's layout
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


class _Subclass(torch.Tensor):
    """Stands for a quantised weight's tensor subclass (torchao's), which only F.linear knows how to multiply."""


@pytest.mark.parametrize("case", ["rows", "small", "odd_rows", "bf16", "strided", "one_thread", "subclass"])
def test_other_inputs_are_plain_f_linear(case, two_threads):
    w, x = torch.randn(1030, 1024), torch.randn(1, 1024)
    if case == "subclass":
        w = nn.Parameter(w.as_subclass(_Subclass), requires_grad=False)
    elif case == "rows":
        x = torch.randn(ROWS_MAX + 1, 1024)
    elif case == "small":
        w = torch.randn(256, 128)
        x = torch.randn(1, 128)
    elif case == "odd_rows":
        w = torch.randn(1031, 1024)
    elif case == "bf16":
        w, x = w.bfloat16(), x.bfloat16()
    elif case == "strided":
        w = torch.randn(1024, 1030).t()
    else:
        torch.set_num_threads(1)
    assert _blocks(x, w) == 0
    assert torch.equal(linear(x, w).as_subclass(torch.Tensor), F.linear(x, w).as_subclass(torch.Tensor))


def test_context_patches_plain_linears_and_restores_them(two_threads):
    class Scaled(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(1024, 1030), nn.ReLU(), Scaled(1030, 1024), nn.Linear(1024, 1030))
    own = model[3]
    own.forward = lambda x: x  # an instance that already has its own forward keeps it
    x = torch.randn(1, 1024)
    with torch.no_grad():
        want = model[0](x)
        with gemv_linears(model):
            assert "forward" in model[0].__dict__ and "forward" not in model[2].__dict__
            torch.testing.assert_close(model[0](x), want, rtol=1e-5, atol=1e-4)
            assert model[3](x) is x
    assert "forward" not in model[0].__dict__ and model[3].forward(x) is x


def test_route_follows_the_measurement(monkeypatch):
    """The batched route only where this process measured it faster than F.linear (once per thread count), never
    with one thread; either way the result equals F.linear's."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        measured = gemv._batched_faster(2)
        assert isinstance(measured, bool) and gemv._batched_faster(2) is measured and not gemv._batched_faster(1)
        w, x = torch.randn(1030, 1024), torch.randn(1, 1024)
        assert _blocks(x, w) == (2 if measured else 0)
        monkeypatch.setattr(gemv, "_batched_faster", lambda n: False)
        assert _blocks(x, w) == 0
        torch.testing.assert_close(linear(x, w), F.linear(x, w))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("batched_s,plain_s,faster", [(0.5, 1.0, True), (0.95, 1.0, False), (2.0, 1.0, False)])
def test_batched_route_must_win_by_ten_percent(monkeypatch, batched_s, plain_s, faster):
    """The decision itself, from given timings (the batched route is timed first): taken only where it beats
    F.linear by 10%, so a near tie keeps F.linear's exact GEMV."""
    timings = iter([batched_s, plain_s])
    monkeypatch.setattr(gemv, "best_time", lambda fn, reps=5: next(timings))
    gemv._batched_faster.cache_clear()
    try:
        assert gemv._batched_faster(2) is faster
    finally:
        gemv._batched_faster.cache_clear()
