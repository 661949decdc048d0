"""A paged KV cache: per layer, a pool of fixed-size pages; each sequence lists its pages.

A sequence's token t lives in page `page_table[t // page_size]` at offset `t % page_size`
(positions count the sequence's tokens from 0, prompt included). Pages are handed out by the
engine (sample/engine.py); k candidates of one prompt list the prompt's full pages first, shared
read-only, then pages of their own.

Two layouts of the pool, one per attention implementation (`ATTENTION_IMPLS`):
  - "xla" (CPU/GPU default): k [P, K, hd, page], v [P, K, page, hd] per layer: keys transposed,
    as the dense cache keeps them (attention/kv_cache.py), so both decode reductions run over a
    non-minor axis. Attention gathers a sequence's pages and runs the decode math of
    `layers.Attention`; inside the engine's segments, only the pages between a row's prompt
    and the segment's start: the prompts and the segment's tokens are read from a dense
    working set (attention/segment_kv.py).
  - "pallas" (TPU default): the layout of the TPU paged-attention kernel shipped with jax
    (attention/paged_tpu.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from metastone_jax.attention import MASK_VALUE, paged_tpu
from metastone_jax.sharding import constrain

ATTENTION_IMPLS = ("xla", "pallas")


def default_attention_impl() -> str:
    """The backend's own: the Pallas kernel on TPU, the XLA gather elsewhere."""
    return "pallas" if jax.default_backend() == "tpu" else "xla"


@struct.dataclass
class PagedKV:
    """The pool and who holds what; S sequences (engine slots), W page-table columns.

    k, v: L arrays each (layout by `impl`); page_table: [S, W] int32 page ids (columns past a
    sequence's pages hold any valid id: they are masked by `kv_len`); kv_len: [S] int32 tokens in
    the cache per sequence; segment: see below (None between segments)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    page_table: jax.Array
    kv_len: jax.Array
    impl: str = struct.field(pytree_node=False, default="xla")
    # The XLA path's dense working set while a decode segment runs (attention/segment_kv.py).
    segment: Any = None

    @property
    def page_size(self) -> int:
        return pool_page_size(self.k[0], self.impl)

    @property
    def n_pages(self) -> int:
        return pool_pages(self.k[0])


def pool_shapes(impl: str, n_pages: int, page_size: int, n_kv_heads: int, head_dim: int):
    """(k shape, v shape) of one layer's pool."""
    if impl == "xla":
        k_shape = (n_pages, n_kv_heads, head_dim, page_size)
        return k_shape, (n_pages, n_kv_heads, page_size, head_dim)
    if impl == "pallas":
        return paged_tpu.pool_shapes(n_pages, page_size, n_kv_heads, head_dim)
    raise ValueError(f"attention_impl: expected one of {ATTENTION_IMPLS}, got {impl!r}")


def pool_page_size(k: jax.Array, impl: str) -> int:
    if impl == "xla":
        return k.shape[3]
    return paged_tpu.pool_page_size(k)


def pool_pages(k: jax.Array) -> int:
    """Pages are axis 0 of both layouts."""
    return k.shape[0]


def init_pool(cfg, n_pages: int, page_size: int, impl: str, dtype=None):
    """(k, v): L zero arrays each, in `impl`'s layout."""
    k_shape, v_shape = pool_shapes(impl, n_pages, page_size, cfg.n_kv_heads, cfg.head_dim)
    dtype = dtype or cfg.compute_jnp_dtype
    return (
        tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.n_layers)),
        tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.n_layers)),
    )


def write(k_pool, v_pool, k_new, v_new, page_ids, offsets, impl: str = "xla"):
    """Writes tokens into one layer's pool. k_new, v_new: [N, T, K, hd]; page_ids, offsets:
    [N, T] int32 (a page id < 0 or >= P: not written, e.g. padding). -> (k_pool, v_pool)."""
    if impl == "pallas":
        return paged_tpu.write(k_pool, v_pool, k_new, v_new, page_ids, offsets)
    n_pages = k_pool.shape[0]
    page_ids = jnp.where(page_ids < 0, n_pages, page_ids)  # out of range: dropped
    # Advanced indices on axes 0 and 3 (k) / 0 and 2 (v): the update is laid [N, T, K, hd].
    k_pool = k_pool.at[page_ids, :, :, offsets].set(k_new.astype(k_pool.dtype), mode="drop")
    v_pool = v_pool.at[page_ids, :, offsets, :].set(v_new.astype(v_pool.dtype), mode="drop")
    return k_pool, v_pool


