"""The models ours is compared with, built at our presets' sizes."""
from __future__ import annotations


def llama_twin(cfg, max_positions: int):
    """A Hugging Face LlamaForCausalLM (SDPA attention) as wide and deep as GLAConfig ``cfg``, with its MLP size,
    vocabulary and embedding tying, in heads of 128 (at gla-340m: Llama-341M, hidden 1024, 24 layers, 8 heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    lc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=max(1, cfg.d_model // 128),
                     max_position_embeddings=max_positions, tie_word_embeddings=cfg.tie_embeddings,
                     attn_implementation="sdpa")
    return LlamaForCausalLM(lc)


def fla_twin(cfg, max_positions: int):
    """FLA's GLAForCausalLM (flash-linear-attention, checked with 0.6.0) with GLAConfig ``cfg``'s sizes and FLA's
    own defaults for everything that picks kernels (fused norms, SwiGLU and cross-entropy): the model an FLA user
    trains. Raises ImportError when FLA is not installed."""
    from fla.models import GLAConfig as FLAConfig, GLAForCausalLM
    fc = FLAConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_heads=cfg.n_heads,
                   expand_k=cfg.expand_k, expand_v=cfg.expand_v, intermediate_size=cfg.d_ff,
                   num_hidden_layers=cfg.n_layers, use_short_conv=cfg.use_short_conv,
                   max_position_embeddings=max_positions, tie_word_embeddings=cfg.tie_embeddings)
    return GLAForCausalLM(fc)
