"""The intra-chunk part of the PyTorch chunk path (gla/ops/chunk.py, whose docstring gives the math): the scores
inside each chunk as products of factored queries and keys, one row block (sub-chunk) at a time, their output and
their gradients, and the decay factors the state terms share with them.
"""
from __future__ import annotations

from functools import cached_property

import torch

from .constants import BC, BT, SAFE_SPAN  # beside the Triton path's; constants.py says why the thresholds differ


class Intra:
    """Factored intra-chunk blocks for one chunked input (see the module docstring), one row block at a time, and
    the decay factors of the state terms.

    qs, k, g: [NC, H, BT, K] (qs: the queries, scaled or not, see ``add_output``; each may be a strided view);
    b: [NC, H, BT, K] cumulative log decay; bc: the sub-chunk length (``sub_chunk``). Row block i (sub-chunk i) sees
    keys 0 .. (i+1)*bc - 1; its scores are qa[i] @ kf[i]^T. The state terms use eb = e^b (the queries' factor) and
    k_state = e^{B - b} (the keys').
    """

    def __init__(self, qs, k, g, b, bc: int = BC):
        NC, H, _, K = k.shape
        self.bc = BC = bc
        NS = BT // BC
        self.shape = (NC, H, NS)
        self.qs = qs
        self.eb = b.exp()  # [NC, H, BT, K]
        if NS == 1:  # one block anchored at the chunk's start: the state terms' factors serve it too
            self.q_fac = self.eb.view(NC, H, 1, BT, K)
            # k e^{-b} (e^{-b} <= e^SAFE_SPAN: sub_chunk checked) in one pass; written in eb's layout, not k's
            self.kf = [torch.div(k, self.eb, out=torch.empty_like(self.eb))]
            self.qa = self.q_fac * qs.view(NC, H, 1, BT, K)
            self.unsafe = ()
            return
        self.k_state = (b[:, :, -1:] - b).exp_()
        bs = b.view(NC, H, NS, BC, K)
        r = torch.cat([bs.new_zeros(NC, H, 1, K), bs[:, :, :-1, -1]], 2)  # decay before each sub-chunk
        self.q_fac = (bs - r.unsqueeze(3)).exp_()  # [NC, H, NS, BC, K], every exponent <= 0
        self.qa = self.q_fac * qs.view(NC, H, NS, BC, K)
        self.k_fac, self.kf = [], []
        for i in range(NS):
            expo = r[:, :, i].unsqueeze(2) - b[:, :, :(i + 1) * BC]  # <= 0 left of sub-chunk i
            # Diagonal part: <= SAFE_SPAN where the sub-chunk is safe; elsewhere the clamped values are never used
            # (log-space blocks replace them), but must stay finite.
            expo[:, :, i * BC:].clamp_(max=SAFE_SPAN)
            fac = expo.exp_()
            self.k_fac.append(fac)
            self.kf.append(fac * k[:, :, :(i + 1) * BC])
        safe = (r - bs[:, :, :, -1]).amax(-1) <= SAFE_SPAN  # [NC, H, NS]
        self.unsafe = (~safe).nonzero(as_tuple=True)
        if self.unsafe[0].numel():
            c, h, s = self.unsafe
            # Decay inside the sub-chunk, summed in float64: differences of large cumulative sums lose digits.
            bd = g.view(NC, H, NS, BC, K)[c, h, s].double().cumsum(1)  # [n, BC, K]
            tril = torch.ones(BC, BC, dtype=torch.bool, device=k.device).tril()
            diff = (bd.unsqueeze(2) - bd.unsqueeze(1)).masked_fill_(~tril.unsqueeze(-1), float("-inf"))
            self.D = diff.to(k.dtype).exp_()  # [n, BC (t), BC (j), K]: e^{b_t - b_j}, j <= t
            self.qd = qs.view(NC, H, NS, BC, K)[c, h, s]
            self.kd = k.view(NC, H, NS, BC, K)[c, h, s]

    @cached_property
    def k_state(self):
        """e^{B - b} [NC, H, BT, K] (sub-chunks set it in __init__; one block forms it here, for the backward)."""
        return self.eb[:, :, -1:] / self.eb

    def k_dec(self, k):
        """k ⊙ e^{B - b} [NC, H, BT, K]: the keys' contributions to the state leaving the chunk."""
        return self.kf[0] * self.eb[:, :, -1:] if self.shape[2] == 1 else self.k_state * k

    def q_dec(self):
        """qs ⊙ e^b [NC, H, BT, K]: the queries' factor against the state entering the chunk."""
        NC, H, NS = self.shape
        return self.qa.view(NC, H, BT, self.qa.shape[-1]) if NS == 1 else self.qs * self.eb

    def _unsafe_rows(self, i):
        """Positions (chunk, head) whose sub-chunk i is unsafe, and their index into the log-space blocks; none
        when the chunk is one block."""
        if not self.unsafe:
            return None, None, self.eb.new_empty(0)
        sel = (self.unsafe[2] == i).nonzero().squeeze(1)
        return self.unsafe[0][sel], self.unsafe[1][sel], sel

    def scores(self, i):
        """Causal scores of row block i (scaled if the queries were): [NC, H, bc, (i+1)*bc]."""
        BC = self.bc
        A = self.qa[:, :, i] @ self.kf[i].transpose(-1, -2)
        diag = A[:, :, :, i * BC:]
        diag.tril_()
        c, h, sel = self._unsafe_rows(i)
        if sel.numel():
            A[c, h, :, i * BC:] = torch.einsum("ntk,njk,ntjk->ntj", self.qd[sel], self.kd[sel], self.D[sel])
        return A

    def add_output(self, o, v, scale: float = 1.0):
        """Returns scale * (o + Σ_{j<=t} A_tj v_j): v, o [NC, H, BT, V]; o may be overwritten. A scale other than 1
        is for queries given unscaled (the forward: no pass over q to scale it)."""
        BC = self.bc
        if self.shape[2] == 1:  # one block: the add and the scale fused into the product
            return torch.baddbmm(o.view(-1, BT, o.shape[-1]), self.scores(0).view(-1, BT, BT),
                                 v.view(-1, BT, v.shape[-1]), beta=scale, alpha=scale).view(o.shape)
        o.mul_(scale)
        for i in range(self.shape[2]):
            o[:, :, i * BC:(i + 1) * BC].add_(self.scores(i) @ v[:, :, :(i + 1) * BC], alpha=scale)
        return o

    def backward(self, do, v):
        """do, v: [NC, H, BT, V] -> intra-chunk gradients (d qs, d k) without the j = t terms, d v, and w.

        The j = t terms are returned as w = dO_t · v_t [NC, H, BT] (their gradients are w ⊙ k and w ⊙ qs):
        they cancel exactly in q ⊙ dq − k ⊙ dk, and leaving them out keeps the gate gradient free of that
        cancellation, which would otherwise dominate it when gates are strong.
        """
        NC, H, NS = self.shape
        BC = self.bc
        if NS == 1:  # one block, no unsafe part: each gradient is one product and a factor
            dA = do @ v.transpose(-1, -2)
            w = dA.diagonal(dim1=-2, dim2=-1).clone()
            dA.tril_(-1)
            dv = self.scores(0).transpose(-1, -2) @ do
            dq = (dA @ self.kf[0]).mul_(self.eb)
            dk = (dA.transpose(-1, -2) @ self.qa[:, :, 0]).div_(self.eb)
            return dq, dk, dv, w
        dq = torch.empty_like(self.qa)
        dk = torch.zeros(NC, H, BT, self.qa.shape[-1], dtype=v.dtype, device=v.device)
        dv = torch.zeros_like(v)
        w = v.new_empty(NC, H, BT)
        for i in range(NS):
            do_i, v_i = do[:, :, i * BC:(i + 1) * BC], v[:, :, :(i + 1) * BC]
            dv[:, :, :(i + 1) * BC] += self.scores(i).transpose(-1, -2) @ do_i
            dA = do_i @ v_i.transpose(-1, -2)
            dA_diag = dA[:, :, :, i * BC:]
            w[:, :, i * BC:(i + 1) * BC] = dA_diag.diagonal(dim1=-2, dim2=-1)
            dA_diag.tril_(-1)
            c, h, sel = self._unsafe_rows(i)
            if sel.numel():
                dAd = dA[c, h, :, i * BC:]
                dA[c, h, :, i * BC:] = 0  # the factored diagonal is not valid there: log space instead
            dq[:, :, i] = (dA @ self.kf[i]) * self.q_fac[:, :, i]
            dk[:, :, :(i + 1) * BC] += (dA.transpose(-1, -2) @ self.qa[:, :, i]) * self.k_fac[i]
            if sel.numel():
                dq_u = torch.einsum("ntj,njk,ntjk->ntk", dAd, self.kd[sel], self.D[sel])
                dk_u = torch.einsum("ntj,ntk,ntjk->njk", dAd, self.qd[sel], self.D[sel])
                dq[c, h, i] += dq_u
                dk[c, h, i * BC:(i + 1) * BC] += dk_u
        return dq.view(NC, H, BT, -1), dk, dv, w


def sub_chunk(b) -> int:
    """Sub-chunk length for the cumulative decays b [NC, H, BT, K]: the whole chunk (one factored block, a quarter
    of the products and elementwise passes of 16-token sub-chunks) when no chunk decays by more than SAFE_SPAN, as
    with ordinary gates; else BC. The same bound holds either way: key factors stay <= e^SAFE_SPAN."""
    return BT if bool((b[:, :, -1] >= -SAFE_SPAN).all()) else BC