def constrain_pool(pool: tuple, impl: str) -> tuple:
    """Under a mesh, each layer's pool with its KV heads over 'tensor' (pages whole on every
    device: a slot reads any page); the pallas layout's v placeholder stays."""
    axes = (None, "kv_heads", None, None) if impl == "xla" else (None, None, "kv_heads", None)
    return tuple(constrain(x, axes) if x.ndim == 4 else x for x in pool)


def copy_pages(pool: tuple, src, dst) -> tuple:
    """Copies page src[i] to page dst[i] in every layer's array of `pool` (dst < 0: no copy).
    Pages are axis 0 in both layouts; the pallas layout's (0,)-shaped v placeholder stays."""

    def copy(x):
        if x.ndim == 1:
            return x
        n_pages = x.shape[0]
        to = jnp.where(dst < 0, n_pages, dst)
        return x.at[to].set(x[jnp.clip(src, 0, n_pages - 1)], mode="drop")

    return tuple(copy(x) for x in pool)


def attend(q, k_pool, v_pool, page_table, kv_len, scale: float, impl: str = "xla"):
    """Single-token attention over each sequence's pages.

    q: [N, K, G, hd] (rotary applied); page_table: [N, W]; kv_len: [N] tokens to attend to (the
    new one included). -> [N, K, G, hd] f32."""
    if impl == "pallas":
        return paged_tpu.attend(q, k_pool, v_pool, page_table, kv_len, scale)
    # One page column at a time with a running max and sum (online softmax): the pages are
    # never gathered into a [N, W * page] copy, and the loop stops at the longest row's last
    # page, so a step costs what the rows hold, not the page table's width (no recompilation
    # as sequences grow). On XLA:CPU, gathering all pages first measured 2-4x slower.
    kv_len = jnp.asarray(kv_len)
    n, kh, g, hd = q.shape
    start = (
        jnp.full((n, kh, g), MASK_VALUE, jnp.float32),
        jnp.zeros((n, kh, g), jnp.float32),
        jnp.zeros((n, kh, g, hd), jnp.float32),
    )
    _, total, acc = attend_columns(q, k_pool, v_pool, page_table, jnp.zeros_like(kv_len), kv_len,
                                   scale, start)  # fmt: skip
    return acc / jnp.maximum(total, 1e-30)[..., None]


def attend_columns(q, k_pool, v_pool, page_table, lo, hi, scale: float, carry):
    """The XLA layout's online softmax over each row's positions [lo, hi) in its pages, a page
    column at a time, from carry (max [N, K, G], sum [N, K, G], weighted values [N, K, G, hd],
    all f32). q: [N, K, G, hd]; page_table [N, W]; lo, hi [N]. -> the updated carry."""
    page_table = jnp.asarray(page_table)
    page = k_pool.shape[3]
    qf = q.astype(jnp.float32)
    first = lo // page
    n_cols = jnp.maximum(jnp.max((hi + page - 1) // page - first), 0)

    def column(c, carry):
        top, total, acc = carry
        col = jnp.minimum(first + c, page_table.shape[1] - 1)
        ids = jnp.take_along_axis(page_table, col[:, None], axis=1)[:, 0]
        kc = jnp.take(k_pool, ids, axis=0, mode="clip").astype(jnp.float32)  # [N, K, hd, page]
        vc = jnp.take(v_pool, ids, axis=0, mode="clip")  # [N, K, page, hd]
        # Reductions over non-minor axes (hd, then the page's slots): see attention/kv_cache.py.
        scores = jnp.sum(qf[..., None] * kc[:, :, None], axis=3) * scale  # [N, K, G, page]
        pos = (first + c)[:, None] * page + jnp.arange(page)[None, :]  # [N, page]
        seen = (pos >= lo[:, None]) & (pos < hi[:, None])
        scores = jnp.where(seen[:, None, None], scores, MASK_VALUE)
        new_top = jnp.maximum(top, jnp.max(scores, axis=-1))
        decay = jnp.exp(top - new_top)
        e = jnp.exp(scores - new_top[..., None])
        part = jnp.sum(e.astype(q.dtype)[..., None] * vc[:, :, None].astype(q.dtype), axis=3)
        return new_top, total * decay + jnp.sum(e, axis=-1), acc * decay[..., None] + part

    return jax.lax.fori_loop(0, n_cols, column, carry)
