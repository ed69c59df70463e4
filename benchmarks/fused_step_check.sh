#!/usr/bin/env bash
# The fused decoding step (gla/decoding_fused.py) on the GPU machine, in one call:
#
#     bash benchmarks/fused_step_check.sh OUT
#
# 1. its tests with the GPU (programmatic dependent launch on: the interpreter never runs griddepcontrol);
# 2. `gla bench step-profile --fused-step`, B=1, 2, 4, 16 and 64, and B=2 and 4 on the unrolled kernel;
# 3. gla-340m (random weights, bf16, prompt 512, 64 new tokens): the fused and the compiled captured steps against
#    the uncaptured eager step, free-running greedy tokens and logits on the eager step's tokens, B=1, 16 and 64;
# 4. the compiled step's profile on this machine, and the generation tests with the GPU.
# What matters most comes first, as the call may be cut at its time limit.
# Writes OUT/tests.log, OUT/fused/, OUT/tokens.log, OUT/compiled/, OUT/tests_generation.log; prints summaries.
set -uo pipefail
out=$1
mkdir -p "$out"
GLA_TEST_GPU=1 timeout 150 python3 -m pytest -q -x tests/ops/test_decode_layer.py > "$out/tests.log" 2>&1
echo "tests rc=$?"; tail -3 "$out/tests.log"
profile() {  # fused|compiled "--batch B ..."
    flag=$([ $1 = fused ] && echo --fused-step)
    timeout 260 python3 -m gla.cli bench step-profile $flag $2 --reps 200 --out "$out/$1" > "$out/$1.log" 2>&1
    echo "$1 rc=$?"; grep -E "^\| [0-9]" "$out/$1.log"
}
profile fused "--batch 1 --batch 2 --batch 4 --batch 16 --batch 64"
# the unrolled kernel at 2 and 4 rows (ROWS_UNROLLED 4; the default serves them on tensor cores)
timeout 100 python3 -c "import sys, gla.ops.triton.decode_layer as dl; dl.ROWS_UNROLLED = 4
from gla.cli import main; sys.exit(main(sys.argv[1:]))" bench step-profile --fused-step --batch 2 --batch 4 \
    --reps 200 --out "$out/fused-unrolled" > "$out/fused-unrolled.log" 2>&1
echo "fused-unrolled rc=$?"; grep -E "^\| [0-9]" "$out/fused-unrolled.log"
timeout 240 python3 benchmarks/fused_tokens.py > "$out/tokens.log" 2>&1
echo "tokens rc=$?"; cat "$out/tokens.log" | tail -4
profile compiled "--batch 1 --batch 16 --batch 64"
GLA_TEST_GPU=1 timeout 150 python3 -m pytest -q -x tests/test_generation.py > "$out/tests_generation.log" 2>&1
echo "generation tests rc=$?"; tail -3 "$out/tests_generation.log"
