"""The models a comparison trains per token mixer: one for each initial forget-gate bias asked for where the mixer
has a data-dependent gate (gla, seed), one otherwise; shared by `gla eval compare` and `gla eval mqar`."""
from __future__ import annotations

import math

from gla.layers.block import GATED_MIXERS


def check_gate_biases(values) -> None:
    """Initial gate biases are distinct finite numbers, at least one (a repeat would train a model twice)."""
    ok = len(values) > 0 and len(set(values)) == len(values)
    if not ok or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise ValueError(f"gate biases must be distinct finite numbers, got {values}")


def mixer_variants(mixers, gate_bias_inits=(0.0,)) -> list[tuple[str, float]]:
    """(mixer, gate bias) pairs in the order given: every bias for the gated mixers, bias 0 (no gate to start) once
    for the others."""
    check_gate_biases(tuple(gate_bias_inits))
    return [(m, float(b)) for m in mixers for b in (gate_bias_inits if m in GATED_MIXERS else (0.0,))]


def mixer_label(mixer: str, gate_bias_init: float) -> str:
    """A table row's name: the mixer, and its gate's initial bias where that is not the default 0."""
    return mixer if gate_bias_init == 0 else f"{mixer}, gate bias {float(gate_bias_init)!r}"


def variant_slug(mixer: str, gate_bias_init: float) -> str:
    """The same as a name without spaces, for run directories and progress lines: "gla", "gla-bias3.0"."""
    return mixer if gate_bias_init == 0 else f"{mixer}-bias{float(gate_bias_init)!r}"


def parse_gate_biases(text: str, prog: str) -> tuple[float, ...]:
    """A --gate-bias-init value ("0,3") -> (0.0, 3.0); anything but distinct finite numbers exits naming prog."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
        check_gate_biases(values)
    except ValueError:
        raise SystemExit(f"{prog}: --gate-bias-init must be distinct finite numbers, got {text!r}") from None
    return values
