"""Shared test helpers: the one tolerance measure and GLA input generation."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ||x - ref|| / ||ref|| in float64 (0 when both are zero).

    ||ref|| is floored at x's smallest normal number: a reference below it (e.g. a gradient through exp(-105) =
    1e-46, which float32 flushes to 0) cannot be met to any relative precision in x's dtype, only in absolute terms.
    """
    tiny = torch.finfo(x.dtype).tiny if x.dtype.is_floating_point else 0.0
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    denom = max(ref.norm().item(), tiny)
    diff = (x - ref).norm().item()
    return diff / denom if denom > 0 else diff


def gla_inputs(B, T, H, K, V, *, dtype=torch.float32, normalizer=16.0, seed=0, device="cpu",
               requires_grad=True, state=False, N=None, g_dtype=None):
    """Random GLA inputs: q, k, v ~ randn, g = logsigmoid(randn) / normalizer (normalizer 0.1 = strong gates).
    g_dtype: g's dtype if not ``dtype`` (the GLA layer keeps its gate float32 under bf16 autocast).

    Returns q, k, v, g ([B, T, H, K] / [B, T, H, V]) and h0 ([N or B, H, K, V] float32, or None).
    """
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    q, k = rnd(B, T, H, K), rnd(B, T, H, K)
    v = rnd(B, T, H, V)
    g = F.logsigmoid(rnd(B, T, H, K)) / normalizer
    out = [x.to(device=device, dtype=dtype) for x in (q, k, v)] + [g.to(device=device, dtype=g_dtype or dtype)]
    h0 = rnd(N or B, H, K, V).to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32) \
        if state else None
    tensors = out + ([h0] if h0 is not None else [])
    for x in tensors:
        x.requires_grad_(requires_grad)
    return (*out, h0)


def compare_to_reference(q, k, v, g, h0=None, *, backend, cu_seqlens=None, scale=None, seed=1, final_state=True):
    """Run ``backend`` and the float64 recurrent reference on the same inputs with one random cotangent.

    The loss is <o, do> + <final_state, dS>, so gradients also flow through the final state (final_state=False:
    the backend is asked for no final state, as in training, and the loss is <o, do>). Returns {name: relative
    error} for o, final state (when asked for) and the gradients of q, k, v, g and h0 (when given).
    """
    from gla.ops import gated_linear_attention

    leaves = [q, k, v, g] + ([h0] if h0 is not None else [])
    names = ["dq", "dk", "dv", "dg"] + (["dh0"] if h0 is not None else [])
    gen = torch.Generator().manual_seed(seed)
    kw = dict(scale=scale, output_final_state=final_state, cu_seqlens=cu_seqlens)

    def run(xs, bk):
        o, s = gated_linear_attention(*xs[:4], initial_state=xs[4] if len(xs) > 4 else None, backend=bk, **kw)
        return o, (s if final_state else o.new_zeros(()))

    o, s = run(leaves, backend)
    do = torch.randn(o.shape, generator=gen).to(o.device)
    ds = torch.randn(s.shape, generator=gen).to(s.device)
    grads = torch.autograd.grad((o.float() * do).sum() + (s * ds).sum(), leaves)

    # The reference stays on the inputs' device: on a GPU its thousands of small steps are far faster than on a
    # CPU shared by several test processes.
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    o_r, s_r = run(ref_leaves, "recurrent")
    grads_r = torch.autograd.grad((o_r * do.double()).sum() + (s_r * ds.double()).sum(), ref_leaves)
    errs = {"o": rel_err(o, o_r)} | ({"state": rel_err(s, s_r)} if final_state else {})
    errs.update({n: rel_err(a, b) for n, a, b in zip(names, grads, grads_r)})
    return errs


def assert_autocast_exact(q, k, v, g, h0, *, backend, variants):
    """The operator's outputs (o, final state) and gradients (q, k, v, g, h0) under bf16 autocast equal those
    outside it, bit for bit. variants: [(forward under autocast, backward under autocast), ...]."""
    import contextlib

    from gla.ops import gated_linear_attention

    bf16 = torch.autocast(q.device.type, dtype=torch.bfloat16)

    def run(fwd_autocast, bwd_autocast):
        with bf16 if fwd_autocast else contextlib.nullcontext():
            o, s = gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, backend=backend)
        with bf16 if bwd_autocast else contextlib.nullcontext():
            return (o, s, *torch.autograd.grad(o.sum() + s.square().sum(), (q, k, v, g, h0)))

    plain = run(False, False)
    for variant in variants:
        for a, b in zip(run(*variant), plain):
            assert a.dtype == b.dtype and torch.equal(a, b), variant


def train_cut_at(cfg, step: int) -> None:
    """Run ``gla.training.train(cfg)`` until the power goes out: KeyboardInterrupt raised before optimizer step
    ``step + 1``, as a crash would stop it (whatever was checkpointed before stays)."""
    import pytest

    from gla.training import Trainer, train
    real_step = Trainer.train_step

    def crashing_step(self):
        if self.step == step:
            raise KeyboardInterrupt
        return real_step(self)

    Trainer.train_step = crashing_step
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, progress=False)
    finally:
        Trainer.train_step = real_step
