"""Per-layer KV cache shared by prefill and single-token decode.

Keys and values are stacked over layers so that scan-over-layers can slice them with the
per-layer parameters. Slots are written left to right; `valid` marks the slots holding real
(non-padding) tokens, so left-padded prompts of different lengths share one write index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from metastone_jax.config import ModelConfig


@struct.dataclass
class KVCache:
    """k, v: [L, B, S, K, hd]; valid: [B, S] bool; index: [] int32, the next slot to write."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @classmethod
    def init(cls, cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
        if max_len > cfg.max_len:
            raise ValueError(
                f"KVCache: max_len {max_len} exceeds the model's max_len {cfg.max_len}"
            )
        shape = (cfg.n_layers, batch_size, max_len, cfg.n_kv_heads, cfg.head_dim)
        dtype = dtype or cfg.compute_jnp_dtype
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch_size, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )

    def repeat(self, k: int) -> KVCache:
        """Repeats each sequence k times along batch (prefill once, decode k candidates)."""
        return KVCache(
            k=jnp.repeat(self.k, k, axis=1),
            v=jnp.repeat(self.v, k, axis=1),
            valid=jnp.repeat(self.valid, k, axis=0),
            index=self.index,
        )
