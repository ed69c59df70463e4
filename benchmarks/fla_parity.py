"""FLA parity: logits of FLA's GLAForCausalLM vs gla.from_pretrained on the same checkpoint.

For each case, a small FLA GLAConfig is built with random weights (every parameter perturbed, so norms and gate
biases are not at their ones / zeros init and a mis-mapped weight shows), saved with FLA's save_pretrained, loaded
with gla.from_pretrained, and both models run on the same random ids, float32. Sequence lengths 50 (FLA takes its
fused_recurrent path, T <= 64) and 300 (its chunk path). Reports max |diff| and the relative error
||ours - fla|| / ||fla|| per case.

    python benchmarks/fla_parity.py [--device cuda|cpu] [--cases base,tied,...] [--out DIR]

Needs FLA (fla-core + flash-linear-attention 0.6.0, einops, transformers 5) importable. On the GPU machine
(see ../shared/ANCHORS.md): carry `.whl` holding the FLA and einops wheels and run
`python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site python3
benchmarks/fla_parity.py --device cuda --out $OUT`.
--device cpu runs FLA's Triton kernels in Triton's interpreter (TRITON_INTERPRET=1, each autotuner keeps its first
config): slow but exact enough for a check without a GPU. FLA's softmax layers call flash_attn;
without it installed the hybrid case swaps in an SDPA stand-in for flash_attn_func (marked in the table).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

BASE = dict(hidden_size=128, num_heads=2, num_hidden_layers=2, vocab_size=257, fuse_cross_entropy=False)
CASES = {
    "base": {},
    "recurrent_mode": dict(attn_mode="fused_recurrent"),  # FLA's exact fp32 kernel also at T = 300
    "tied": dict(tie_word_embeddings=True),
    "conv_gqa": dict(use_short_conv=True, num_kv_heads=1, num_heads=4),
    "feature_clamp": dict(feature_map="relu", clamp_min=-0.05),
    "no_gate_unfused": dict(use_output_gate=False, fuse_norm=False),
    "unfused_no_affine": dict(fuse_norm=False, elementwise_affine=False),
    "ratio_expand": dict(hidden_ratio=3, expand_k=1.0, norm_eps=1e-5),
    "hybrid": dict(attn={"layers": [1], "num_heads": 4, "num_kv_heads": 2, "rope_theta": 500000.0}),
}
LENGTHS = (50, 300)


def _interpreter_mode():
    """Let FLA's kernels run on the CPU: Triton's interpreter, no autotuning (it needs a GPU benchmarker)."""
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.runtime.autotuner as autotuner

    from gla.ops.triton.utils import patch_interpreter_scalars

    patch_interpreter_scalars()
    # Every config "takes" the same time, so each autotuner keeps its first config without benchmarking.
    autotuner.Autotuner._bench = lambda self, *args, config=None, **kwargs: [0.0, 0.0, 0.0]


def _flash_attn_stand_in():
    """flash_attn_func(q, k, v, causal=True, window_size=(-1, -1)) -> o, on [B, T, H, D] tensors, via SDPA (full
    causal attention only: what FLA's Attention calls for a whole sequence without padding)."""
    import torch.nn.functional as F

    def flash_attn_func(q, k, v, causal=True, window_size=(-1, -1), **_):
        if tuple(window_size) != (-1, -1) or not causal:
            raise NotImplementedError("the SDPA stand-in only does full causal attention")
        rep = q.shape[2] // k.shape[2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)

    return flash_attn_func


def run_case(name, device, workdir):
    import torch
    from fla.models import GLAConfig as FLAConfig
    from fla.models import GLAForCausalLM

    import gla

    stand_in = False
    if "attn" in CASES[name]:
        import fla.layers.attn as fla_attn
        if fla_attn.flash_attn_func is None:
            fla_attn.flash_attn_func, stand_in = _flash_attn_stand_in(), True
    torch.manual_seed(0)
    # FLA's chunk kernels do not run in Triton's interpreter; its fused_recurrent kernel computes the same thing.
    mode = {"attn_mode": "fused_recurrent"} if device == "cpu" else {}
    fla_config = FLAConfig(**{**BASE, **mode, **CASES[name]})
    fla_model = GLAForCausalLM(fla_config).to(device=device, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in fla_model.parameters():  # off the init values, so every weight's mapping matters
            p.add_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.02))
    path = os.path.join(workdir, name)
    fla_model.save_pretrained(path)
    ours = gla.from_pretrained(path, map_location=device).eval()
    rows = []
    for T in LENGTHS:
        ids = torch.randint(0, BASE["vocab_size"], (2, T), device=device)
        with torch.no_grad():
            ref = fla_model(ids).logits.float()
            out = ours(ids)[0].float()
        diff = (out - ref).double()
        rows.append(dict(case=name + (" (SDPA stand-in)" if stand_in else ""), T=T,
                         max_abs=diff.abs().max().item(), rel=(diff.norm() / ref.double().norm()).item(),
                         logit_std=ref.std().item()))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {list(CASES)}")
    ap.add_argument("--out", default=None, help="directory for fla_parity.md and fla_parity.json")
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown cases {unknown}; choose from {list(CASES)}")
    if args.device == "cpu":
        _interpreter_mode()
    try:
        import fla  # noqa: F401
    except ImportError as e:
        sys.exit(f"FLA is not importable ({e}); install fla-core and flash-linear-attention 0.6.0 (see --help)")
    rows, failures = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for name in cases:
            t0 = time.time()
            try:
                new = run_case(name, args.device, workdir)
            except Exception as e:  # report every case, not only the first failure
                new = []
                failures.append(f"{name}: {type(e).__name__}: {e}")
            rows += new
            # As each case ends, so a run stopped at a time limit still shows what it got.
            print(f"# {name}: {time.time() - t0:.1f} s " + " ".join(f"T={r['T']} rel={r['rel']:.2e}" for r in new)
                  + (f" FAILED {failures[-1]}" if not new else ""), flush=True)
    lines = ["| case | T | max abs diff | rel err | logit std |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['T']} | {r['max_abs']:.2e} | {r['rel']:.2e} | {r['logit_std']:.3f} |"
              for r in rows]
    lines += [f"\nFAILED {f}" for f in failures]
    text = f"FLA vs gla logits, float32, device {args.device}\n\n" + "\n".join(lines)
    print(text)
    if args.out:
        from gla.bench import write_report
        write_report(args.out, "fla_parity", text, {"rows": rows, "failures": failures})
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
