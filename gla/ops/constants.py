"""Chunk sizes and strong-gate thresholds of the two chunkwise paths: the PyTorch one (chunk.py: the CPU path and
the fallback on any device) and the Triton kernels (triton/). Kept side by side so that where they differ, they
differ on purpose.

Both paths compute the scores inside a chunk, sum_k q_tk k_jk e^{b_tk - b_jk} for j <= t (b: the cumulative log
decay, falling along the chunk), as one matrix product of q ⊙ e^{b - r} and k ⊙ e^{r - b}, for a reference decay r
taken at the start of the block being factored. Then the q factors are <= 1, but a key after that start gets a factor
up to e^{decay over the block}; a block whose decay passes the path's threshold is computed in log space instead
(every exponent <= 0: exact for any gate, and slower). No imports here, so both paths can import this file.
"""

BT = 64
"""Chunk length in tokens, both paths. The state is carried across chunks in ceil(T / BT) sequential steps; for the
Triton kernels it is also a power of two that fills a 64-row tensor-core (MMA) tile."""

BC = 16
"""PyTorch path: sub-chunk length where some chunk decays by more than SAFE_SPAN. Its chunk is then factored in
BT / BC row blocks of BC tokens (the GLA paper's secondary-level chunking, Yang et al. 2024, §4.3): r is the decay at
the start of each sub-chunk, so only the BC x BC diagonal block has key factors above 1. When no chunk of a call
decays by more than SAFE_SPAN, each whole chunk is one block (chunk.sub_chunk): the same bound, fewer operations."""

SAFE_SPAN = 30.0
"""PyTorch path: the largest log decay over one 16-token sub-chunk (per chunk, head and sub-chunk, the largest over
K) for which its diagonal block is factored. Key factors are then <= e^30, which cannot overflow float32 (~e^88)
even times |q||k|, and gates up to about 30 / 16 ≈ 1.9 nats of decay per token still take the matrix-product path."""

SAFE_DECAY = 60.0
"""Triton path: the largest log decay over a whole 64-token chunk (per chunk, head and K tile: min(gc) >= -60) for
which its [BT, BT] block is one tensor-core product of (q * exp(gc)) and (k * exp(-gc)), gc counted from the chunk's
start. The kernels decide per chunk and K tile and never fall back to sub-chunks (a chunk over the bound is computed
in log space), so their bound is set higher than SAFE_SPAN: key factors up to exp(60) are still far inside the
range of the operand dtypes, fp32 and bf16 (~exp(88)), and gates up to about 60 / 64 ≈ 0.94 nats of decay per token
take the tensor-core path."""
