"""GLATransformer: a decoder-only language model of GLA layers, optionally hybrid with softmax layers."""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.utils.checkpoint

from gla.layers import GLALayer
from gla.layers.cross_entropy import compile_options, linear_cross_entropy
from gla.layers.gla_attention import GateProj, GLAState
from gla.layers.softmax import KVCache, StaticKVCache
from gla.layers.norm import make_norm
from gla.layers.packing import packed_info
from gla.ops import validate_cu_seqlens
from .config import GLAConfig
from .state import ModelState

WEIGHTS, CONFIG = "model.safetensors", "config.json"
MODEL_TYPE = "gla_lm"  # our Hugging Face model_type; FLA's is "gla"


def partitioning(memory_budget: float = 1.0):
    """Context manager: how the layers that ``compile_blocks`` compiled split their graphs into forward and backward,
    read when a layer's first training call compiles. Elementwise results that only feed matmuls (the normalised
    inputs of the projections, SwiGLU's product, the gated head output, the fp32 gate) are recomputed in the
    backward from tensors kept anyway, instead of kept themselves, which torch's partitioner bans by default
    (ban_recompute_materialized_backward): at gla-340m 28.8 instead of 42.4 KB per token and layer are kept. Measured
    on an H100 (B=8 T=2048, bf16 weights): peak 20.1 -> 15.0 GiB for 97.3 -> 98.9 ms per step (benchmarks/NOTES.md).
    memory_budget < 1: torch's activation_memory_budget (recompute further, cheapest first)."""
    import torch._functorch.config  # not loaded by `import torch` (nor by gla's imports: gla.device.constant_to_compiler)
    return torch._functorch.config.patch(activation_memory_budget=memory_budget,
                                         ban_recompute_materialized_backward=False)


