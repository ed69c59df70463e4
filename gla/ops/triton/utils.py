"""Shared pieces of the Triton kernels: tile addressing, chunk bookkeeping (fixed length and varlen), dtype choices.

Tiles are addressed with plain pointer arithmetic and masks (``tile``), which every Triton from 3.6 to 3.9 compiles
(block pointers were removed in 3.8) and which handles any head size, aligned or not.

Every sequence is cut into chunks of BT = 64 tokens (the last one may be short). Chunks are numbered globally in
sequence order: chunk ``i_c`` is chunk ``i_t`` of sequence ``i_n``. Per-chunk states live in "slots": sequence n owns
NT_n + 1 consecutive slots (the state entering each chunk, then the final state), starting at slot
``chunk_offsets[n] + n``. With ``cu_seqlens`` the number of chunks depends on the data; the host never reads it
(that would wait for the GPU): buffers are sized by the bound T // BT + N, and the spare chunk ids point past the end
of the last sequence, where every row is masked off.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# The chunk length and the strong-gate threshold of the kernels, kept beside the PyTorch path's (gla.ops.constants
# says why the thresholds differ); imported here for the kernel modules, which take them from this one.
from ..constants import BT, SAFE_DECAY  # noqa: F401


@triton.jit
def tile(base, r0, n_r, c0, n_c, s_r, s_c, BR: tl.constexpr, BC: tl.constexpr):
    """Pointers and mask of the [BR, BC] tile at (r0, c0) of a matrix of n_r x n_c entries with strides (s_r, s_c).
    The tile's origin is offset in int64 (a long sequence passes 2^31 elements: T * H * K at T = 2^20, H * K = 2048);
    the offsets inside the tile stay int32."""
    o_r = tl.arange(0, BR)
    o_c = tl.arange(0, BC)
    origin = base + tl.cast(r0, tl.int64) * s_r + tl.cast(c0, tl.int64) * s_c
    mask = ((r0 + o_r) < n_r)[:, None] & ((c0 + o_c) < n_c)[None, :]
    return origin + o_r[:, None] * s_r + o_c[None, :] * s_c, mask


@triton.jit
def to_dot(x, DOT16: tl.constexpr):
    """Operand of a tensor-core product (see ``dot16``): DOT16 = 1: bf16; 0: fp32; 2: fp32 holding the bf16 value
    (round to nearest even on the bits: the interpreter's own cast truncates), so that the interpreter's fp32
    products see the GPU's operand rounding."""
    if DOT16 == 1:
        y = x.to(tl.bfloat16)
    elif DOT16 == 2:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        y = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def chunk_bounds(i_c, cu_seqlens, chunk_indices, chunk_offsets, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Global chunk id -> (chunk index in its sequence, first token, end token (exclusive), first state slot)."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
        i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        boh = tl.load(chunk_offsets + i_n).to(tl.int64) + i_n
    else:
        NT = tl.cdiv(T, BT)
        i_n = (i_c // NT).to(tl.int64)
        i_t = (i_c % NT).to(tl.int32)
        bos = i_n * T
        eos = bos + T
        boh = i_n * (NT + 1)
    return i_t, bos, eos, boh


@triton.jit
def seq_bounds(i_n, cu_seqlens, chunk_offsets, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Sequence id -> (first token, end token (exclusive), first global chunk id, first state slot)."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        boc = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
        boc = i_n.to(tl.int64) * tl.cdiv(T, BT)
    return bos, eos, boc, boc + i_n


@triton.jit
def last_row(base, t_end, c0, n_c, s_r, BC: tl.constexpr):
    """Row t_end - 1 of a row-major matrix with row stride s_r: [BC] entries from column c0, zeros past n_c.
    Used for the cumulative log-decay at a chunk's last token (t_end = min(chunk start + BT, L))."""
    o_c = c0 + tl.arange(0, BC)
    return tl.load(base + (t_end - 1).to(tl.int64) * s_r + o_c, mask=o_c < n_c, other=0.)


@dataclass
class ChunkMeta:
    """Host-side view of the chunking. ``cu_seqlens``/``chunk_indices``/``chunk_offsets`` are None for equal lengths.
    NC is exact for equal lengths and the bound T // BT + N with cu_seqlens (spare ids are masked off)."""
    N: int  # sequences
    T: int  # tokens per sequence (fixed length) or 0 (varlen)
    NC: int  # chunk ids over all sequences
    cu_seqlens: torch.Tensor | None
    chunk_indices: torch.Tensor | None  # [NC, 2] int32: (sequence, chunk within it)
    chunk_offsets: torch.Tensor | None  # [N + 1] int32: first global chunk of each sequence

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def n_slots(self) -> int:
        return self.NC + self.N


def chunk_meta(B: int, T: int, cu_seqlens: torch.Tensor | None) -> ChunkMeta:
    """Chunk bookkeeping from tensor ops only (no host sync, fixed shapes: CUDA-graph and torch.compile safe)."""
    if cu_seqlens is None:
        return ChunkMeta(B, T, B * cdiv(T, BT), None, None, None)
    cu = cu_seqlens.to(torch.int64)
    N = cu.numel() - 1
    NC = T // BT + N  # sum_n ceil(L_n / BT) <= sum_n (L_n / BT + 1)
    ends = torch.cumsum((cu[1:] - cu[:-1] + BT - 1) // BT, 0)  # one past each sequence's last chunk, <= NC
    offs = torch.cat([cu.new_zeros(1), ends])
    # sequence of each chunk id = how many sequences end at or before it: a count of ends, spread by a cumsum.
    # (torch.searchsorted(offs[1:], ids, right=True) is the same in eager mode, but Inductor's CUDA lowering of it
    # read the boundaries one element early, from offs[0], and shifted every chunk by a sequence: torch 2.11.)
    marks = torch.zeros(NC + 1, dtype=torch.int64, device=cu.device).index_add_(0, ends, torch.ones_like(ends))
    seq = torch.cumsum(marks, 0)[:NC].clamp_(max=N - 1)
    ids = torch.arange(NC, device=cu.device)
    # spare ids (past the last chunk) become chunks NT, NT+1, ... of the last sequence: slots from its final state
    # on (inside the buffers, which hold NC + N slots), every row masked off
    idx = ids - offs[seq]
    chunk_indices = torch.stack([seq, idx], 1).to(torch.int32)
    return ChunkMeta(N, 0, NC, cu.to(torch.int32), chunk_indices, offs.to(torch.int32))


def dot16(dtype: torch.dtype) -> int:
    """How the tensor-core products take their operands (``to_dot``'s DOT16): 1, bf16, for 16-bit inputs (fp16's
    range cannot hold the rescaled operands exp(±60)); 0, full fp32 (input_precision="ieee"), for fp32 inputs. The CPU
    interpreter cannot multiply bf16 blocks (it stores them as raw uint16): there 16-bit inputs get 2, fp32 products
    of operands rounded to bf16 as the GPU rounds them, so the interpreter suite sees the GPU's precision."""
    if dtype == torch.float32:
        return 0
    return 2 if os.environ.get("TRITON_INTERPRET") == "1" else 1


def kept_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of what one stage writes for the products of later ones (the intra-chunk scores A, the per-chunk states
    hs and their gradients dhs) for inputs of ``dtype``: bf16 for 16-bit inputs, whose products round every operand
    to bf16 anyway (stored rounded = read and rounded: the same values, half the bytes), fp32 otherwise. The gate
    gradient reads the states outside products too; chunk_bwd.py says why bf16 states keep it accurate."""
    return torch.float32 if dtype == torch.float32 else torch.bfloat16


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host side. (``triton.cdiv`` is a ConstexprFunction costing microseconds per call: with
    ~20 calls per forward it was about a quarter of the launcher's host time.)"""
    return -(-a // b)


def pow2(n: int, lo: int = 16) -> int:
    """The smallest power of two >= n, at least lo."""
    p = lo
    while p < n:
        p *= 2
    return p


# Fixed tile configurations, no autotuning (first call = compile only). Chosen from ptxas register reports (no
# spills on sm_90) and H200 timings, see benchmarks/NOTES.md; `gla bench ops --variants` edits this dict to time others.
CONFIGS = {
    # sequential state kernels, largest tile that still gives every SM a program (see chunk_state._state_config)
    "state": dict(BK=64, BV=64, num_warps=4),
    "state_mid": dict(BK=32, BV=64, num_warps=4),
    "state_small": dict(BK=16, BV=64, num_warps=4),
    "output": dict(BK=32, BV=128, num_warps=4),
    "dv": dict(BK=32, BV=128, num_warps=4),
    "dqkg": dict(BK=64, BV=64, num_warps=8),  # square: see chunk_bwd.chunk_bwd; 254 registers
    "cumsum": dict(BK=64, num_warps=4),
}


def config(name: str, K: int, V: int) -> dict:
    """Tile sizes (clipped to the padded head dims) and launch options of one kernel."""
    c = dict(CONFIGS[name])
    c["BK"] = min(c["BK"], pow2(K))
    if "BV" in c:
        c["BV"] = min(c["BV"], pow2(V))
    return c


def patch_interpreter_scalars() -> None:
    """Let Triton's CPU interpreter (TRITON_INTERPRET=1) use run-time loop bounds under NumPy >= 2.4.

    Triton 3.6's interpreter turns a scalar into an index with ``int(ndarray)``; its scalars are 1-element 1-D arrays,
    which NumPy 2.4 no longer converts, so ``for i in range(0, NT)`` fails for any run-time ``NT``. This wraps the
    interpreter's tensor patch to convert through ``.item()``. The compiled path is not touched.
    """
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_gla_scalars", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._gla_scalars = True
    interpreter._patch_lang_tensor = patched
