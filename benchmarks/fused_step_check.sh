#!/usr/bin/env bash
# The fused decoding step (gla/decoding_fused.py) on the GPU machine, in one call:
#
#     bash benchmarks/fused_step_check.sh OUT
#
# 1. its tests with the GPU (programmatic dependent launch on: the interpreter never runs griddepcontrol);
# 2. `gla bench step-profile --fused-step`, B=1, 16 and 64, and B=1 and 16 on the tensor-core kernel;
# 3. greedy tokens of gla-340m (random weights, bf16, prompt 512, 128 new tokens) from the fused captured step
#    against the uncaptured static step, B=1, 16 and 64;
# 4. the compiled step's profile on this machine, and the generation tests with the GPU.
# What matters most comes first, as the call may be cut at its time limit.
# Writes OUT/tests.log, OUT/fused/, OUT/tokens.log, OUT/compiled/, OUT/tests_generation.log; prints summaries.
set -uo pipefail
out=$1
mkdir -p "$out"
GLA_TEST_GPU=1 timeout 150 python3 -m pytest -q -x tests/ops/test_decode_layer.py > "$out/tests.log" 2>&1
echo "tests rc=$?"; tail -3 "$out/tests.log"
profile() {  # fused|compiled
    flag=$([ $1 = fused ] && echo --fused-step)
    timeout 260 python3 -m gla.cli bench step-profile $flag --batch 1 --batch 16 --batch 64 --reps 200 --out "$out/$1" \
        > "$out/$1.log" 2>&1
    echo "$1 rc=$?"; head -8 "$out/$1.log"
}
profile fused
# the tensor-core kernel at every batch (ROWS_UNROLLED 0): which kernel serves 2-16 rows best
timeout 100 python3 -c "import sys, gla.ops.triton.decode_layer as dl; dl.ROWS_UNROLLED = 0
from gla.cli import main; sys.exit(main(sys.argv[1:]))" bench step-profile --fused-step --batch 1 --batch 16 \
    --reps 200 --out "$out/fused-mma" > "$out/fused-mma.log" 2>&1
echo "fused-mma rc=$?"; head -8 "$out/fused-mma.log"
timeout 120 python3 - > "$out/tokens.log" 2>&1 <<'PY'
import torch
from gla.decoding import StaticDecoder
from gla.models import GLAConfig, GLATransformer
torch.manual_seed(0)
cfg = GLAConfig.preset("gla-340m", max_seq_len=2048)
m = GLATransformer.from_config(cfg).to("cuda", torch.bfloat16).eval()
for B in (1, 16, 64):
    ids = torch.randint(0, cfg.vocab_size, (B, 512), device="cuda")
    outs = []
    for fused in (True, False):
        with torch.inference_mode():
            _, state = m(ids, None, logits_to_keep=1)
            dec = StaticDecoder(m, state, capture=fused, fused=fused)
            tok, seq = ids[:, -1], []
            for _ in range(128):
                tok = dec.step(tok).float().argmax(-1)
                seq.append(tok)
        outs.append(torch.stack(seq, 1))
    a, b = outs
    first = [int((r != s).nonzero()[0]) if not bool((r == s).all()) else -1 for r, s in zip(a, b)]
    print(f"B={B}: rows identical {int((a == b).all(1).sum())}/{B}; first differing position per row {first}")
PY
echo "tokens rc=$?"; cat "$out/tokens.log" | tail -4
profile compiled
GLA_TEST_GPU=1 timeout 150 python3 -m pytest -q -x tests/test_generation.py > "$out/tests_generation.log" 2>&1
echo "generation tests rc=$?"; tail -3 "$out/tests_generation.log"
