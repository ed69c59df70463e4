"""Triton GPU kernels for GLA: chunkwise forward/backward (``triton_gla``) and the decode step.

One file per stage: gate.py (in-chunk cumulative gates), chunk_state.py (inter-chunk states, fwd/bwd), chunk_output.py
(outputs), chunk_bwd.py (dq, dk, dv, dg), decode.py (one token), chunk.py (the torch.library operators and their
autograd), utils.py (tile addressing, chunk bookkeeping).
On CPU tensors they run under the Triton interpreter (TRITON_INTERPRET=1), which is how CI tests them.
"""
import os

from .chunk import triton_gla
from .decode import triton_recurrent_step
from .utils import patch_interpreter_scalars

if os.environ.get("TRITON_INTERPRET") == "1":
    patch_interpreter_scalars()

__all__ = ["triton_gla", "triton_recurrent_step"]
