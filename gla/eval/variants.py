"""The models a comparison trains per token mixer: one for each initial forget-gate bias asked for where the mixer
has a data-dependent gate (gla, seed), one otherwise; shared by `gla eval compare` and `gla eval mqar`."""
from __future__ import annotations

import math

from gla.layers.block import GATED_MIXERS


def mixer_variants(mixers, gate_bias_inits=(0.0,)) -> list[tuple[str, float]]:
    """(mixer, gate bias) pairs in the order given: every bias for the gated mixers, bias 0 (no gate to start) once
    for the others."""
    return [(m, float(b)) for m in mixers for b in (gate_bias_inits if m in GATED_MIXERS else (0.0,))]


def mixer_label(mixer: str, gate_bias_init: float) -> str:
    """A table row's name: the mixer, and its gate's initial bias where that is not the default 0."""
    return mixer if gate_bias_init == 0 else f"{mixer}, gate bias {float(gate_bias_init)!r}"


def parse_gate_biases(text: str, prog: str) -> tuple[float, ...]:
    """A --gate-bias-init value ("0,3") -> (0.0, 3.0); anything but distinct finite numbers exits naming prog."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values) or len(set(values)) != len(values):
        raise SystemExit(f"{prog}: --gate-bias-init must be distinct finite numbers, got {text!r}")
    return values
