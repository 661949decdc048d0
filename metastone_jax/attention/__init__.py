"""Attention over keys and values, and the KV caches it reads; below `layers.Attention`.

kv_cache.py: the dense per-layer `KVCache` of the static sampler (prefill and decode).
paged.py: the paged KV pool (layouts, writes, page copies) and the XLA attention over pages.
paged_tpu.py: the pool's TPU layout and jax's ragged paged attention kernel (Pallas).
segment_kv.py: the XLA path's dense working set of one decode segment (sample/engine.py).
flash.py: blocked online-softmax attention in plain XLA (training and prefill).
splash.py: the Pallas TPU splash kernel behind flash.py's interface.

`MASK_VALUE` is the score of a masked slot, shared by all of them.
"""

from __future__ import annotations

import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: fully masked rows stay NaN-free
