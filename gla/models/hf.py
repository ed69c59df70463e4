"""Hugging Face transformers (5.x) adapter: AutoConfig / AutoModelForCausalLM for our checkpoint directories.

After ``import gla`` (gla/__init__.py imports this module once transformers is imported),
``transformers.AutoModelForCausalLM.from_pretrained(dir)`` loads a directory written by
``GLATransformer.save_pretrained`` and ``.generate()`` decodes with our recurrent state: the prompt is run once
(prefill), then one token per step through a ``GLACache`` that wraps a ``gla.models.ModelState``.

The adapter adds no parameters of its own: ``GLAForCausalLM.model`` is a ``GLATransformer``, so the checkpoint keys
("model.embeddings.weight", ..., "model.lm_head.weight" unless tied) load unchanged in both directions.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
import transformers

if int(transformers.__version__.split(".")[0]) != 5:  # the cache API and config dataclasses are 5.x's
    raise ImportError(f"gla's Hugging Face adapter needs transformers>=5,<6 (pip install 'gla[hf]'), "
                      f"found {transformers.__version__}")

from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from gla.data import IGNORE_INDEX
from gla.layers.conv import ShortConv
from gla.layers.gla_attention import GatedLinearAttention, GateProj, fixed_log_decay

from .config import GLAConfig
from .state import ModelState, state_bytes
from .transformer import MODEL_TYPE, GLATransformer

_GLA_FIELDS = tuple(f.name for f in dataclasses.fields(GLAConfig))
# transformers renamed past_key_values to cache during 5.x (5.24 has "cache"; 5.17 still "past_key_values").
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class GLALMConfig(PreTrainedConfig):
    """The Hugging Face view of a GLAConfig: the same field names and defaults, model_type "gla_lm".

    The standard names transformers looks for (hidden_size, num_hidden_layers, tie_word_embeddings, ...) are
    aliases of our fields (``attribute_map``), so config.json holds each value once.
    """

    model_type = MODEL_TYPE
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                     "intermediate_size": "d_ff", "max_position_embeddings": "max_seq_len",
                     "tie_word_embeddings": "tie_embeddings", "rms_norm_eps": "norm_eps"}

    # Field for field GLAConfig's (tests/models/test_hf.py checks that names and defaults agree).
    vocab_size: int = 256
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_layers: int = 6
    max_seq_len: int = 32768
    dropout: float | int = 0.1
    mlp: str = "swiglu"
    norm: str = "rms"
    norm_eps: float | int = 1e-6
    tie_embeddings: bool = False
    initializer_range: float | int = 0.02
    expand_k: float | int = 0.5
    expand_v: float | int = 1.0
    num_kv_heads: int | None = None
    feature_map: str | None = None
    output_gate: str | None = "swish"
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float | int = 16.0
    gate_bias_init: float | int = 0.0
    clamp_min: float | int | None = None
    use_short_conv: bool = False
    conv_size: int = 4
    qkv_bias: bool = False
    qk_norm: bool = False
    backend: str = "auto"
    mixer: str = "gla"
    attn_layers: list | tuple = ()
    layer_mixers: list | tuple = ()
    attn_heads: int | None = None
    attn_kv_heads: int | None = None
    attn_head_dim: int | None = None
    attn_qkv_bias: bool = False
    attn_qk_norm: bool = False
    rope_theta: float | int = 10000.0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    use_cache: bool = True

    def to_gla_config(self) -> GLAConfig:
        """The GLAConfig with these values (validated by GLAConfig). Several eos ids (a chat model's) stay in this
        config for generate(); the GLAConfig, which holds one, gets none."""
        values = {name: getattr(self, name) for name in _GLA_FIELDS if hasattr(self, name)}
        if isinstance(values.get("eos_token_id"), (list, tuple)):
            values["eos_token_id"] = None
        return GLAConfig(**values)

    @classmethod
    def from_gla_config(cls, cfg: GLAConfig, **kwargs) -> GLALMConfig:
        return cls(**cfg.to_dict(), **kwargs)


class GLACache(Cache):
    """A transformers Cache holding our ModelState (one entry per layer: GLA [B, H, K, V] state or KV cache).

    It has no transformers cache layers; generate() only needs get_seq_length (columns consumed so far, padding
    included, to slice the prompt when a cache is reused) and the batch operations used by beam search.
    A recurrent state cannot be rolled back, so crop() only accepts 0.
    """

    def __init__(self, state: ModelState | None = None, seq_length: int = 0):
        super().__init__(layers=[])
        self.state = state
        self.seq_length = seq_length

    def __repr__(self):
        return f"GLACache(seq_length={self.seq_length}, bytes={self.nbytes()})"

    def __len__(self):
        return 0 if self.state is None else len(self.state.layers)

    def update_state(self, state: ModelState, new_columns: int) -> None:
        self.state, self.seq_length = state, self.seq_length + new_columns

    def nbytes(self) -> int:
        """Bytes held by the state tensors (constant in the context length for a GLA-only model)."""
        return state_bytes(self.state)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seq_length + query_length, 0

    def reset(self):
        self.state, self.seq_length = None, 0

    def _select(self, rows: torch.Tensor) -> None:
        if self.state is not None:
            self.state = self.state.select(rows.to(self.state.seen.device))

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor):
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int):
        if self.state is not None:
            self._select(torch.arange(self.state.seen.shape[0]).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("a recurrent GLA state cannot be rolled back (assisted / speculative decoding)")

    def activate_past_recording(self):
        pass  # nothing to record: crop() only ever accepts 0

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else int(self.state.seen.shape[0])

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_linear(self) -> list[bool]:
        # False: generate() then slices already-consumed prompt columns using get_seq_length().
        return [False]


class GLAForCausalLM(PreTrainedModel, GenerationMixin):
    """transformers causal LM around a GLATransformer.

    forward(input_ids [B, T], attention_mask [B, L] (L >= T: the last T columns are this call's), cache GLACache,
    labels [B, T], IGNORE_INDEX (-100) where no loss is taken) -> CausalLMOutputWithPast(loss, logits [B, T or
    logits_to_keep, vocab], cache).
    """

    config_class = GLALMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["GLALayer"]
    _is_stateful = True  # no assisted decoding: a recurrent state cannot be rolled back
    _tied_weights_keys = {"model.lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: GLALMConfig):
        super().__init__(config)
        self.model = GLATransformer.from_config(config.to_gla_config())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward() creates its own GLACache on the first call

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, value):
        self.model.embeddings = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ShortConv):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        elif isinstance(module, GatedLinearAttention) and module.decay == "fixed":
            init.copy_(module.log_gamma, fixed_log_decay(module.num_kv_heads, module.head_k))
        elif isinstance(module, GateProj):  # a Linear: super() has just zeroed its bias
            init.constant_(module.bias, module.bias_init)

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """transformers' generate(). Plain decoding runs on gla's own engine (gla.generation: prefill, then the
        static state, its step captured as a CUDA graph on a GPU): greedy or sampled (temperature, top-k, top-p),
        max_new_tokens / max_length, one eos token, left padding through attention_mask. It returns what
        transformers' loop returns: [B, T + new], pad_token_id after each row's eos, up to the column where the last
        row ended. Anything else (beams, logits processors, stopping criteria, streamers, output dicts, a cache
        passed in) takes transformers' loop, one forward per token."""
        request = self._engine_request(inputs, generation_config, kwargs)
        if request is None:
            return super().generate(inputs, generation_config, **kwargs)
        return _engine_generate(self.model, inputs, *request)

    def _engine_request(self, inputs, generation_config, kwargs):
        """(max_new_tokens, sampling dict, eos, pad, attention_mask) when gla's engine serves the call, else None."""
        if any(v is not None and not (isinstance(v, (list, tuple)) and not v) for k, v in kwargs.items()
               if k in _LOOP_ONLY):
            return None
        if not torch.is_tensor(inputs) or inputs.dim() != 2 or inputs.shape[1] == 0 or self.training:
            return None  # training mode: the loop keeps dropout on, as transformers does
        if getattr(self, "hf_device_map", None) or getattr(self, "is_quantized", False):
            return None  # offloaded or quantised weights: only the module hooks know how to run them
        cfg, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        if set(model_kwargs) - {"attention_mask"} or not all(
                k in _ENGINE_SETTINGS or v is None or (k in _NEUTRAL and _NEUTRAL[k] == v) or k in _IRRELEVANT
                for k, v in cfg.to_dict().items()):
            return None
        eos = cfg.eos_token_id
        if torch.is_tensor(eos):
            eos = eos.flatten().tolist()
        if isinstance(eos, (list, tuple)):
            if len(eos) > 1:
                return None
            eos = int(eos[0]) if eos else None
        # without a length set by the caller transformers gives 20 new tokens (its default max_length, counted
        # from the prompt's end, capped by the model's positions): leave that rule to its loop
        explicit = "max_length" in kwargs or (generation_config is not None and generation_config.max_length)
        new = (cfg.max_new_tokens if cfg.max_new_tokens is not None
               else cfg.max_length - inputs.shape[1] if explicit else None)
        if new is None or new < 1 or cfg.use_cache is False:
            return None
        if cfg.do_sample and (cfg.temperature == 0 or cfg.top_p == 0):
            return None  # transformers' own errors and conventions for these
        sampling = dict(temperature=0.0)
        if cfg.do_sample:
            sampling = dict(temperature=1.0 if cfg.temperature is None else cfg.temperature,
                            top_k=cfg.top_k if cfg.top_k else None,
                            top_p=cfg.top_p if cfg.top_p is not None and cfg.top_p < 1.0 else None)
        mask, pad = model_kwargs.get("attention_mask"), cfg.pad_token_id
        if mask is None and pad is not None and pad != eos and bool((inputs == pad).any()):
            mask = (inputs != pad).long()  # transformers infers padding from pad_token_id in the prompt so
        return new, sampling, eos, pad if pad is not None else eos, mask

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: GLACache | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                inputs_embeds: torch.Tensor | None = None, past_key_values: GLACache | None = None,
                return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        """Positions come from the cache (padding excluded), so position_ids and similar kwargs are ignored."""
        if inputs_embeds is not None:
            raise ValueError("GLAForCausalLM takes input_ids only (inputs_embeds is not supported)")
        if input_ids is None:
            raise ValueError("input_ids is required")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, GLACache):
            raise TypeError(f"cache must be a gla GLACache (from an earlier call), got {type(cache).__name__}")
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        T = input_ids.shape[1]
        mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[1] < T:
                raise ValueError(f"attention_mask must be [B, L] with L >= {T}, got {tuple(attention_mask.shape)}")
            mask = attention_mask[:, -T:]
            if bool(mask.all()):
                mask = None  # no padding here: take the unmasked (faster) path
        state = cache.state if cache is not None else None
        h, new_state = self.model.features(input_ids, state, attention_mask=mask, use_cache=use_cache)
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        else:
            h = h[:, logits_to_keep]
        logits = self.model.lm_head(h)
        loss = None
        if labels is not None:
            if h.shape[1] != T:
                raise ValueError("labels need logits at every position: pass logits_to_keep=0")
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=IGNORE_INDEX)
        out_cache = None
        if use_cache:
            out_cache = cache if cache is not None else GLACache()
            out_cache.update_state(new_state, T)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: out_cache})


