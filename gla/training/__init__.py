"""Training: the loop behind `gla train`, checkpoints with exact resume, data-parallel wrappers."""
from .config import TrainConfig, lr_at
from .trainer import Trainer, resume_config, train

__all__ = ["TrainConfig", "lr_at", "Trainer", "resume_config", "train"]
