"""The one declarative table between HF tensor names and our parameter paths, both directions.

Each `Rule` names an HF tensor (with `{layer}` for per-layer tensors, which we stack on a
leading 'layers' axis), our parameter path, and a pair of inverse transforms. HF stores Linear
weights as [out, in]; our kernels are [*in_shape, *out_shape] with heads split out, e.g.
q_proj.weight [H*hd, D] <-> blocks.attn.q_proj.kernel [L, D, H, hd].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import numpy as np

from metastone_jax.config import ModelConfig

ShapeFn = Callable[[ModelConfig], tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class Transform:
    """HF tensor <-> one layer's slice of our parameter; shapes are given per config."""

    to_ours: Callable[[np.ndarray, ModelConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, ModelConfig], np.ndarray]
    hf_shape: ShapeFn


def linear(in_shape: ShapeFn, out_shape: ShapeFn) -> Transform:
    """HF Linear weight [out, in] <-> our kernel [*in_shape, *out_shape]."""

    def to_ours(w, c):
        return w.T.reshape(*in_shape(c), *out_shape(c))

    def to_hf(k, c):
        return k.reshape(math.prod(in_shape(c)), math.prod(out_shape(c))).T

    return Transform(to_ours, to_hf, lambda c: (math.prod(out_shape(c)), math.prod(in_shape(c))))


def vector(shape: ShapeFn) -> Transform:
    """HF 1-D tensor [n] <-> ours reshaped to `shape` (biases with heads split out, norms)."""
    return Transform(
        lambda w, c: w.reshape(shape(c)),
        lambda p, c: p.reshape(-1),
        lambda c: (math.prod(shape(c)),),
    )


def same(shape: ShapeFn) -> Transform:
    return Transform(lambda w, c: w, lambda p, c: p, shape)


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF tensor name; `{layer}` marks a per-layer tensor
    path: tuple[str, ...]  # our parameter path in the nnx State
    transform: Transform
    when: Callable[[ModelConfig], bool] = lambda c: True

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.hf

    def hf_names(self, cfg: ModelConfig) -> list[str]:
        if self.per_layer:
            return [self.hf.format(layer=i) for i in range(cfg.n_layers)]
        return [self.hf]


def _d(c):
    return (c.d_model,)


def _q(c):
    return (c.n_heads, c.head_dim)


def _kv(c):
    return (c.n_kv_heads, c.head_dim)


def _ff(c):
    return (c.d_ff,)


def _vocab(c):
    return (c.vocab_size,)


def _has_bias(c):
    return c.qkv_bias


_L = "model.layers.{layer}."

# Qwen2 and Llama share tensor names; they differ in which rules apply (bias, tied head).
BACKBONE_RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", ("embed",), same(lambda c: (c.vocab_size, c.d_model))),
    Rule(_L + "input_layernorm.weight", ("blocks", "attn_norm", "scale"), vector(_d)),
    Rule(_L + "self_attn.q_proj.weight", ("blocks", "attn", "q_proj", "kernel"), linear(_d, _q)),
    Rule(_L + "self_attn.q_proj.bias", ("blocks", "attn", "q_proj", "bias"), vector(_q), _has_bias),
    Rule(_L + "self_attn.k_proj.weight", ("blocks", "attn", "k_proj", "kernel"), linear(_d, _kv)),
    Rule(
        _L + "self_attn.k_proj.bias", ("blocks", "attn", "k_proj", "bias"), vector(_kv), _has_bias
    ),
    Rule(_L + "self_attn.v_proj.weight", ("blocks", "attn", "v_proj", "kernel"), linear(_d, _kv)),
    Rule(
        _L + "self_attn.v_proj.bias", ("blocks", "attn", "v_proj", "bias"), vector(_kv), _has_bias
    ),
    Rule(_L + "self_attn.o_proj.weight", ("blocks", "attn", "o_proj", "kernel"), linear(_q, _d)),
    Rule(_L + "post_attention_layernorm.weight", ("blocks", "mlp_norm", "scale"), vector(_d)),
    Rule(_L + "mlp.gate_proj.weight", ("blocks", "mlp", "gate_proj", "kernel"), linear(_d, _ff)),
    Rule(_L + "mlp.up_proj.weight", ("blocks", "mlp", "up_proj", "kernel"), linear(_d, _ff)),
    Rule(_L + "mlp.down_proj.weight", ("blocks", "mlp", "down_proj", "kernel"), linear(_ff, _d)),
    Rule("model.norm.weight", ("final_norm", "scale"), vector(_d)),
    Rule(
        "lm_head.weight", ("lm_head", "kernel"), linear(_d, _vocab), lambda c: not c.tie_embeddings
    ),
)

# The released SPRM head: torch.nn.Sequential(Linear(D,2D), ReLU, Dropout, Linear(2D,1)), whose
# state dict keys are the Sequential indices 0 and 3 (score_module.pt).
SPRM_RULES: tuple[Rule, ...] = (
    Rule("0.weight", ("sprm", "fc1", "kernel"), linear(_d, lambda c: (2 * c.d_model,))),
    Rule("0.bias", ("sprm", "fc1", "bias"), vector(lambda c: (2 * c.d_model,))),
    Rule("3.weight", ("sprm", "fc2", "kernel"), linear(lambda c: (2 * c.d_model,), lambda c: (1,))),
    Rule("3.bias", ("sprm", "fc2", "bias"), vector(lambda c: (1,))),
)

# Tensors that HF checkpoints may carry and that hold no parameters of ours.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def zero_hf_tensors(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of HF tensors that must be zero for `cfg`: HF Llama's `attention_bias`
    biases o_proj as well as q/k/v, and our attention has no o_proj bias (Qwen2's layout), so a
    Llama with q/k/v biases is written with zero o_proj biases and read only if they are zero."""
    if cfg.arch != "llama" or not cfg.qkv_bias:
        return []
    return [(_L.format(layer=i) + "self_attn.o_proj.bias", _d(cfg)) for i in range(cfg.n_layers)]


def active_rules(rules: tuple[Rule, ...], cfg: ModelConfig) -> list[Rule]:
    return [r for r in rules if r.when(cfg)]


def expected_hf_tensors(
    rules: tuple[Rule, ...], cfg: ModelConfig
) -> Iterator[tuple[str, Rule, int | None]]:
    """(HF name, rule, layer or None) for every tensor the config implies, in HF's order:
    embedding, then layer by layer, then the final norm and LM head."""
    rules = active_rules(rules, cfg)
    per_layer = [r for r in rules if r.per_layer]
    first = [r for r in rules if not r.per_layer and r.path == ("embed",)]
    last = [r for r in rules if not r.per_layer and r.path != ("embed",)]
    for rule in first:
        yield rule.hf, rule, None
    for i in range(cfg.n_layers):
        for rule in per_layer:
            yield rule.hf.format(layer=i), rule, i
    for rule in last:
        yield rule.hf, rule, None
