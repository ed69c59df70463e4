"""The few-row linear kernel (gla.ops.triton.gemv) against float64 F.linear: under the Triton CPU interpreter in CI,
compiled on CUDA with GLA_TEST_GPU=1 (at gla-340m's decoding shapes as well)."""
from __future__ import annotations

import os

import pytest

GPU = os.environ.get("GLA_TEST_GPU") == "1"
if not GPU:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gla.ops.triton.gemv import MAX_ROWS, _launch, config, triton_gemv  # noqa: E402
from tests.utils import rel_err  # noqa: E402

DEVICE = "cuda" if GPU else "cpu"
if GPU and not torch.cuda.is_available():
    pytest.skip("GLA_TEST_GPU=1 needs a CUDA device", allow_module_level=True)
# fp32: products in full precision; bf16: operands as stored, the output rounded to bf16 (8 significant bits)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
SHAPES = [(1, 37, 100), (5, 130, 60), (16, 1, 513), (1, 1, 1)] + ([(1, 3088, 1024), (16, 5632, 1024),
                                                                   (1, 1024, 2816)] if GPU else [])


def _ref(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_linear(M, N, K, dtype, bias):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    w = torch.randn(N, K, generator=g).to(DEVICE, dtype)
    b = torch.randn(N, generator=g).to(DEVICE, dtype) if bias else None
    y = triton_gemv(x, w, b)
    assert y.shape == (M, N) and y.dtype == dtype
    assert rel_err(y, _ref(x, w, b)) < TOL[dtype]


@pytest.mark.parametrize("cfg", [(1, 4, 32, 4), (1, 32, 64, 2), (16, 16, 32, 4), (16, 64, 16, 2)])
def test_every_tiling_covers_the_matrix(cfg):
    """Several K steps, a last N block and a last K step that are partly masked, for both paths."""
    M = 1 if cfg[0] == 1 else 7
    x, w = torch.randn(M, 100, device=DEVICE), torch.randn(45, 100, device=DEVICE)
    y = torch.full((M, 45), float("nan"), device=DEVICE)
    _launch(x, w, None, y, cfg)
    assert rel_err(y, _ref(x, w, None)) < TOL[torch.float32]


def test_reads_rows_in_place_and_keeps_leading_dims():
    """x may be a column slice of a wider tensor (a fused projection's output) and [B, 1, K] shaped."""
    wide = torch.randn(3, 1, 250, device=DEVICE)
    x = wide[..., 50:150]
    w = torch.randn(20, 100, device=DEVICE)
    y = triton_gemv(x, w)
    assert y.shape == (3, 1, 20)
    assert rel_err(y, _ref(x, w, None)) < TOL[torch.float32]


def test_config_keeps_programs_per_sm():
    assert config(1, 1024, 1024, sms=132)[1] == 4  # 256 programs
    assert config(1, 32000, 1024, sms=132)[1] == 32  # capped
    assert config(16, 1024, 1024, sms=132)[:2] == (16, 16)


def test_bad_shapes_are_refused():
    w = torch.randn(8, 10, device=DEVICE)
    with pytest.raises(ValueError, match="at most"):
        triton_gemv(torch.randn(MAX_ROWS + 1, 10, device=DEVICE), w)
    with pytest.raises(ValueError, match="weight"):
        triton_gemv(torch.randn(2, 11, device=DEVICE), w)
