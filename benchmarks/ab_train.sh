#!/usr/bin/env bash
# A/B of code variants in the training step, on the GPU machine, in one call:
#
#     bash benchmarks/ab_train.sh OUT [benchmarks/patches/NAME.patch ...]
#
# Runs `gla bench train` (arguments in $ARGS; default: gla-340m, B=8 T=2048, compiled blocks, bf16 weights, kernel
# profile) on this checkout ("head"), then once per patch with the patch applied to this checkout in place (and
# reverted after, also on failure), each in its own process with Inductor's caches off: with them on, every variant
# was served the first one's compiled code (benchmarks/NOTES.md, sixteenth session). Patched copies of the package
# elsewhere on PYTHONPATH were not what ran on the GPU machine (eighteenth session), hence in place. Writes
# OUT/NAME.md and OUT/NAME/train.json per variant, and OUT/kernels.md: for each variant the kernels that no other
# variant ran, so a patch that did not take effect shows as an empty list.
set -euo pipefail
out=$1
shift
mkdir -p "$out"
args=${ARGS:---device cuda --preset gla-340m --batch 8 --seq-len 2048 --models gla --modes blocks --weights bf16
             --steps 10 --profile}
export TORCHINDUCTOR_FORCE_DISABLE_CACHES=1

run() {  # name
    echo "== $1" >&2
    python3 -c "import gla.layers.gla_attention as m; print('imported', m.__file__)" >&2
    python3 -m gla.cli bench train $args --out "$out/$1" > "$out/$1.md"
}

run head
for patch in "$@"; do
    git apply "$patch"
    trap 'git apply -R "$patch"' EXIT
    run "$(basename "$patch" .patch)"
    git apply -R "$patch"
    trap - EXIT
done

python3 - "$out" head "$@" <<'EOF'
import json, os, sys
out, names = sys.argv[1], ["head"] + [os.path.basename(p)[:-len(".patch")] for p in sys.argv[3:]]
kernels = {}
for n in names:
    rows = json.load(open(os.path.join(out, n, "train.json")))
    kernels[n] = {p["name"] for r in rows for p in r.get("profile", [])}
with open(os.path.join(out, "kernels.md"), "w") as f:
    for n in names:
        only = sorted(kernels[n] - set().union(*(kernels[m] for m in names if m != n)))
        f.write(f"## {n}: {len(only)} kernels no other variant ran\n\n" + "".join(f"- {k}\n" for k in only) + "\n")
EOF
cat "$out"/*.md
