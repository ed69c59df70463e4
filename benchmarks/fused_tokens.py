"""The fused and the compiled captured decoding steps against the uncaptured eager step (gla-340m, random weights,
bf16, prompt 512, 64 new tokens), B=1, 16 and 64 (compiled up to 16): python3 benchmarks/fused_tokens.py [B ...].

Random weights put many near-ties at the top of the logits, where any change of rounding flips the greedy token;
so beside the free-running tokens (what a user sees) each captured step is also fed the eager step's tokens and
judged by its logits: the largest difference, and the argmax disagreements with the eager top-2 margin there.
"""
import sys

import torch

from gla.decoding import StaticDecoder
from gla.models import GLAConfig, GLATransformer

torch.manual_seed(0)
cfg = GLAConfig.preset("gla-340m", max_seq_len=2048)
m = GLATransformer.from_config(cfg).to("cuda", torch.bfloat16).eval()
STEPS = 64


@torch.inference_mode()
def run(ids, forced=None, **kw):
    logits, state = m(ids, None, logits_to_keep=1)
    dec = StaticDecoder(m, state, **kw)
    tok, toks, outs = logits[:, -1].float().argmax(-1), [], []
    for i in range(STEPS):
        toks.append(tok)
        out = dec.step(tok if forced is None else forced[:, i]).float().clone()
        outs.append(out)
        tok = out.argmax(-1)
    return torch.stack(toks, 1), torch.stack(outs, 1)


for B in [int(b) for b in sys.argv[1:]] or (1, 16, 64):
    ids = torch.randint(0, cfg.vocab_size, (B, 512), device="cuda")
    ref_tok, ref = run(ids, capture=False)
    top2 = ref.topk(2, -1).values
    margin = top2[..., 0] - top2[..., 1]
    kinds = {"fused": dict(capture=True, fused=True)}
    if B <= 16:
        kinds["compiled"] = dict(capture=True, compiled=True)
    for name, kw in kinds.items():
        free, _ = run(ids, **kw)
        _, forced = run(ids, forced=ref_tok, **kw)
        err = float(((forced - ref).abs().amax() / ref.abs().amax()))
        flip = forced.argmax(-1) != ref.argmax(-1)
        first = [int((r != s).nonzero()[0]) if not bool((r == s).all()) else -1 for r, s in zip(free, ref_tok)]
        print(f"B={B} {name}: logits max diff / max {err:.2e}; argmax flips {int(flip.sum())}/{flip.numel()}, "
              f"largest eager top-2 margin at a flip {float(margin[flip].max()) if flip.any() else 0:.3g} "
              f"(median margin {float(margin.median()):.3g}); free-running rows identical "
              f"{int((free == ref_tok).all(1).sum())}/{B}, first difference per row {first[:16]}", flush=True)
