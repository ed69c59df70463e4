"""Chunkwise GLA in PyTorch: the CPU path and the fallback on any device, with a hand-written backward.

Math (Yang et al. 2024, §4.2–4.3). Split each sequence into chunks of BT tokens; inside a chunk let b_t be the
cumulative log decay (b_t = sum of g_j for j <= t in the chunk), B = b_BT, and S the state entering the chunk:

    o_t = s (q_t ⊙ e^{b_t}) S + s Σ_{j<=t} [Σ_k q_tk k_jk e^{b_tk - b_jk}] v_j
    S'  = diag(e^B) S + Σ_j (k_j ⊙ e^{B - b_j})^T v_j

Numerical safety: every exponent stays <= 0 except in one guarded place. The intra-chunk matrix is built from
sub-chunks (the paper's secondary-level chunking): the block of rows in sub-chunk i is a matmul of
q ⊙ e^{b - r_i} and k ⊙ e^{r_i - b}, with r_i the decay at the end of sub-chunk i-1, so off-diagonal factors are
<= 1. On the diagonal block the key factor is e^{r_i - b_j} >= 1; it is used only when the sub-chunk's total decay
is at most SAFE_SPAN (e^30 cannot overflow float32 even times |q||k|). When no chunk of the call decays by more
than SAFE_SPAN (ordinary gates), the sub-chunk is the whole chunk: one block, the fewest operations (``sub_chunk``);
otherwise all chunks use sub-chunks of BC tokens. Sub-chunks with stronger decay (gates like
logsigmoid(x)/0.1 reach hundreds) get their diagonal block in log space: e^{b_t - b_j} for j <= t, computed from
float64 cumulative sums so that large b values do not cost precision in their differences.

Backward: per chunk, the gradients of q, k, v follow from the same factored blocks; the state gradient runs a
reverse scan over chunks. The gate gradient uses the identity dL/db_t = q_t ⊙ dq_t − k_t ⊙ dk_t (plus
(S_T ⊙ dS_T) summed over V at each sequence's last token) and dg is its reverse cumulative sum within each
sequence, taken in float64 (DESIGN.md). Two parts of that sum cancel exactly — each token's own j = t score, and the
last token's own k_T^T v_T inside S_T — and with strong gates they would leave rounding errors larger than dg
itself, so both are left out analytically rather than subtracted.

Varlen: sequences are laid out chunk-aligned (each sequence padded to a multiple of BT with zero q, k, v and g = 0,
which leaves outputs and states unchanged), so no chunk straddles a boundary; the state scan runs over the chunk
index of all sequences at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from . import cpu_kernels, no_autocast, wants_grad
from .chunk_intra import Intra, sub_chunk
from .chunk_segments import Segments
from .constants import BT
from .recurrent import state_dtype
from . import short_chunk


@dataclass
class _Plan:
    """How tokens map to chunk-aligned storage [NC, H, BT, D] and how the state scan walks the chunks."""
    B: int
    T: int
    NC: int  # total number of chunks
    N: int  # number of sequences
    tok_idx: torch.Tensor | None  # varlen only: [NC * BT] source token of each slot, T for padding
    inv_idx: torch.Tensor | None  # varlen only: [T] slot of each token
    steps: list  # per scan step: (chunk ids [n], sequence rows [n] or None when all N sequences take part)
    last_slot: torch.Tensor  # [N] slot of each sequence's last token in chunk-aligned storage (-1 if empty)

    @property
    def row_chunks(self) -> int:
        """Chunks per row (equal lengths; also for an empty batch, where NC // B is undefined)."""
        return -(-self.T // BT)


def _plan(B: int, T: int, cu_seqlens, device) -> _Plan:
    if cu_seqlens is None:  # equal lengths: each row's chunks chain in one buffer (_chain), no scan steps
        nc = -(-T // BT)
        last = torch.arange(B, device=device) * nc * BT + T - 1 if T > 0 else torch.full((B,), -1, device=device)
        return _Plan(B, T, B * nc, B, None, None, [], last)
    offs = cu_seqlens.tolist()
    tok, table, last = [], [], []
    for bos, eos in zip(offs, offs[1:]):
        n_chunks = -(-(eos - bos) // BT)
        table.append(list(range(len(tok) // BT, len(tok) // BT + n_chunks)))
        last.append(len(tok) + eos - bos - 1 if eos > bos else -1)
        tok += list(range(bos, eos)) + [T] * (n_chunks * BT - (eos - bos))
    tok_idx = torch.tensor(tok, dtype=torch.long)
    inv_idx = (tok_idx < T).nonzero().squeeze(1)  # built on the host: no device sync for the nonzero
    steps = []  # per scan step, the chunk of each sequence still running (_scan)
    for c in range(max((len(r) for r in table), default=0)):
        rows = [n for n, r in enumerate(table) if c < len(r)]
        ids = torch.tensor([table[n][c] for n in rows], dtype=torch.long, device=device)
        steps.append((ids, None if len(rows) == len(table) else torch.tensor(rows, device=device)))
    return _Plan(B, T, len(tok) // BT, len(table), tok_idx.to(device), inv_idx.to(device), steps,
                 torch.tensor(last, dtype=torch.long, device=device))


def _pack(x, plan: _Plan, acc, scale: float = 1.0, copy: bool = True):
    """x: [B, T, H, D] -> x * scale as [NC, H, BT, D] in dtype acc, chunk-aligned, zero padded, in one pass.

    copy=False (scale 1) may return a strided view of x (equal lengths, T a multiple of BT, x already in acc): for
    operands whose first uses are elementwise, which write contiguous results anyway (a matmul would copy it).
    """
    B, T, H, D = x.shape
    if plan.tok_idx is None:
        Tp = -(-T // BT) * BT
        x = F.pad(x, (0, 0, 0, 0, 0, Tp - T)) if Tp != T else x
    else:
        x = torch.cat([x.reshape(T, H, D), x.new_zeros(1, H, D)])[plan.tok_idx]
    x = x.reshape(plan.NC, BT, H, D).transpose(1, 2)
    if not copy and x.dtype == acc:
        return x
    out = torch.empty(x.shape, dtype=acc, device=x.device)
    return torch.mul(x, scale, out=out) if scale != 1 else out.copy_(x)


def _unpack(y, plan: _Plan, dtype, out=None):
    """y: [NC, H, BT, D] -> [B, T, H, D] in dtype; or written into ``out`` [B, T, H, D] (returned)."""
    NC, H, _, D = y.shape
    if out is not None and plan.tok_idx is None and NC * BT == plan.B * plan.T:  # no padding: one copy, in place
        nc = plan.row_chunks
        out.view(plan.B, nc, BT, H, D).copy_(y.view(plan.B, nc, H, BT, D).transpose(2, 3))
        return out
    flat = torch.empty(NC, BT, H, D, dtype=dtype, device=y.device)
    flat = flat.copy_(y.transpose(1, 2)).view(NC * BT, H, D)  # layout and dtype in one pass
    if plan.tok_idx is None:
        res = flat.view(plan.B, plan.row_chunks * BT, H, D)[:, :plan.T]
    else:
        res = flat[plan.inv_idx].unsqueeze(0)
    return res if out is None else out.copy_(res)


def _chain(a, x, decay, carry, plan: _Plan, reverse: bool):
    """The per-chunk contributions a[c]^T x[c] ([NC, H, K, V]; a: [NC, H, BT, K], x: [NC, H, BT, V]) chained through
    the chunks of each sequence, in order or in reverse, from carry [N, H, K, V].

    Returns (the carry at each chunk [NC, H, K, V]: the state entering chunk c forward, the gradient of the state
    leaving chunk c in reverse; the last carry [N, H, K, V]). Equal-length rows write the products into one buffer
    with a slot before (forward) or after (reverse) each row's chunks, and update it in place: no copies per step.
    """
    if plan.tok_idx is not None:
        local = a.transpose(-1, -2) @ x
        return local, _scan(local, decay, carry.clone(), plan, reverse)
    NC, H, _, K = a.shape
    B, V = plan.B, x.shape[-1]
    nc = plan.row_chunks
    buf = a.new_empty(B, nc + 1, H, K, V)
    first = 0 if reverse else 1  # where the products go; the carry takes the other end
    a, x = a.view(B, nc * H, BT, K), x.view(B, nc * H, BT, V)
    for r in range(B):  # bmm into a contiguous slice writes in place (matmul's out= may copy)
        torch.bmm(a[r].transpose(-1, -2), x[r], out=buf[r, first:first + nc].view(nc * H, K, V))
    buf[:, nc if reverse else 0] = carry
    slot, dec = buf.unbind(1), decay.view(B, nc, H, K, 1).unbind(1)  # views made once: one op per step below
    if reverse:
        for c in range(nc - 1, -1, -1):
            slot[c].addcmul_(slot[c + 1], dec[c])
        return buf[:, 1:].reshape(NC, H, K, V).contiguous(), buf[:, 0].clone()
    for c in range(nc):
        slot[c + 1].addcmul_(slot[c], dec[c])
    # the last carry is copied: an operator's outputs may not alias each other
    return buf[:, :nc].reshape(NC, H, K, V).contiguous(), buf[:, nc].clone()


def _scan(local, decay, carry, plan: _Plan, reverse: bool):
    """``_chain`` for packed sequences (cu_seqlens), in place: each step gathers the chunks its sequences are at.

    local: [NC, H, K, V] per-chunk contribution; decay: [NC, H, K]; carry: [N, H, K, V] start value (updated).
    Afterwards local[c] holds the carry before chunk c was applied; returns the last carry per sequence.
    """
    for ids, rows in (reversed(plan.steps) if reverse else plan.steps):
        cur = carry if rows is None else carry[rows]
        new = torch.addcmul(local[ids], cur, decay[ids].unsqueeze(-1))
        local[ids] = cur
        if rows is None:
            carry = new
        else:
            carry[rows] = new
    return carry


def _gates(g):
    """g: [NC, H, BT, K] -> (b cumulative log decay within each chunk, chunk decay e^B [NC, H, K])."""
    b = g.contiguous().cumsum(2)  # torch's CPU cumsum is ~2x faster on contiguous data than on a strided view
    return b, b[:, :, -1].exp()


def _max_chunks(B: int, T: int, N: int, varlen: bool) -> int:
    """Rows of the per-chunk state buffer: exact for equal lengths, the bound T // BT + N with cu_seqlens (the
    chunk count depends on the data, and an operator's output shapes may not)."""
    return T // BT + N if varlen else B * -(-T // BT)


def _forward(q, k, v, g, h0, scale, plan: _Plan, out=None):
    """Returns o [B, T, H, V] (written into ``out`` when given), the final states [N, H, K, V] and the states entering
    each chunk [NC, H, K, V]."""
    acc = state_dtype(q.dtype)
    vc = _pack(v, plan, acc)
    kc, gc = (_pack(x, plan, acc, copy=False) for x in (k, g))
    b, decay = _gates(gc)
    # the queries unscaled: the scale rides on the output's products (fp32 inputs: one pass fewer over q)
    intra = Intra(_pack(q, plan, acc, copy=False), kc, gc, b, sub_chunk(b))
    NC, H, _, K = kc.shape
    carry = h0.to(acc) if h0 is not None else kc.new_zeros(plan.N, H, K, vc.shape[-1])
    h, final = _chain(intra.k_dec(kc), vc, decay, carry, plan, reverse=False)
    o = intra.add_output(intra.q_dec() @ h, vc, scale)
    return _unpack(o, plan, v.dtype, out), final, h


def _backward(q, k, v, g, h, do, dfinal, scale, plan: _Plan):
    """Gradients (dq, dk, dv, dg in the inputs' dtypes, dh0 in the state dtype) from the chunk states h of the
    forward; do or dfinal may be None (no gradient through o or through the final state)."""
    acc = state_dtype(q.dtype)
    qs, vc = _pack(q, plan, acc, scale), _pack(v, plan, acc)
    kc, gc = (_pack(x, plan, acc, copy=False) for x in (k, g))
    b, decay = _gates(gc)
    doc = _pack(do, plan, acc) if do is not None else torch.zeros_like(vc)
    intra = Intra(qs, kc, gc, b, sub_chunk(b))
    carry = dfinal.to(acc) if dfinal is not None else vc.new_zeros(plan.N, *h.shape[1:])
    dh, dh0 = _chain(intra.q_dec(), doc, decay, carry, plan, reverse=True)  # dh[c]: gradient of the state leaving c
    dqs, dk, dv, w = intra.backward(doc, vc)
    dqs.addcmul_(doc @ h.transpose(-1, -2), intra.eb)
    dk_state = (vc @ dh.transpose(-1, -2)).mul_(intra.k_state)
    K = qs.shape[-1]
    dv.view(-1, BT, dv.shape[-1]).baddbmm_(intra.k_dec(kc).view(-1, BT, K), dh.view(-1, K, dh.shape[-1]))
    # At each sequence's last token the state term of dk is k_T's own share of the final state; it cancels
    # exactly against part of S_T ⊙ dS_T, so both are left out of the gate gradient (see _final_term).
    has = plan.last_slot >= 0
    c, p = plan.last_slot[has] // BT, plan.last_slot[has] % BT
    own = dk_state[c, :, p]
    dk_state[c, :, p] = 0
    dk += dk_state
    fin = _final_term(kc, vc, h, b, dfinal[has].to(acc), c, p) if dfinal is not None else None
    dg = _gate_grad(qs * dqs - kc * dk, fin, c, p, plan)
    dk[c, :, p] += own
    w = w.unsqueeze(-1)
    dq = _unpack(dqs.addcmul_(w, kc).mul_(scale), plan, q.dtype)
    dk = _unpack(dk.addcmul_(w, qs), plan, q.dtype)
    return dq, dk, _unpack(dv, plan, v.dtype), _unpack(dg, plan, g.dtype), dh0


@torch.library.custom_op("gla::chunk_fwd", mutates_args=())
def chunk_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, h0: Optional[torch.Tensor],
                 cu_seqlens: Optional[torch.Tensor], scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """o [B, T, H, V] (v's dtype), final states [N, H, K, V] and the states entering each chunk
    [_max_chunks, H, K, V] (the state dtype; kept for the backward, zero rows past the last chunk)."""
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    rows = _max_chunks(q.shape[0], q.shape[1], N, cu_seqlens is not None)
    if cpu_kernels.serves(q, k, v, g):
        return cpu_kernels.chunk_forward(q, k, v, g, h0, cu_seqlens, scale, state_rows=rows)
    with no_autocast(q.device.type):
        plan = _plan(q.shape[0], q.shape[1], cu_seqlens, q.device)
        o, final, h = _forward(q, k, v, g, h0, scale, plan)
    # outputs must have the layout the fake implementation promises (contiguous), not a view of padded storage
    h = F.pad(h, (0, 0, 0, 0, 0, 0, 0, rows - h.shape[0])) if rows != h.shape[0] else h
    return o.contiguous(), final.contiguous(), h


@chunk_fwd_op.register_fake
def _(q, k, v, g, h0, cu_seqlens, scale):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    acc = state_dtype(q.dtype)
    rows = _max_chunks(B, T, N, cu_seqlens is not None)
    return v.new_empty(B, T, H, V), q.new_empty(N, H, K, V, dtype=acc), q.new_empty(rows, H, K, V, dtype=acc)


@torch.library.custom_op("gla::chunk_bwd", mutates_args=())
def chunk_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
                 do: Optional[torch.Tensor], dfinal: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv, dg (the inputs' dtypes) and dh0 [N, H, K, V] (the state dtype)."""
    if cpu_kernels.serves(q, k, v, g):
        return cpu_kernels.chunk_backward(q, k, v, g, do, h, dfinal, cu_seqlens, scale)
    with no_autocast(q.device.type):
        plan = _plan(q.shape[0], q.shape[1], cu_seqlens, q.device)
        return tuple(x.contiguous() for x in _backward(q, k, v, g, h[:plan.NC], do, dfinal, scale, plan))


@chunk_bwd_op.register_fake
def _(q, k, v, g, h, do, dfinal, cu_seqlens, scale):
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    # contiguous, as the real outputs are (empty_like would keep a strided input's layout)
    return (*(x.new_empty(x.shape) for x in (q, k, v, g)), h.new_empty(N, *h.shape[1:]))


SEGMENT_BYTES = 12 << 20
"""Working set of one pass of the inference forward (``chunk_infer_op``), which runs equal-length rows a segment of
tokens at a time with the state carried between segments: its buffers, the states of the segment's chunks included,
are then bounded whatever the prompt length, and small enough to stay in the CPU's caches between the products that
share them. Measured at T=4096 H=4 K=128 V=256 fp32, medians of 15 interleaved calls: on 2 Xeon cores (2 MB L2
each) 256 / 448 / 512 / 576 tokens per segment took 20.6 / 20.1 / 19.2 / 19.5 ms, and at H=4 K=32 V=64 (T=16384)
1,728 / 2,048 / 2,688 / 3,456 tokens 16.5 / 15.8 / 16.2 / 15.9 ms; on 2 EPYC cores (1 MB L2 each, an earlier form of
the forward) 192-384 tokens were best and 576 5% slower. 12 MiB gives 448 and 2,048 tokens at those heads."""


def segment_tokens(B: int, H: int, K: int, V: int) -> int:
    """Tokens per row in one inference pass: SEGMENT_BYTES over the fp32 bytes a token occupies in
    ``chunk_segments.Segments`` (five K-wide and two V-wide rows, a row of scores, a share of a chunk state), in
    whole chunks."""
    per_token = max(1, 4 * B * H * (5 * K + 2 * V + BT + K * V // BT))  # an empty input: any length will do
    return BT * max(1, SEGMENT_BYTES // (per_token * BT))


@torch.library.custom_op("gla::chunk_infer", mutates_args=())
def chunk_infer_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, h0: Optional[torch.Tensor],
                   cu_seqlens: Optional[torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunk_fwd_op`` without the per-chunk states (nothing will differentiate it): o [B, T, H, V] and the final
    states [N, H, K, V]. Equal-length rows run ``segment_tokens`` at a time through ``chunk_segments`` (chunk.py's
    forms for a segment with strongly decaying chunks, and for a last part chunk), the state carried between
    segments, so that a long prompt needs memory for one segment only. Where the compiled CPU operators serve
    (gla/ops/cpu_kernels.py), they run instead: they keep only each task's state, whatever the length."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if cpu_kernels.serves(q, k, v, g):
        o, final, _ = cpu_kernels.chunk_forward(q, k, v, g, h0, cu_seqlens, scale)
        return o, final
    with no_autocast(q.device.type):
        whole = T // BT * BT
        if cu_seqlens is not None or whole == 0 or q.numel() == 0 or v.numel() == 0:  # nothing to segment
            o, final, _ = _forward(q, k, v, g, h0, scale, _plan(B, T, cu_seqlens, q.device))
            return o.contiguous(), final.contiguous()
        o = v.new_empty(B, T, H, V)
        seg_len = min(segment_tokens(B, H, K, V), whole)
        seg = Segments(B, seg_len, H, K, V, state_dtype(q.dtype), q.device)
        if h0 is None:
            seg.state.zero_()
        else:
            seg.state.copy_(h0)
        pieces = [slice(t0, min(t0 + seg_len, whole)) for t0 in range(0, whole, seg_len)]
        for piece in pieces + ([slice(whole, T)] if whole < T else []):
            x = [t[:, piece] for t in (q, k, v, g)]
            if piece.stop > whole or not seg.run(*x, scale, o[:, piece]):
                plan = _plan(B, piece.stop - piece.start, None, q.device)
                seg.state.copy_(_forward(*x, seg.state, scale, plan, out=o[:, piece])[1])
        return o, seg.state.clone()


@chunk_infer_op.register_fake
def _(q, k, v, g, h0, cu_seqlens, scale):
    B, T, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return v.new_empty(B, T, H, v.shape[-1]), q.new_empty(N, H, K, v.shape[-1], dtype=state_dtype(q.dtype))


def _setup(ctx, inputs, output):
    q, k, v, g, h0, cu_seqlens, scale = inputs
    ctx.save_for_backward(q, k, v, g, output[2], cu_seqlens)
    ctx.scale = scale
    ctx.h0_dtype = h0.dtype if h0 is not None else None
    ctx.set_materialize_grads(False)


def _grad(ctx, do, dfinal, dh):
    q, k, v, g, h, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, dg, dh0 = chunk_bwd_op(q, k, v, g, h, do, dfinal, cu_seqlens, ctx.scale)
    return dq, dk, dv, dg, dh0.to(ctx.h0_dtype) if ctx.h0_dtype is not None else None, None, None


torch.library.register_autograd("gla::chunk_fwd", _grad, setup_context=_setup)


def _final_term(k, v, h, b, dfinal, c, p):
    """The final state's direct share of dL/db_T, without the last token's own k_T^T v_T.

    dS_T ⊙ S_T summed over V is what the gate of the last token sees through the final state; k_T ⊙ (dS_T v_T)
    is removed from dk's side, so here S_T is replaced by S_T − k_T^T v_T, formed from the chunk's entering state
    and the tokens before T (never by subtraction, which would leave a rounding error of the size of S_T).
    k, v, h, b: chunk-aligned; dfinal: [N', H, K, V] for the N' non-empty sequences, whose last tokens sit at
    slot p of chunk c. Returns [N', H, K].
    """
    before = (torch.arange(BT, device=k.device) < p.unsqueeze(1)).unsqueeze(1).unsqueeze(-1)  # [N', 1, BT, 1]
    bc = b[c]
    k_dec = torch.where(before, k[c] * (bc[:, :, -1:] - bc).exp(), 0)
    pre = bc[:, :, -1].exp().unsqueeze(-1) * h[c] + k_dec.transpose(-1, -2) @ v[c]
    return (pre * dfinal).sum(-1)


def _gate_grad(db, fin, c, p, plan: _Plan):
    """dg_t = Σ_{t' >= t in t's sequence} db_t', in float64: a reverse cumulative sum inside each chunk plus the sum
    over the sequence's later chunks, each an ordered sum of the terms (no difference of two sums, which would lose
    a small tail to the rounding error of a large head).

    db: [NC, H, BT, K] chunk-aligned (zero in padding slots), db = q ⊙ dq − k ⊙ dk; fin: the final-state term
    [N', H, K] added at the last token of each non-empty sequence (chunk c, slot p), or None.
    Returns [NC, H, BT, K] float64.
    """
    NC, H, _, K = db.shape
    x = db.double()
    if fin is not None:
        x[c, :, p] += fin.double()
    # One add per position, each over all [NC, H, K] at once: torch's CPU cumsum runs a serial loop per row along
    # the time dim, and flipping for a reverse sum costs two more passes (together ~2x slower, measured).
    rows = x.unbind(2)
    for t in range(BT - 2, -1, -1):
        rows[t].add_(rows[t + 1])
    total = x[:, :, :1]  # [NC, H, 1, K]: each chunk's sum
    if plan.tok_idx is None:
        per_row = total.view(plan.B, plan.row_chunks, H, 1, K)
        later = torch.cat([per_row[:, 1:].flip(1).cumsum(1).flip(1), torch.zeros_like(per_row[:, :1])], 1)
        later = later.view(NC, H, 1, K)
    else:
        later = total.clone()
        _scan(later, torch.ones_like(later[..., 0]), x.new_zeros(plan.N, H, 1, K), plan, reverse=True)
    return x.add_(later)


def chunk_gla(q, k, v, g, scale: float, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Chunkwise GLA (arguments validated by ``gated_linear_attention``), as the operator ``gla::chunk_fwd``:
    opaque to torch.compile, with its backward registered (``gla::chunk_bwd``).

    q, k, g: [B, T, H, K]; v: [B, T, H, V]; initial_state: [N, H, K, V] or None; cu_seqlens: [N+1] or None.
    Returns (o [B, T, H, V] in v's dtype, final state [N, H, K, V] float32 or None).
    """
    # the compiled CPU operators beat the one-chunk path too (nanoGPT's sizes: 1.28 vs 1.94 ms forward+backward)
    cpu = cpu_kernels.serves(q, k, v, g)
    S = None if cpu else short_chunk.plan(q, g, initial_state, output_final_state, cu_seqlens)
    if S is not None:  # one chunk, no states: a few dozen ops each way
        return short_chunk.short_chunk_gla(q, k, v, g, scale, S), None
    if wants_grad(q, k, v, g, initial_state):
        if cpu and not torch.compiler.is_compiling():  # eager: the compiled CPU operators without the dispatch
            N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
            rows = _max_chunks(q.shape[0], q.shape[1], N, cu_seqlens is not None)
            o, final = cpu_kernels.EagerChunk.apply(q, k, v, g, initial_state, cu_seqlens, scale, rows)
        else:
            o, final, _ = chunk_fwd_op(q, k, v, g, initial_state, cu_seqlens, scale)
    else:
        o, final = chunk_infer_op(q, k, v, g, initial_state, cu_seqlens, scale)
    return o, (final if output_final_state else None)