class GLATransformer(nn.Module):
    """input_ids [B, T] -> logits [B, T, vocab_size], carrying a ModelState between calls.

    The seed's signature works (GLATransformer(vocab_size, d_model=512, ...)); options are GLAConfig fields, e.g.
    attn_layers=(3, 7) for softmax attention in layers 3 and 7. Submodule names follow FLA's GLAModel.
    """

    def __init__(self, vocab_size: int, d_model: int = 512, n_heads: int = 8, d_ff: int = 2048, n_layers: int = 6,
                 max_seq_len: int = 32768, dropout: float = 0.1, **options):
        super().__init__()
        cfg = GLAConfig(vocab_size=vocab_size, d_model=d_model, n_heads=n_heads, d_ff=d_ff, n_layers=n_layers,
                        max_seq_len=max_seq_len, dropout=dropout, **options)
        self.config = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList([self._layer(cfg, i) for i in range(cfg.n_layers)])
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embeddings.weight

    @staticmethod
    def _layer(cfg: GLAConfig, i: int) -> GLALayer:
        common = dict(dropout=cfg.dropout, mlp=cfg.mlp, norm=cfg.norm, norm_eps=cfg.norm_eps)
        mixer = cfg.mixer_of(i)
        if mixer == "softmax":
            return GLALayer(cfg.d_model, cfg.attn_heads or cfg.n_heads, cfg.d_ff, mixer="softmax",
                            num_kv_heads=cfg.attn_kv_heads, head_dim=cfg.attn_head_dim, qkv_bias=cfg.attn_qkv_bias,
                            rope_theta=cfg.rope_theta, qk_norm=cfg.attn_qk_norm, **common)
        return GLALayer(cfg.d_model, cfg.n_heads, cfg.d_ff, mixer=mixer, expand_k=cfg.expand_k,
                        expand_v=cfg.expand_v, num_kv_heads=cfg.num_kv_heads, feature_map=cfg.feature_map,
                        output_gate=cfg.output_gate, gate_low_rank_dim=cfg.gate_low_rank_dim,
                        gate_logit_normalizer=cfg.gate_logit_normalizer, clamp_min=cfg.clamp_min,
                        gate_bias_init=cfg.gate_bias_init,
                        use_short_conv=cfg.use_short_conv, conv_size=cfg.conv_size, qkv_bias=cfg.qkv_bias,
                        qk_norm=cfg.qk_norm, backend=cfg.backend, **common)

    def _init(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.initializer_range)
            if getattr(m, "bias", None) is not None:
                nn.init.constant_(m.bias, m.bias_init if isinstance(m, GateProj) else 0.0)

    @classmethod
    def from_config(cls, cfg: GLAConfig) -> "GLATransformer":
        d = cfg.to_dict()
        return cls(**d)

    @classmethod
    def from_state(cls, cfg: GLAConfig, state: dict, what: str = "the weights") -> "GLATransformer":
        """An fp32 model holding ``state`` (names as in ``state_dict()``; ``lm_head.weight`` may be left out when the
        embeddings are tied), built without drawing initial weights: on the meta device, filled by assignment. That
        skips a random initialisation that is overwritten anyway (20 s for gla-1.3b on a CPU) and leaves the
        caller's RNG stream untouched, which exact resume relies on. Non-persistent buffers (RetNet's fixed decays)
        are in no state dict: a model with them is built normally, under a forked RNG, and copied into.
        Raises ValueError naming ``what`` when the tensors do not match the config.
        """
        if cfg.tie_embeddings and "embeddings.weight" in state:
            state = {**state, "lm_head.weight": state["embeddings.weight"]}
        with torch.device("meta"):
            model = cls.from_config(cfg)
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{what} do not match the config: missing {missing}, unexpected {unexpected}")
        bad = [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
               if state[k].shape != v.shape]
        if bad:
            raise ValueError(f"{what} have the wrong shapes for the config: {bad}")
        model.load_state_dict(state, assign=True)
        if any(b.is_meta for b in model.buffers()):
            with torch.random.fork_rng(devices=[]):
                model = cls.from_config(cfg)
            model.load_state_dict(state)
        model = model.float()
        if cfg.tie_embeddings:
            model.lm_head.weight = model.embeddings.weight
        return model

    def forward(self, input_ids, state: ModelState | None = None, cu_seqlens=None, attention_mask=None,
                logits_to_keep: int = 0, use_cache: bool = True, targets=None, ignore_index: int = -100):
        """Logits and the new state; arguments as in ``features``. logits_to_keep > 0: logits of the last that many
        positions only (a prompt's prefill needs one; the head is the costliest matmul of a small model with a large
        vocabulary). Returns (logits [B, T or logits_to_keep, vocab_size], ModelState or None).

        targets: [B, T] long, the token that should follow each input position (ignore_index where none): returns
        (the summed fp32 cross-entropy, ModelState or None) instead, through the head in row blocks without
        materialising the logits (gla.layers.cross_entropy)."""
        h, state = self.features(input_ids, state, cu_seqlens, attention_mask, use_cache)
        if targets is not None:
            return self._loss(h, self.lm_head.weight, targets, ignore_index), state
        return self.lm_head(h[:, -logits_to_keep:] if logits_to_keep > 0 else h), state

    def features(self, input_ids, state: ModelState | None = None, cu_seqlens=None, attention_mask=None,
                 use_cache: bool = True):
        """Final hidden states (after the last norm), for losses that need the LM head at a few positions only.

        input_ids: [B, T] long; state: ModelState from an earlier call (continues those sequences);
        cu_seqlens: [N+1] offsets of packed documents (B == 1; states reset at each boundary, the returned GLA
        states are per document [N, ...]); attention_mask: [B, T] 1 for tokens, 0 for padding (e.g. left-padded
        prompts); use_cache=False: no new state is built (training and scoring: the GLA layers then skip their final
        states and per-document convolution caches). Returns (hidden [B, T, d_model], ModelState or None).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        dev = input_ids.device
        if cu_seqlens is not None and attention_mask is not None:
            raise ValueError("pass either cu_seqlens (packed documents) or attention_mask (padding), not both")
        if attention_mask is not None and attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask must be [B, T] = {(B, T)}, got {tuple(attention_mask.shape)}")
        if T == 0:
            raise ValueError("input_ids has no tokens (T = 0)")
        if state is not None:
            self._check_state(state, B if cu_seqlens is None else cu_seqlens.numel() - 1)
        has_softmax = any(layer.mixer == "softmax" for layer in self.layers)
        seen = state.seen if state is not None else torch.zeros(B, dtype=torch.long, device=dev)
        gla_kw, sm_kw = {}, {}
        if cu_seqlens is not None:
            validate_cu_seqlens(cu_seqlens, T)
            if state is not None and has_softmax:
                raise ValueError("a hybrid model cannot continue a state with packed documents (cu_seqlens)")
            start, last, positions = packed_info(cu_seqlens, T, dev)
            gla_kw = dict(cu_seqlens=cu_seqlens, seq_info=(start, last), use_cache=use_cache)
            if has_softmax:  # [T, T]: 1 GiB at T = 32768, so only for models that have a softmax layer
                pos = torch.arange(T, device=dev)
                block = (start.unsqueeze(1) == start.unsqueeze(0)) & (pos.unsqueeze(1) >= pos.unsqueeze(0))
                sm_kw = dict(positions=positions, block_mask=block)
            n_real = None
        else:
            mask = attention_mask.to(torch.bool) if attention_mask is not None else None
            key_mask = state.key_mask if state is not None else None
            if mask is not None or key_mask is not None:
                cur = mask if mask is not None else torch.ones(B, T, dtype=torch.bool, device=dev)
                if has_softmax:  # without padding so far every row has seen[0] cached keys
                    prev = key_mask if key_mask is not None else torch.ones(
                        B, int(seen[0]) if state is not None else 0, dtype=torch.bool, device=dev)
                    key_mask = torch.cat([prev, cur], 1)
                steps = cur.long().cumsum(1)
                positions = seen.unsqueeze(1) + (steps - 1).clamp(min=0)
                n_real = cur.long().sum(1)
            else:
                positions = seen.unsqueeze(1) + torch.arange(T, device=dev)
                n_real = torch.full((B,), T, device=dev)
            gla_kw = dict(attention_mask=attention_mask, use_cache=use_cache)
            sm_kw = dict(positions=positions, key_mask=key_mask)
        x = self.embeddings(input_ids)
        new_layers = []
        recompute = self.checkpoint_layers and torch.is_grad_enabled() and state is None and not use_cache
        for i, layer in enumerate(self.layers):
            s = state.layers[i] if state is not None else None
            kw = sm_kw if layer.mixer == "softmax" else gla_kw
            if recompute:  # keep only each layer's input; its inside is recomputed in the backward
                x, s = torch.utils.checkpoint.checkpoint(layer, x, s, use_reentrant=False, **kw)
            else:
                x, s = layer(x, s, **kw)
            new_layers.append(None if (cu_seqlens is not None and layer.mixer == "softmax") else s)
        h = self.norm(x)
        if not use_cache:
            return h, None
        if n_real is None:
            new_state = ModelState(new_layers, (cu_seqlens[1:] - cu_seqlens[:-1]).to(dev, torch.long))
        else:
            new_state = ModelState(new_layers, seen + n_real, sm_kw.get("key_mask"))
        return h, new_state

    def _check_state(self, state, rows: int) -> None:
        """A state to continue must come from a model of this layout, for ``rows`` sequences: one entry per layer,
        of the layer's kind (a KV cache for softmax layers, a GLAState with convolution caches where the layer has
        a short convolution), shapes only (no value is read)."""
        if not isinstance(state, ModelState):
            raise ValueError(f"state must be the ModelState an earlier call returned, got {type(state).__name__}")
        if len(state.layers) != len(self.layers):
            raise ValueError(f"state has {len(state.layers)} layers, this model {len(self.layers)}: a state "
                             "continues only the model that made it")
        if state.seen.shape != (rows,):
            raise ValueError(f"state is for {state.seen.shape[0]} sequences, the input has {rows}")
        for i, (layer, s) in enumerate(zip(self.layers, state.layers)):
            if layer.mixer == "softmax":
                ok, want = isinstance(s, (KVCache, StaticKVCache)), "a KV cache"
            else:
                convs = getattr(layer.attn, "convs", None) is not None
                ok = isinstance(s, GLAState) and (s.conv is not None) == convs
                want = "a GLAState" + (" with convolution caches" if convs else " without convolution caches")
            if not ok:
                got = "None (packed input keeps no softmax cache)" if s is None else type(s).__name__
                raise ValueError(f"state layer {i} ({layer.mixer}) must be {want}, got {got}: a state continues "
                                 "only the model that made it")

    _loss = staticmethod(linear_cross_entropy)
    # Activation checkpointing of every layer in training (``gla train --checkpoint-activations``): memory for
    # activations falls to one [B, T, d_model] tensor per layer, for one more forward per step.
    checkpoint_layers = False

    def compile_blocks(self, **options) -> "GLATransformer":
        """Compile each layer and the fused head + loss on their own (torch.compile ``options``), in place: torch's
        regional compilation. Layers of one kind share a compiled graph, so the first step compiles in seconds
        where the whole 24-layer model takes minutes; embeddings and the final norm stay eager. Returns self."""
        for layer in self.layers:
            layer.compile(**options)
        self._loss = torch.compile(linear_cross_entropy, **compile_options(options))
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, path: str) -> None:
        """Write config.json (Hugging Face compatible, model_type "gla_lm") and model.safetensors to ``path``."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        cfg = {"model_type": MODEL_TYPE, "architectures": ["GLAForCausalLM"], **self.config.to_dict()}
        tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                   if not (self.config.tie_embeddings and k == "lm_head.weight")}
        _atomic_write(os.path.join(path, CONFIG), lambda p: open(p, "w").write(json.dumps(cfg, indent=2)))
        _atomic_write(os.path.join(path, WEIGHTS), lambda p: save_file(tensors, p, metadata={"format": "pt"}))


    @classmethod
    def from_pretrained(cls, path: str, map_location="cpu") -> "GLATransformer":
        """Load a directory written by save_pretrained."""
        from safetensors.torch import load_file

        cfg = read_config(path)
        if cfg.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{path}/{CONFIG} has model_type {cfg.get('model_type')!r}, expected {MODEL_TYPE!r}")
        ours = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "transformers_version",
                                                           "torch_dtype", "dtype")}
        known = set(GLAConfig.__dataclass_fields__)
        config = GLAConfig.from_dict({k: v for k, v in ours.items() if k in known})
        wpath = os.path.join(path, WEIGHTS)
        if not os.path.isfile(wpath):
            raise FileNotFoundError(f"no {WEIGHTS} in {path}")
        try:
            tensors = load_file(wpath, device=str(map_location))
        except Exception as e:  # safetensors raises its own error types for truncated or corrupted files
            raise ValueError(f"{wpath} is not a readable safetensors file: {e}") from e
        state = {k.removeprefix("model."): v for k, v in tensors.items()}
        return cls.from_state(config, state, what=f"the weights in {wpath}").to(map_location)


def read_json(path: str, what: str) -> dict:
    """A JSON file with clear errors: FileNotFoundError naming ``what`` it should be, ValueError if malformed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {os.path.basename(path)} in {os.path.dirname(path)!r}: not {what}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_config(path: str) -> dict:
    """config.json of a checkpoint directory."""
    return read_json(os.path.join(path, CONFIG), "a checkpoint directory")


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)
