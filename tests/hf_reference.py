"""Offline reference models from transformers, and a minimal HF -> JAX weight copy for tests.

The full converter (both directions, sharded, streamed) is metastone_jax.convert; this copy
exists so that the model's parity can be proven independently of it.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers
from flax import nnx

from metastone_jax.config import ModelConfig


def tiny_hf_model(arch: str, *, tie: bool = False, rope_scaling: dict | None = None, seed: int = 0):
    """A randomly initialised tiny Qwen2ForCausalLM / LlamaForCausalLM in fp32, built offline."""
    common = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=5000.0,
        tie_word_embeddings=tie,
    )
    if arch == "qwen2":
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.LlamaConfig(**common, attention_bias=False, rope_scaling=rope_scaling)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(config).eval().to(torch.float32)
    with torch.no_grad():  # HF zero-initialises biases; random ones test the bias path.
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def copy_hf_weights(model, hf_model, cfg: ModelConfig) -> None:
    """Copies a transformers model's weights into our Transformer (in place)."""
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def stack(fmt, fn):
        return np.stack([fn(sd[fmt.format(i)]) for i in range(cfg.n_layers)])

    lp = "model.layers.{}."
    state = nnx.state(model, nnx.Param)
    blocks = state["blocks"]
    state["embed"].set_value(sd["model.embed_tokens.weight"])
    attn = blocks["attn"]
    attn["q_proj"]["kernel"].set_value(
        stack(lp + "self_attn.q_proj.weight", lambda w: w.T.reshape(d, h, hd))
    )
    attn["k_proj"]["kernel"].set_value(
        stack(lp + "self_attn.k_proj.weight", lambda w: w.T.reshape(d, k, hd))
    )
    attn["v_proj"]["kernel"].set_value(
        stack(lp + "self_attn.v_proj.weight", lambda w: w.T.reshape(d, k, hd))
    )
    attn["o_proj"]["kernel"].set_value(
        stack(lp + "self_attn.o_proj.weight", lambda w: w.T.reshape(h, hd, d))
    )
    if cfg.qkv_bias:
        attn["q_proj"]["bias"].set_value(
            stack(lp + "self_attn.q_proj.bias", lambda b: b.reshape(h, hd))
        )
        attn["k_proj"]["bias"].set_value(
            stack(lp + "self_attn.k_proj.bias", lambda b: b.reshape(k, hd))
        )
        attn["v_proj"]["bias"].set_value(
            stack(lp + "self_attn.v_proj.bias", lambda b: b.reshape(k, hd))
        )
    for name in ("gate_proj", "up_proj", "down_proj"):
        blocks["mlp"][name]["kernel"].set_value(stack(lp + f"mlp.{name}.weight", lambda w: w.T))
    blocks["attn_norm"]["scale"].set_value(stack(lp + "input_layernorm.weight", lambda w: w))
    blocks["mlp_norm"]["scale"].set_value(
        stack(lp + "post_attention_layernorm.weight", lambda w: w)
    )
    state["final_norm"]["scale"].set_value(sd["model.norm.weight"])
    if not cfg.tie_embeddings:
        state["lm_head"]["kernel"].set_value(sd["lm_head.weight"].T)
    nnx.update(model, state)


def hf_logits(hf_model, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.from_numpy(attention_mask.astype(np.int64))
        out = hf_model(torch.from_numpy(tokens.astype(np.int64)), **kwargs)
    return out.logits.float().numpy()
