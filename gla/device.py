"""The --device / TrainConfig.device names: "auto" or any name torch.device reads."""
from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """"auto" -> the GPU when CUDA is available, else the CPU; any other name (cpu, cuda, cuda:1) as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
