"""torch.compile(model, fullgraph=True) on GLA and hybrid models: no graph break, no recompilation from one training
step to the next, and logits and gradients equal to eager's.

CPU in CI (the chunk operator, gla::chunk_fwd); ``GLA_TEST_GPU=1`` runs the same on CUDA (the Triton operators,
gla::chunk_fwd_triton, traced by Inductor into the graph).
"""
import copy
import os

import pytest
import torch

from gla import GLATransformer
from tests.utils import rel_err

GPU = os.environ.get("GLA_TEST_GPU") == "1"
DEVICE = "cuda" if GPU else "cpu"
if GPU and not torch.cuda.is_available():
    pytest.skip("GLA_TEST_GPU=1 needs a CUDA device", allow_module_level=True)
KINDS = {"gla": {}, "hybrid": {"attn_layers": (1,)}}


def _step(m, opt, ids, cu_seqlens=None):
    logits, _ = m(ids, cu_seqlens=cu_seqlens)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.roll(-1, 1).flatten())
    loss.backward()
    grads = [p.grad.clone() for p in m.parameters()]
    opt.step()
    opt.zero_grad()
    return logits.detach(), grads


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_compiled_training_steps_equal_eager(kind, packed, monkeypatch):
    """Lengths differ between the cases, so after the first one Dynamo traces T as a symbol (dynamic shapes). The
    operator's one-time check of the installed Triton is forgotten first, so that the first trace runs it (torch
    2.11 broke the graph there)."""
    import gla.ops
    monkeypatch.setattr(gla.ops, "_TRITON_STATUS", [])
    torch.manual_seed(0)
    eager = GLATransformer(101, 64, 2, 128, 3, dropout=0.0, **KINDS[kind]).to(DEVICE)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled_model)]
    B, T = (1, 150) if packed else (2, 75)
    cu = torch.tensor([0, 40, 41, 150], device=DEVICE) if packed else None
    for step in range(3):
        ids = torch.randint(0, 101, (B, T), device=DEVICE)
        if step == 0:
            out, grads = _step(compiled, opts[1], ids, cu)
        else:  # later steps reuse the first step's graphs
            with torch.compiler.set_stance("fail_on_recompile"):
                out, grads = _step(compiled, opts[1], ids, cu)
        ref, ref_grads = _step(eager, opts[0], ids, cu)
        assert rel_err(out, ref) < 1e-5, f"step {step}: logits differ from eager"
        errs = [rel_err(a, b) for a, b in zip(grads, ref_grads)]
        assert max(errs) < 1e-4, f"step {step}: gradients differ from eager ({max(errs):.2e})"
