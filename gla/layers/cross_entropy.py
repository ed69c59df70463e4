"""The language-model head and its cross-entropy in one pass over row blocks, never holding all the logits.

At GLA-340M's training shape (B=8, T=2048, vocabulary 32000) the plain head + loss keeps bf16 logits [16384, 32000]
(1 GiB) for the backward and makes an fp32 copy and its gradient (2 GiB each). Here each block of rows computes its
logits, its loss and, while the logits are at hand, its gradients (dlogits = softmax - onehot): the backward only
scales the two stored gradients, so no matmul is repeated. The same idea as Liger's fused linear cross-entropy
(Hsu et al., "Liger Kernel", 2024), in plain torch so that it runs on a CPU and under any accelerator.
"""
from __future__ import annotations

import torch

# fp32 logits per block: 2^26 bytes (64 MiB) whatever the vocabulary, so peak memory does not grow with B * T
BLOCK_BYTES = 1 << 26
# Inductor fuses the fp32 sum of the blocks' weight-gradient products into one kernel that reads them all, so every
# block's [vocab, d] product is alive at once (gla-340m, B=8 T=2048: 32 x 62.5 MiB; the H100's step peaked 2.0 GiB
# above what its forward kept). Capping the buffers of a fused kernel keeps that sum in kernels of a few
# blocks each, run as their blocks finish (CPU, same graph: 2.1 -> 0.95 GiB above the inputs; eager 0.65).
FUSED_BUFFERS = 10


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul would run in as an nn.Linear: autocast's, else the promotion of both."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, dtype: torch.dtype, rows: int, need_h: bool,
                need_w: bool):
        # Out of place throughout: under torch 2.11's compile, writes into tensors created here (a slice assignment
        # into a preallocated gradient) were lost, and the compiled model trained with zero gradients.
        w = weight.to(dtype)
        x = h.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        need_grad = need_h or need_w
        grad_hs, grad_w = [], None
        for i in range(0, x.shape[0], rows):
            xi, yi = x[i:i + rows], targets[i:i + rows]
            logits = (xi @ w.t()).float()  # as the unfused head: logits in the compute dtype, the loss in fp32
            keep = yi != ignore_index
            safe = torch.where(keep, yi, 0).unsqueeze(1)
            lse = torch.logsumexp(logits, dim=-1)
            total = total + torch.where(keep, lse - logits.gather(1, safe).squeeze(1), 0.0).sum()
            if need_grad:  # dlogits = softmax - onehot(target), zero on ignored rows
                probs = torch.exp(logits - lse.unsqueeze(1))
                d = (probs.scatter_add(1, safe, -keep.unsqueeze(1).to(probs.dtype)) * keep.unsqueeze(1)).to(dtype)
                if need_h:
                    grad_hs.append(d @ w)
                if need_w:  # each block's product rounded to the compute dtype once, the sum over blocks in fp32
                    part = (d.t() @ xi).float()
                    grad_w = part if grad_w is None else grad_w + part
        grad_h = (torch.cat(grad_hs) if grad_hs else torch.zeros_like(x)) if need_h else None
        if need_w and grad_w is None:  # no rows
            grad_w = torch.zeros(weight.shape, device=weight.device)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable  # the gradients were formed in the forward: no second order
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else (grad_h * grad_total).to(ctx.h_dtype),
                None if grad_w is None else (grad_w * grad_total).to(ctx.w_dtype),
                None, None, None, None, None, None)


def compile_options(options: dict) -> dict:
    """torch.compile arguments for ``linear_cross_entropy``: ``options`` plus the cap on fused buffers above (left
    out for a backend other than Inductor, where the caller picks a mode, which excludes options, or where this
    Inductor lacks the setting); the caller's own Inductor options win."""
    import torch._inductor.config as inductor

    if (options.get("mode") is not None or options.get("backend", "inductor") != "inductor"
            or not hasattr(inductor, "max_fusion_unique_io_buffers")):
        return options
    extra = options.get("options") or {}
    return {**options, "options": {"max_fusion_unique_io_buffers": FUSED_BUFFERS, **extra}}


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         block_rows: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of the logits h @ weightᵀ against ``targets``, holding at most one block of logits.

    h: [..., d] hidden states; weight: [vocab, d] (the head's nn.Linear weight); targets: [...] long, the class of
    each row, ``ignore_index`` rows left out. Returns the fp32 sum over kept rows (0 when none is kept), equal to
    ``F.cross_entropy((h @ weight.T).float(), targets, reduction="sum")`` with the head's matmul in autocast's dtype
    when autocast is on. block_rows: rows per block (default: 64 MiB of fp32 logits; when every row fits in one
    default block, the plain head and loss run instead)."""
    if h.shape[:-1] != targets.shape:
        raise ValueError(f"targets must be h's shape without its last dim {tuple(h.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    if weight.dim() != 2 or weight.shape[1] != h.shape[-1]:
        raise ValueError(f"weight must be [vocab, {h.shape[-1]}], got {tuple(weight.shape)}")
    if targets.dtype != torch.long:
        raise ValueError(f"targets must be torch.long, got {targets.dtype}")
    rows = block_rows or max(1, BLOCK_BYTES // (4 * weight.shape[0]))
    grad = torch.is_grad_enabled()
    dtype = _compute_dtype(h, weight)
    with torch.autocast(h.device.type, enabled=False):
        if block_rows is None and h.numel() <= rows * h.shape[-1]:
            # all rows in one block: the plain head and loss hold no more than a block's logits and take fewer
            # operations (nanoGPT's CPU recipe, [768, 128] x vocabulary 256: 0.68 against 1.55 ms fwd+bwd)
            logits = (h.reshape(-1, h.shape[-1]).to(dtype) @ weight.to(dtype).t()).float()
            return torch.nn.functional.cross_entropy(logits, targets.reshape(-1), ignore_index=ignore_index,
                                                     reduction="sum")
        return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), ignore_index,
                                         dtype, rows, grad and h.requires_grad, grad and weight.requires_grad)
