"""Saved progress of one MQAR group (``train_group``), so a group longer than one sitting trains on where it
stopped: a GPU call with a time limit, or a machine lost midway.

A state file holds the group's identity (every setting that decides what it trains), then either its progress
(step, wall seconds so far, each model's weights, optimizer state, last loss and stopping step) or, once the group
has finished, its results. Batches need no saved random state: step s of seed k always trains on the batch drawn
from seed k * SEED_STRIDE + s. Files are written atomically (a temporary file, then a rename) and read with
``torch.load(weights_only=True)``, so loading one runs no code from it.
"""
from __future__ import annotations

import dataclasses
import os

import torch

VERSION = 1


def group_identity(specs, **settings) -> dict:
    """What a state must match to continue: the models (mixer, width, rate, gate bias) and the training settings."""
    models = [{"mixer": s["mixer"], "d_model": int(s["d_model"]), "lr": float(s["lr"]),
               "gate_bias_init": float(s.get("gate_bias_init", 0.0))} for s in specs]
    return {"version": VERSION, "models": models, **settings}


def load(path: str, identity: dict) -> dict | None:
    """The state saved at path for this group, or None if there is none; another group's state or an unreadable
    file is a clear error rather than a silent fresh start."""
    if not os.path.exists(path):
        return None
    try:
        # mapped, not read: the grid's check of every group's state before training costs no copy of the weights
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, not a torch file, or holding objects weights_only refuses
        raise ValueError(f"{path}: not a readable MQAR group state ({type(e).__name__}: {e})") from None
    saved = state.get("identity") if isinstance(state, dict) else None
    if saved != identity:
        changed = sorted(k for k in set(identity) | set(saved or {}) if (saved or {}).get(k) != identity.get(k))
        raise ValueError(f"{path} holds another MQAR group (differs in {changed})")
    return state


def _write(path: str, state: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def save_progress(path: str, identity: dict, step: int, seconds: float, members) -> None:
    """members: the group's _Member list, after `step` steps (the caller has waited for the device)."""
    _write(path, {"identity": identity, "step": step, "seconds": seconds,
                  "members": [{"model": m.model.state_dict(), "opt": m.opt.state_dict(), "stopped_at": m.stopped_at,
                               "loss": None if m.loss is None else float(m.loss.item())} for m in members]})


def restore(state: dict, members, device) -> tuple[int, float]:
    """Loads saved progress into freshly built members; returns (steps done, wall seconds spent)."""
    for m, saved in zip(members, state["members"], strict=True):
        m.model.load_state_dict(saved["model"])
        m.opt.load_state_dict(saved["opt"])
        for g in m.opt.param_groups:  # a captured step reads its learning rate from a device tensor
            if torch.is_tensor(g["lr"]):
                g["lr"] = g["lr"].to(device)
        m.stopped_at = saved["stopped_at"]
        m.loss = None if saved["loss"] is None else torch.tensor(saved["loss"], device=device)
    return int(state["step"]), float(state["seconds"])


def save_results(path: str, identity: dict, results) -> None:
    """A finished group keeps only its results (MQARResult list): a later call returns them without training."""
    _write(path, {"identity": identity, "results": [dataclasses.asdict(r) for r in results]})
