"""TrainConfig: every `gla train` setting, saved in the run directory (train_config.json) for exact resume."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from gla.layers.block import GATED_MIXERS
from gla.models.config import check_field_types

# overrides of the preset's GLAConfig fields
MODEL_FLAGS = ("d_model", "n_layers", "n_heads", "d_ff", "dropout", "mixer", "gate_bias_init")
PARALLEL = ("none", "ddp", "fsdp")
DTYPES = ("auto", "fp32", "bf16")
COMPILE = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """Training run settings. batch_size is the global number of sequences per optimizer step, split over
    grad_accum micro-steps and the data-parallel processes; seq_len is tokens per sequence."""
    out: str = "runs/gla"
    data: str = "shakespeare"
    tokenizer: str = "bytes"
    preset: str = "demo"
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    d_ff: int | None = None
    dropout: float | None = None
    mixer: str | None = None         # token mixer of every layer: gla (preset default), linear, retnet, seed, softmax
    gate_bias_init: float | None = None  # initial bias of the forget gate (gla, seed); the preset's is 0, as FLA's
    seq_len: int = 256
    batch_size: int = 32
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 1e-3
    min_lr: float | None = None      # end of the cosine; default lr / 10
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0           # 0 disables clipping (the norm is still checked for non-finite values)
    nonfinite_limit: int = 10        # stop after this many steps in a row with a non-finite loss or gradient
    val_fraction: float = 0.1
    eval_every: int = 250
    eval_batches: int = 20
    ckpt_every: int | None = None    # default: eval_every
    log_every: int = 10
    sample_tokens: int = 300
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"              # auto: bf16 autocast on CUDA and on CPUs with fast bf16 matmuls, else fp32
    compile: str = "auto"            # torch.compile each layer and the loss (compile_blocks); auto: on for CUDA
    parallel: str = "none"
    checkpoint_activations: bool = False  # recompute each layer's activations in the backward (long sequences)
    memory_budget: float = 1.0       # compiled layers keep this fraction of their activations for the backward
    init_from: str | None = None     # a model directory whose architecture and weights start the run (gla distill)
    teacher: str | None = None       # distil: add kl_weight * KL(teacher || model) per token to the loss
    kl_weight: float = 3.0           # measured better than 1 for both demo students (docs/distill.md)
    transfer_steps: int = 0          # distil stage 1: attention-transfer steps before training (needs teacher)
    lora: int = 0                    # distil stage 2: LoRA adapters of this rank on the GLA layers (0: full)

    def __post_init__(self):
        check_field_types(self, flags=True)  # a resumed run reads these from train_config.json
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "eval_batches", "log_every",
                     "nonfinite_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.ckpt_every is not None and self.ckpt_every < 1:
            raise ValueError(f"--ckpt-every must be >= 1, got {self.ckpt_every}")
        min_lr_ok = self.min_lr is None or 0 <= self.min_lr <= self.lr
        if not (math.isfinite(self.lr) and self.lr > 0 and min_lr_ok):
            raise ValueError(f"need a finite lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not (0 <= self.grad_clip < math.inf and 0 <= self.weight_decay < math.inf):  # NaN fails both too
            raise ValueError(f"--grad-clip and --weight-decay must be finite and >= 0, got {self.grad_clip}, "
                             f"{self.weight_decay}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"--parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.compile not in COMPILE:
            raise ValueError(f"--compile must be one of {COMPILE}, got {self.compile!r}")
        if self.gate_bias_init is not None:
            if not math.isfinite(self.gate_bias_init):
                raise ValueError(f"--gate-bias-init must be a finite number, got {self.gate_bias_init!r}")
            if self.gate_bias_init != 0 and self.mixer is not None and self.mixer not in GATED_MIXERS:
                raise ValueError(f"--gate-bias-init sets the forget gate of {' and '.join(GATED_MIXERS)} layers; "
                                 f"--mixer {self.mixer} has none")
        from gla.models.config import PRESETS
        if self.preset not in PRESETS:  # checked here, before any data or model is loaded
            raise ValueError(f"--preset {self.preset!r} is not a preset; choose from {', '.join(sorted(PRESETS))}")
        if self.init_from is not None and self.model_overrides():
            raise ValueError(f"--init-from takes its architecture from {self.init_from}: leave out "
                             f"{', '.join('--' + k.replace('_', '-') for k in self.model_overrides())}")
        if not 0 < self.memory_budget <= 1:
            raise ValueError(f"--memory-budget must be in (0, 1], got {self.memory_budget}")
        if not (0 <= self.kl_weight < math.inf) or self.transfer_steps < 0 or self.lora < 0:  # NaN fails too
            raise ValueError("--kl-weight (finite), --transfer-steps and --lora must be >= 0")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.lora and (self.init_from is None or self.parallel == "fsdp"):
            raise ValueError("--lora adapts a converted student (--student / --init-from), on one process or DDP "
                             "(FSDP shards frozen and trained weights alike)")
        if self.transfer_steps and (self.teacher is None or self.init_from is None):
            raise ValueError("--transfer-steps needs a --teacher and a converted student (--student / --init-from)")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"--batch-size {self.batch_size} is not divisible by --grad-accum {self.grad_accum}")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        from gla.models.config import strict_from_dict
        return strict_from_dict(cls, d, "training settings")

    def model_overrides(self) -> dict:
        return {k: getattr(self, k) for k in MODEL_FLAGS if getattr(self, k) is not None}


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to final_lr."""
    import math
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    t = min(1.0, (step - cfg.warmup) / span)
    return cfg.final_lr + 0.5 * (1 + math.cos(math.pi * t)) * (cfg.lr - cfg.final_lr)
