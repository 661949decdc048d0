"""Per-layer KV cache shared by prefill and single-token decode.

One array per layer (a tuple, not one stacked [L, ...] array): in a decode loop each layer then
reads its own buffer in place and the new token is written in place, where slicing a stacked
cache per layer costs a copy of it every step (attention over a 200 MB cache: 147 ms per step
stacked vs 49 ms per layer buffer on the 2-core CPU; see bench/RESULTS.md for the end result).
Slots are written left to right; `valid` marks the slots holding real (non-padding) tokens,
so left-padded prompts of different lengths share one write index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from metastone_jax.config import ModelConfig


@struct.dataclass
class KVCache:
    """k: L arrays [B, K, hd, S]; v: L arrays [B, K, S, hd]; valid: [B, S] bool; index: []
    int32, the next slot to write.

    KV-head-major, so attention contracts over (B, K) batch dims without transposing. Keys are
    stored transposed so that both decode reductions (q.k over hd, p.v over S) run over a
    non-minor axis, vectorised along the minor one: the q.k pass takes 0.9 ms per layer instead
    of 1.5 ms in the sampler bench's decode step (a minor hd of 64 reduces poorly on CPU)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array
    # A prompt prefix shared by groups of rows (`with_prefix`): rows b*g .. b*g+g-1 attend to
    # prompt b's keys/values (k [P, K, hd, S_p], v [P, K, S_p, hd] per layer, valid [P, S_p])
    # before their own slots, which then hold only the tokens generated after it.
    prefix_k: tuple[jax.Array, ...] | None = None
    prefix_v: tuple[jax.Array, ...] | None = None
    prefix_valid: jax.Array | None = None

    @property
    def max_len(self) -> int:
        return self.v[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @classmethod
    def init(cls, cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
        if max_len > cfg.max_len:
            raise ValueError(
                f"KVCache: max_len {max_len} exceeds the model's max_len {cfg.max_len}"
            )
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        k_shape = (batch_size, cfg.n_kv_heads, cfg.head_dim, max_len)
        dtype = dtype or cfg.compute_jnp_dtype
        return cls(
            k=tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.n_layers)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
            valid=jnp.zeros((batch_size, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )

    def with_prefix(self, prefix: KVCache) -> KVCache:
        """These rows, attending first to `prefix` (a prefilled cache of P prompts, each
        shared by batch_size / P consecutive rows: k candidates decode from one prompt's
        cache instead of k copies of it)."""
        if self.batch_size % prefix.batch_size:
            raise ValueError(
                f"KVCache.with_prefix: {self.batch_size} rows cannot share {prefix.batch_size} "
                "prefixes equally"
            )
        return self.replace(prefix_k=prefix.k, prefix_v=prefix.v, prefix_valid=prefix.valid)

    def prefix_lengths(self) -> jax.Array:
        """[B, 1] int32 valid prefix tokens of each row (0 without a prefix)."""
        if self.prefix_valid is None:
            return jnp.zeros((self.batch_size, 1), jnp.int32)
        n = jnp.sum(self.prefix_valid, axis=1, keepdims=True).astype(jnp.int32)
        return jnp.repeat(n, self.batch_size // self.prefix_valid.shape[0], axis=0)

    def map_rows(self, fn) -> KVCache:
        """Applies `fn` (an op along axis 0) to every per-row array: k, v and valid (a shared
        prefix stays: `fn` must keep rows grouped by prompt, the same number for each)."""
        return self.replace(
            k=tuple(fn(x) for x in self.k), v=tuple(fn(x) for x in self.v), valid=fn(self.valid)
        )

    def repeat(self, k: int) -> KVCache:
        """Repeats each sequence k times along batch (prefill once, decode k candidates)."""
        return self.map_rows(lambda x: jnp.repeat(x, k, axis=0))


def grow_layer(k: jax.Array, v: jax.Array, slots: int) -> tuple[jax.Array, jax.Array]:
    """One layer's k [B, K, hd, S] and v [B, K, S, hd] with `slots` empty slots after S (the
    sampler grows a cache a layer at a time: `sampler._grow`)."""
    return (jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, slots))),
            jnp.pad(v, ((0, 0), (0, 0), (0, slots), (0, 0))))  # fmt: skip
