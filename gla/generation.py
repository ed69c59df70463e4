"""Sampling and streaming generation: prefill in chunks, then one recurrent step per token.

For a GLA-only model the memory used does not grow with the context: each layer keeps a [B, H, K, V] state.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

from gla.decoding import decoder_for, static_by_default, static_state
from gla.layers.gemv import gemv_linears
from gla.models.config import is_int, is_real

EOS_CHECK = 16  # steps between checks that every row has finished, on a GPU (each check waits for it)


def _left_pad(prompts, pad_id: int, device):
    """A list of token lists of different lengths -> (ids [B, T], attention_mask [B, T]), padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), T, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.as_tensor(p, dtype=torch.long, device=device)
        mask[i, T - len(p):] = 1
    return ids, mask


def sample_next(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator=None):
    """logits: [B, vocab] -> next tokens [B]. temperature 0 is greedy; top_k / top_p filter before sampling."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    # shifted to a maximum of 0 first: a tiny temperature then sends the others to -inf, not every logit to +-inf
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def check_sampling(temperature, top_k, top_p) -> None:
    """ValueError unless temperature is a finite number >= 0, top_k None or an int >= 1, top_p None or in (0, 1]."""
    if not (is_real(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None:
        _count("top_k", top_k, 1)
    if top_p is not None and not (is_real(top_p) and 0 < top_p <= 1):  # NaN fails the range
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def _count(name: str, value, least: int) -> None:
    if not (is_int(value) and value >= least):
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def _prepare(model, input_ids, attention_mask):
    """(ids [B, T] long, mask [B, T] or None) on the model's device, the token ids checked against its vocabulary
    (one read of their range per request: out of range, the embedding would fail on a CPU and assert on a GPU)."""
    device = next(model.parameters()).device
    if isinstance(input_ids, (list, tuple)):
        if attention_mask is not None:
            raise ValueError("attention_mask is built from the prompt lengths when prompts are given as lists")
        ids, mask = _left_pad([list(p) for p in input_ids], 0, device)
    else:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a [B, T] tensor with T >= 1, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else input_ids!r}")
        if input_ids.dtype.is_floating_point or input_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        ids = input_ids.to(device, torch.long)
        mask = None if attention_mask is None else attention_mask.to(device)
    vocab = model.embeddings.num_embeddings
    lo, hi = torch.aminmax(ids)
    if bool((lo < 0) | (hi >= vocab)):  # one read back
        raise ValueError(f"token ids must be in [0, {vocab}) (the model's vocabulary), got {int(lo)}..{int(hi)}")
    return ids, mask


PREFILL_CUDA_TOKENS = 32768
"""Tokens (batch x positions) per prefill forward on a GPU. A forward at B=1 costs about the same up to thousands
of positions (gla-340m on an H100: 30 ms to the first token after 512 tokens; after 32,768, 392 ms in 2,048-token
pieces and 107 ms in one), so few long pieces beat many short ones; the cap bounds the activations of a large
batch."""


def prefill_tokens(ids) -> int:
    """Positions per prefill forward for ids [B, T]: 2,048 on a CPU (where a softmax layer's attention may be the
    quadratic math kernel), on a GPU PREFILL_CUDA_TOKENS // B (at least 2,048)."""
    if ids.device.type != "cuda":
        return 2048
    return max(2048, PREFILL_CUDA_TOKENS // max(ids.shape[0], 1))


def _request(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, prefill_chunk):
    """A request's arguments checked (ValueError naming the bad one) and its prompt prepared: (ids, mask)."""
    _count("max_new_tokens", max_new_tokens, 0)
    check_sampling(temperature, top_k, top_p)
    if prefill_chunk is not None:
        _count("prefill_chunk", prefill_chunk, 1)
    return _prepare(model, input_ids, attention_mask)


def stream(model, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, eos_token_id: int | None = None, attention_mask=None,
           prefill_chunk: int | None = None, generator=None, cuda_graph: bool | None = None,
           compile_step: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, [B] long, one step at a time.

    input_ids: [B, T] (with attention_mask [B, T] for left-padded rows) or a list of token lists of different
    lengths. Rows that produced eos_token_id keep yielding it; the stream ends once every row has (checked every
    step on the CPU, every EOS_CHECK steps on a GPU, where each check waits for the GPU).
    cuda_graph: decode on a static state (gla.decoding), the step captured as a CUDA graph on a GPU (run in place,
    uncaptured, on a CPU); None = a plain GLATransformer, on a CPU only without softmax layers
    (decoding.static_by_default; on a 2-core CPU the static step took 1.52 against the plain loop's 1.65 ms per token
    at the demo model, 59.2 against 61.0 at gla-340m). On a GPU the captured step is the fused Triton step
    (gla.decoding_fused: five kernels per layer) where it serves the model, else the model's own step.
    compile_step: the model's own step goes through torch.compile first instead (fused kernels, matmuls autotuned:
    244 kernels per token at gla-340m where the uncompiled step has 1,073; 39 s of compilation at B=1 on an H100).
    Either way the logits differ from the eager step's by 16-bit rounding, so greedy tokens may too. Bad arguments
    raise ValueError here, at the call, not at the first token.
    """
    ids, mask = _request(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, prefill_chunk)
    return _decode(model, ids, mask, max_new_tokens, temperature, top_k, top_p, eos_token_id, prefill_chunk,
                   generator, cuda_graph, compile_step)


@torch.inference_mode()
def _decode(model, ids, mask, max_new_tokens, temperature, top_k, top_p, eos_token_id, prefill_chunk, generator,
            cuda_graph, compile_step) -> Iterator[torch.Tensor]:
    """``stream``'s tokens for a checked request (``_request``)."""
    prefill_chunk = prefill_chunk or prefill_tokens(ids)
    was_training = model.training
    model.eval()
    linears = contextlib.ExitStack()
    decoder = None
    try:
        if ids.device.type == "cpu":  # decoding's few-row linear layers at the memory's speed (gla.layers.gemv)
            linears.enter_context(gemv_linears(model))
        state, logits = None, None
        for s in range(0, ids.shape[1], prefill_chunk):  # through forward (wrappers such as FSDP hook it)
            piece = slice(s, s + prefill_chunk)
            logits, state = model(ids[:, piece], state, attention_mask=None if mask is None else mask[:, piece],
                                  logits_to_keep=1)  # only the prompt's last position is sampled from
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        if cuda_graph is None:
            cuda_graph = static_by_default(model, ids.device) or (compile_step and static_state(model))
        if compile_step and not cuda_graph:
            raise ValueError("compile_step compiles the static decoding step: it needs cuda_graph")
        decoder = (decoder_for(model, state, capture=ids.device.type == "cuda", compiled=compile_step,
                               new_tokens=max_new_tokens) if cuda_graph else None)
        check = EOS_CHECK if ids.device.type == "cuda" else 1
        logits = logits[:, -1]
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, eos_token_id, nxt)
                done |= nxt == eos_token_id
            yield nxt
            if eos_token_id is not None and (i + 1) % check == 0 and bool(done.all()):
                return
            if i + 1 == max_new_tokens:
                return
            if decoder is not None:
                logits = decoder.step(nxt)
            else:
                logits, state = model(nxt.unsqueeze(1), state)
                logits = logits[:, -1]
    finally:
        if decoder is not None:
            decoder.busy = False
        linears.close()
        model.train(was_training)


def generate(model, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | None = None, attention_mask=None, callback=None,
             prefill_chunk: int | None = None, generator=None, cuda_graph: bool | None = None,
             compile_step: bool = False) -> torch.Tensor:
    """Generate up to max_new_tokens tokens; returns ids [B, T + new] (prompts left-padded with 0 when given as
    lists of different lengths). callback(tokens [B]) is called on every new token (streaming output)."""
    ids, mask = _request(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, prefill_chunk)
    out = [ids]
    for tok in _decode(model, ids, mask, max_new_tokens, temperature, top_k, top_p, eos_token_id, prefill_chunk,
                       generator, cuda_graph, compile_step):
        out.append(tok.unsqueeze(1))
        if callback is not None:
            callback(tok)
    return torch.cat(out, 1)