# generate() arguments that only transformers' loop serves; generation settings gla's engine takes as they are
_LOOP_ONLY = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus", "assistant_model",
              "streamer", "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate", "cache",
              "past_key_values")
_ENGINE_SETTINGS = {"max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
                    "pad_token_id", "bos_token_id", "use_cache"}
# settings that change what transformers' loop does unless unset (None) or holding these values
_NEUTRAL = {"min_length": 0, "min_new_tokens": None, "num_beams": 1, "num_return_sequences": 1, "typical_p": 1.0,
            "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None, "top_h": None, "repetition_penalty": 1.0,
            "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
            "bad_words_ids": None, "force_words_ids": None, "sequence_bias": None, "suppress_tokens": None,
            "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
            "renormalize_logits": False, "remove_invalid_values": False, "exponential_decay_length_penalty": None,
            "guidance_scale": None, "watermarking_config": None, "stop_strings": None, "max_time": None,
            "penalty_alpha": None, "dola_layers": None, "prompt_lookup_num_tokens": None, "num_beam_groups": 1,
            "return_dict_in_generate": False, "output_scores": False, "output_logits": False,
            "output_attentions": False, "output_hidden_states": False, "token_healing": False,
            "cache_implementation": None, "compile_config": None, "assistant_early_exit": None, "constraints": None,
            "use_mtp": None}
