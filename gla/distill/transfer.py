"""Distillation from a softmax teacher: the teacher model, stage 1 (attention transfer) and the KL term of stage 2.

Stage 1 (LoLCATs, Zhang et al. 2024, "attention transfer"): every GLA layer of the student sees the input its teacher
layer sees (the teacher's normalised hidden states at that layer) and is trained to give the teacher layer's output,
all layers at once, in the parameters that decide how the layer mixes tokens: the forget gate and per-head output
norm that conversion added, and the query and key projections (the role LoLCATs gives its trainable feature maps:
refitting them took the distilled all-GLA demo student from +10.1% to +6.9% over the teacher's loss). Stage 2
is ordinary training with kl_weight * KL(teacher || student) per token added to the next-token loss (Hinton et al.
2015), run by gla.training with ``teacher`` set.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F


def load_teacher(src: str):
    """A frozen GLATransformer for ``src``: a gla checkpoint, or a Hugging Face Llama / Qwen2 directory (as its
    all-softmax gla twin, whose logits equal the original's)."""
    from gla.models import GLATransformer, from_pretrained

    from .convert import HF_TYPES, _hf_teacher
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise FileNotFoundError(f"--teacher {src}: no config.json there")
    with open(os.path.join(src, "config.json")) as f:
        kind = json.load(f).get("model_type")
    if kind in HF_TYPES:
        cfg, weights = _hf_teacher(src)
        model = GLATransformer.from_state(cfg, weights, what=f"the weights in {src}")
    else:
        model = from_pretrained(src)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def kl_sum(student_logits, teacher_logits, targets, ignore_index: int, chunk: int = 4096) -> torch.Tensor:
    """Summed KL(teacher || student) over the positions with a target. logits: [B, T, vocab]; targets: [B, T].
    fp32 in chunks of ``chunk`` positions, so the temporaries stay [chunk, vocab] whatever the batch."""
    keep = (targets != ignore_index).flatten()
    s_all, t_all = student_logits.flatten(0, -2)[keep], teacher_logits.flatten(0, -2)[keep]
    total = student_logits.new_zeros((), dtype=torch.float32)
    for i in range(0, s_all.shape[0], chunk):
        t = F.log_softmax(t_all[i:i + chunk].float(), -1)
        s = F.log_softmax(s_all[i:i + chunk].float(), -1)
        total = total + F.kl_div(s, t, log_target=True, reduction="sum")
    return total


def transfer_parameters(student) -> list:
    """What stage 1 trains: the forget gates, output norms and query / key projections of the student's GLA
    layers."""
    return [p for layer in student.layers if layer.mixer == "gla"
            for m in (layer.attn.gk_proj, layer.attn.g_norm, layer.attn.q_proj, layer.attn.k_proj)
            for p in m.parameters()]


def _fit_output_scale(pairs, seen, cu) -> None:
    """Scale each GLA layer's output norm by the least-squares factor <y, y^T> / <y, y> on the first batch: its
    per-head RMSNorm leaves outputs of unit size where softmax attention averages values, and gradient steps alone
    would take long to close a gap of one or two orders of magnitude."""
    for i, (s, _) in enumerate(pairs):
        x, y = seen[i]
        out, _ = s.attn(x, cu_seqlens=cu, use_cache=False)
        scale = (out * y).sum() / out.square().sum().clamp_min(1e-12)
        s.attn.g_norm.weight.mul_(scale)


def attention_transfer(student, teacher, batches, lr: float, log=None) -> tuple[float, float]:
    """Stage 1 over ``batches`` (dicts with input_ids [B, T] and cu_seqlens or None, on the models' device).
    Returns the first and last relative output error, summed over GLA layers: sum_i |y_i - y_i^T|^2 / |y_i^T|^2."""
    if (len(student.layers), student.config.d_model) != (len(teacher.layers), teacher.config.d_model):
        raise ValueError("attention transfer needs a student converted from this teacher (gla convert): "
                         f"{len(student.layers)} layers of width {student.config.d_model} against the teacher's "
                         f"{len(teacher.layers)} of {teacher.config.d_model}")
    pairs = [(s, t) for s, t in zip(student.layers, teacher.layers) if s.mixer == "gla"]
    if not pairs:
        raise ValueError("the student has no GLA layer to transfer attention to")
    params = transfer_parameters(student)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    trainable = {id(p) for p in params}
    frozen = [p for p in student.parameters() if p.requires_grad and id(p) not in trainable]
    for p in frozen:  # no gradients for what stage 1 does not train (nor left behind for stage 2's first step)
        p.requires_grad_(False)
    seen = {}

    def hook(i):
        def record(_module, args, output):
            seen[i] = (args[0].detach(), output[0].detach())
        return record

    handles = [t.attn.register_forward_hook(hook(i)) for i, (_, t) in enumerate(pairs)]
    losses = []
    try:
        for n, batch in enumerate(batches):
            cu = batch["cu_seqlens"]
            with torch.no_grad():
                teacher(batch["input_ids"], cu_seqlens=cu, use_cache=False)
                if n == 0:
                    _fit_output_scale(pairs, seen, cu)
            loss = 0.0
            for i, (s, _) in enumerate(pairs):
                x, y = seen[i]
                out, _ = s.attn(x, cu_seqlens=cu, use_cache=False)
                loss = loss + (out - y).square().sum() / y.square().sum().clamp_min(1e-12)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if log is not None and (n == 0 or (n + 1) % 10 == 0):
                log(f"attention transfer {n + 1}: output error {losses[-1]:.4f} over {len(pairs)} GLA layers")
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        student.zero_grad(set_to_none=True)
    if not losses:
        raise ValueError("attention transfer needs at least one batch")
    return losses[0], losses[-1]
