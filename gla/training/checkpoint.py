"""Atomic, resumable checkpoints in a run directory.

    RUN/checkpoint/   config.json + model.safetensors (save_pretrained), train_state.pt, train_config.json,
                      [tokenizer.json], [lora.safetensors: adapters of a --lora run, gla.distill.lora]
                      -- swapped in whole with directory renames, so a crash never leaves a mix
    RUN/              copies of config.json, model.safetensors, train_config.json, [tokenizer.json] for inference

train_state.pt holds only plain tensors, numbers, strings, lists and dicts (optimizer moments, step, RNG and data
positions), read back with torch.load(weights_only=True): loading a checkpoint never unpickles arbitrary objects.
Weights and optimizer state are saved whole (gathered from FSDP shards), so a run can resume on any number of
processes, and the model directory is an ordinary `gla.from_pretrained` checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

CKPT, STATE, TRAIN_CONFIG = "checkpoint", "train_state.pt", "train_config.json"
INFERENCE_FILES = ("config.json", "model.safetensors", TRAIN_CONFIG, "tokenizer.json")
FORMAT = 1
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def build_model(model_cfg):
    """A fresh GLATransformer for a GLAConfig (the one place the trainer constructs models)."""
    from gla.models import GLATransformer
    return GLATransformer.from_config(model_cfg)


def load_model(path: str):
    """A plain GLATransformer from a checkpoint or run directory, on CPU."""
    from gla.models import from_pretrained
    return from_pretrained(path)


def find(run_dir: str) -> str | None:
    """The complete checkpoint directory of a run, or None. Falls back to the previous one when a crash hit the
    moment between the two renames of a swap."""
    for name in (CKPT, f".{CKPT}.old"):
        path = os.path.join(run_dir, name)
        if os.path.isfile(os.path.join(path, STATE)):
            return path
    return None


def save(run_dir: str, model: nn.Module, plain: nn.Module | None, optimizer, train_state: dict, train_cfg: dict,
         tokenizer, d) -> None:
    """Collective under data parallelism (every rank calls it); rank 0 writes.

    plain: the unwrapped model when it holds full parameters (single process, DDP); None under FSDP, where the
    gathered weights are loaded into a fresh model for save_pretrained.
    """
    msd = get_model_state_dict(model, options=_FULL)
    osd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if d.main:
        tmp, cur, old = (os.path.join(run_dir, n) for n in (f".{CKPT}.tmp", CKPT, f".{CKPT}.old"))
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        from gla.distill import lora
        from gla.models import GLATransformer
        if plain is None:   # built without drawing from rank 0's RNG: its dropout stream must not move here
            plain = GLATransformer.from_state(model.config, msd, what="gathered FSDP weights")
        if lora.has_lora(plain):  # the merged model for inference, the adapters beside it for resuming
            lora.save_adapters(plain, tmp)
            plain = GLATransformer.from_state(plain.config, lora.merged_state(plain), what="merged LoRA weights")
        plain.save_pretrained(tmp)
        torch.save({"format": FORMAT, **train_state, "optimizer": osd}, os.path.join(tmp, STATE))
        tok_file = tokenizer.save(tmp)   # "bytes", or the name of the copied tokenizer.json
        with open(os.path.join(tmp, TRAIN_CONFIG), "w") as f:
            json.dump({**train_cfg, "tokenizer": tok_file}, f, indent=2)
        if os.path.isdir(cur):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(cur, old)
        os.replace(tmp, cur)
        shutil.rmtree(old, ignore_errors=True)
        for name in INFERENCE_FILES:
            src = os.path.join(cur, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(run_dir, f".{name}.tmp"))
                os.replace(os.path.join(run_dir, f".{name}.tmp"), os.path.join(run_dir, name))
    d.barrier()


def read_state(ckpt_dir: str) -> dict:
    """train_state.pt of a checkpoint directory, loaded without unpickling objects."""
    path = os.path.join(ckpt_dir, STATE)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {STATE} in {ckpt_dir}: not a training checkpoint") from None
    except Exception as e:  # truncated zip, foreign pickle, ...
        raise ValueError(f"{path} is corrupted or not a gla training state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "optimizer" not in state:
        raise ValueError(f"{path} is not a gla training state (format {FORMAT})")
    return state


def restore(ckpt_dir: str, model: nn.Module, optimizer) -> dict:
    """Load weights and optimizer state into the (possibly wrapped) model; returns the rest of train_state."""
    from gla.distill import lora
    state = read_state(ckpt_dir)
    try:
        weights = load_model(ckpt_dir).state_dict()
        if lora.has_lora(model):
            weights = lora.training_state(get_model_state_dict(model).keys(), weights, ckpt_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"cannot resume from {ckpt_dir}: {e}") from None
    try:
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(model, optimizer, state.pop("optimizer"),
                                 options=StateDictOptions(full_state_dict=True))
    except (RuntimeError, KeyError, ValueError) as e:
        raise ValueError(f"checkpoint {ckpt_dir} does not match this model/optimizer "
                         f"(changed model flags?): {e}") from None
    return state


def read_train_config(run_dir: str) -> dict:
    from gla.models.transformer import read_json
    return read_json(os.path.join(run_dir, TRAIN_CONFIG), "a gla training run")