# settings that do not affect single-sequence decoding without an assistant (beam-only, assistant-only, caching,
# bookkeeping); any other setting given a value sends the call to transformers' loop
_IRRELEVANT = {"early_stopping", "length_penalty", "diversity_penalty", "num_assistant_tokens",
               "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind",
               "target_lookbehind", "_from_model_config", "transformers_version"}


def _engine_generate(model: GLATransformer, ids, new: int, sampling: dict, eos, pad, attention_mask):
    """gla.generate, its output made transformers' (tokens after each row's eos -> pad, trailing columns in which
    every row had ended dropped: the engine checks for the end only every few steps on a GPU)."""
    from gla.generation import generate
    mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
    out = generate(model, ids, new, eos_token_id=eos, attention_mask=mask, **sampling)
    if eos is None:
        return out
    T = ids.shape[1]
    tail = out[:, T:]
    ended = (tail == eos).long().cumsum(1)
    after = ended - (tail == eos).long() > 0  # past the row's first eos
    tail = tail.masked_fill(after, pad)
    keep = int((~after).sum(1).max())
    return torch.cat([ids, tail[:, :keep]], 1)


def register() -> None:
    """Register GLALMConfig / GLAForCausalLM with AutoConfig and AutoModelForCausalLM (idempotent)."""
    AutoConfig.register(MODEL_TYPE, GLALMConfig, exist_ok=True)
    AutoModelForCausalLM.register(GLALMConfig, GLAForCausalLM, exist_ok=True)


register()
