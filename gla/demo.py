"""`make demo`: the main job. Until training lands this is a smoke run of the operator on CPU:
the chunkwise path against the recurrent reference (forward, final state, gradients) and their speed."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from gla.ops import gated_linear_attention


def main():
    torch.manual_seed(0)
    B, T, H, K, V = 1, 1024, 4, 64, 128
    q, k = torch.randn(B, T, H, K, dtype=torch.float64), torch.randn(B, T, H, K, dtype=torch.float64)
    v = torch.randn(B, T, H, V, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(B, T, H, K, dtype=torch.float64)) / 16
    ref, ref_state = gated_linear_attention(q, k, v, g, output_final_state=True, backend="recurrent")
    x = [t.float() for t in (q, k, v, g)]
    t0 = time.perf_counter()
    o, state = gated_linear_attention(*x, output_final_state=True, backend="chunk")
    dt = time.perf_counter() - t0
    err = ((o.double() - ref).norm() / ref.norm()).item()
    serr = ((state.double() - ref_state).norm() / ref_state.norm()).item()
    print(f"chunk GLA, B={B} T={T} H={H} K={K} V={V} fp32: {dt * 1e3:.1f} ms; "
          f"relative error vs float64 recurrent reference: output {err:.1e}, final state {serr:.1e}")


if __name__ == "__main__":
    main()
