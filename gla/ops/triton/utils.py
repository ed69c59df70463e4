"""Shared pieces of the Triton kernels: chunk bookkeeping (fixed length and varlen) and dtype choices.

Every sequence is cut into chunks of BT = 64 tokens (the last one may be short). Chunks are numbered globally in
sequence order: chunk ``i_c`` is chunk ``i_t`` of sequence ``i_n``. Per-chunk states live in "slots": sequence n owns
NT_n + 1 consecutive slots (the state entering each chunk, then the final state), starting at slot
``chunk_offsets[n] + n``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BT = 64  # chunk length (tokens): a power of two that fills a 64-row MMA tile
# Largest total log-decay within a chunk for which the intra-chunk block may be factored as
# (q * exp(gc)) @ (k * exp(-gc))^T: exp(60) and exp(-60) are far inside the range of fp32 and bf16 (~exp(±88)).
# Chunks with stronger decay take the log-space path, where every exponent is <= 0.
SAFE_DECAY = 60.0


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


@dataclass
class ChunkMeta:
    """Host-side view of the chunking. ``cu_seqlens``/``chunk_indices``/``chunk_offsets`` are None for equal lengths."""
    N: int  # sequences
    T: int  # tokens per sequence (fixed length) or 0 (varlen)
    NC: int  # chunks over all sequences
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
    if cu_seqlens is None:
        return ChunkMeta(B, T, B * triton.cdiv(T, BT), None, None, None)
    cu = cu_seqlens.to(torch.int64)
    N = cu.numel() - 1
    nt = (cu[1:] - cu[:-1] + BT - 1) // BT
    offs = torch.zeros(N + 1, dtype=torch.int64, device=cu.device)
    offs[1:] = torch.cumsum(nt, 0)
    NC = int(offs[-1].item())
    seq = torch.repeat_interleave(torch.arange(N, device=cu.device), nt)
    idx = torch.arange(NC, device=cu.device) - offs[seq]
    chunk_indices = torch.stack([seq, idx], 1).to(torch.int32).contiguous()
    return ChunkMeta(N, 0, NC, cu.to(torch.int32).contiguous(), chunk_indices, offs.to(torch.int32).contiguous())


def dot_dtype(dtype: torch.dtype):
    """Operand dtype of the tensor-core products: bf16 for 16-bit inputs (fp16's range cannot hold the rescaled
    operands exp(±60)), fp32 for fp32 inputs (computed in full fp32: input_precision="ieee"). The CPU interpreter
    cannot multiply bf16 blocks (it stores them as raw uint16), so there every product runs in fp32."""
    if dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32
    return tl.bfloat16


def gate_dtype(dtype: torch.dtype):
    """Operand dtype of the in-chunk cumulative sum of g (a product with a triangular matrix of ones): g's own
    16-bit dtype is exact there (products by 1, fp32 accumulation); fp32 gates (and the interpreter) use fp32."""
    if dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


@triton.jit
def chunk_cumsum(b_g, BT: tl.constexpr):
    """Inclusive cumulative sum over the rows of a [BT, BK] block, as tril(1) @ g on the tensor cores: cheaper in
    registers and time than a cross-warp scan (tl.cumsum). Returns fp32."""
    o_t = tl.arange(0, BT)
    b_tril = (o_t[:, None] >= o_t[None, :]).to(b_g.dtype)
    return tl.dot(b_tril, b_g, input_precision="ieee")


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the intra-chunk scores A kept from the forward for dv: bf16 for bf16 inputs (dv = A^T do is a bf16
    product anyway), fp32 otherwise. The per-chunk states are always fp32: with bf16 states the gate gradient, a sum of
    nearly cancelling terms under strong gates, lost an order of magnitude (rel. error 4e-2 vs 4e-3); measured cost of
    fp32 states on the H200: 2-4% of fwd+bwd (benchmarks/NOTES.md)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


# Fixed tile configurations, no autotuning (first call = compile only). Chosen from ptxas register reports (no
# spills on sm_90) and H200 timings, see benchmarks/NOTES.md; benchmarks/gpu_ops.py edits this dict to time variants.
CONFIGS = {
    # sequential state kernels, largest tile that still gives >= 4 programs per SM (see chunk_state._state_config)
    "state": dict(BK=64, BV=64, num_warps=4),
    "state_mid": dict(BK=32, BV=64, num_warps=4),
    "state_small": dict(BK=16, BV=64, num_warps=4),
    "output": dict(BK=32, BV=128, num_warps=4),
    "dv": dict(BK=32, BV=128, num_warps=4),
    "dqkg": dict(BK=32, BV=32, num_warps=4),  # square: see chunk_bwd.chunk_bwd
}


def config(name: str, K: int, V: int) -> dict:
    """Tile sizes (clipped to the padded head dims) and launch options of one kernel."""
    c = dict(CONFIGS[name])
    c["BK"], c["BV"] = min(c["BK"], pow2(K)), min(c["BV"], pow2(V))
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
