"""The paged KV pool for TPU: jax's ragged paged attention kernel (Pallas, Mosaic) for decode.

Layout (one layer): the kernel's own, K and V in ONE array. `k` is kv_pages
[P, page, 2K, hdp]: kv head h's key at combined head 2h, its value at 2h+1; hdp is head_dim
rounded up to 128 (the TPU lane width: Mosaic tiles the minor axis by 128; vLLM pads the same
way), the padding is zeros. `v` is an empty placeholder of shape (0,), kept so the pool has the
(k, v) form of the XLA layout; `write` returns it unchanged and `attend` ignores it.

On TPU `attend` runs the compiled kernel. Elsewhere it runs only inside `interpret()`, which runs
the kernel in Pallas' TPU interpret mode on CPU (slow: tests on small shapes only).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as rpa

from metastone_jax import optional

LANES = 128  # head_dim is padded to a multiple of this

# (kv pages per block, queries per block) while `interpret()` is active, else None: on TPU the
# kernel picks its tuned block sizes, which need a TPU to look up.
_interpret_blocks: tuple[int, int] | None = None


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pool_shapes(n_pages: int, page_size: int, n_kv_heads: int, head_dim: int):
    """(k shape, v shape): ([P, page, 2K, hdp], (0,)); see the module docstring."""
    return (n_pages, page_size, 2 * n_kv_heads, _round_up(head_dim, LANES)), (0,)


def pool_page_size(k: jax.Array) -> int:
    return k.shape[1]


def _check_kv_heads(n_kv_heads: int, dtype) -> None:
    # The kernel loads all 2K combined heads of a page as one tile: 2K / (32 / bits) must be
    # 1, 2, 4, 8 or a multiple of 8 (get_min_heads_per_blk raises "Not implemented" otherwise).
    packing = 4 // jnp.dtype(dtype).itemsize  # values per 32-bit word
    rows = 2 * n_kv_heads
    if rows % packing or not (rows // packing in (1, 2, 4, 8) or (rows // packing) % 8 == 0):
        raise ValueError(
            f"attention_impl='pallas': n_kv_heads={n_kv_heads} with a {jnp.dtype(dtype).name} "
            "cache is not served by the ragged paged attention kernel (2*n_kv_heads/packing "
            f"must be 1, 2, 4, 8 or a multiple of 8, packing={packing}); use attention_impl='xla'"
        )


def write(k_pool, v_pool, k_new, v_new, page_ids, offsets):
    """Writes tokens into one layer's pool. k_new, v_new: [N, T, K, hd]; page_ids, offsets:
    [N, T] int32 (a page id < 0 or >= P: not written). -> (k_pool, v_pool)."""
    n, t, kh, hd = k_new.shape
    n_pages, _, heads2, hdp = k_pool.shape
    if heads2 != 2 * kh or hdp != _round_up(hd, LANES):
        raise ValueError(
            f"pallas pool {k_pool.shape} does not hold {kh} kv heads of head_dim {hd}: "
            f"expected [P, page, {2 * kh}, {_round_up(hd, LANES)}]"
        )
    kv = jnp.stack([k_new, v_new], axis=3).reshape(n, t, 2 * kh, hd)  # k at 2h, v at 2h+1
    kv = jnp.pad(kv.astype(k_pool.dtype), ((0, 0), (0, 0), (0, 0), (0, hdp - hd)))
    page_ids = jnp.where(page_ids < 0, n_pages, page_ids)  # out of range: dropped
    # Advanced indices on axes 0 and 1: the update is laid [N, T, 2K, hdp].
    return k_pool.at[page_ids, offsets].set(kv, mode="drop"), v_pool


def attend(q, k_pool, v_pool, page_table, kv_len, scale: float):
    """Single-token attention over each sequence's pages with the ragged kernel.

    q: [N, K, G, hd] (rotary applied, not scaled); page_table: [N, W] int32; kv_len: [N].
    -> [N, K, G, hd] f32 (computed in the pool's dtype, f32 accumulation)."""
    del v_pool  # placeholder: K and V both live in k_pool
    n, kh, g, hd = q.shape
    hdp = k_pool.shape[3]
    if k_pool.shape[2] != 2 * kh or hdp != _round_up(hd, LANES):
        raise ValueError(f"pallas pool {k_pool.shape} does not match q {q.shape}")
    _check_kv_heads(kh, k_pool.dtype)
    if _interpret_blocks is None and jax.default_backend() != "tpu":
        raise RuntimeError(
            f"attention_impl='pallas' runs the TPU kernel: on {jax.default_backend()!r} use "
            "attention_impl='xla' (or paged_tpu.interpret() in tests)"
        )
    blocks = (None, None)
    if _interpret_blocks is not None:
        kv_pages, queries = _interpret_blocks
        blocks = (min(kv_pages, page_table.shape[1]), queries)
    # Query head k*G + g reads kv head k: the kernel's grouping (q head // G).
    qk = q.astype(k_pool.dtype).reshape(n, kh * g, hd)
    qk = jnp.pad(qk, ((0, 0), (0, 0), (0, hdp - hd)))  # zero lanes add nothing to q.k
    out = rpa.ragged_paged_attention(
        qk,
        k_pool,
        # A row with kv_len 0 would never be stored by the kernel (garbage out); 1 reads slot 0
        # of a valid page instead: finite, and such rows are padding.
        jnp.maximum(kv_len, 1).astype(jnp.int32),
        page_table.astype(jnp.int32),
        jnp.arange(n + 1, dtype=jnp.int32),  # cu_q_lens: one query per sequence
        jnp.array([n], jnp.int32),  # num_seqs
        sm_scale=float(scale),
        num_kv_pages_per_block=blocks[0],
        num_queries_per_block=blocks[1],
    )
    return out[..., :hd].reshape(n, kh, g, hd).astype(jnp.float32)


@contextlib.contextmanager
def interpret(kv_pages_per_block: int = 2, queries_per_block: int = 8):
    """Runs `attend`'s kernel in Pallas' TPU interpret mode (any backend; for tests).

    Small blocks so that small test shapes still cross block boundaries."""
    global _interpret_blocks
    prev = _interpret_blocks
    with _interpreter_fixes(), pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        _interpret_blocks = (kv_pages_per_block, queries_per_block)
        try:
            yield
        finally:
            _interpret_blocks = prev


# --- Two fixes to jax 0.10.2's TPU interpreter, needed by the ragged kernel and active only
# inside `interpret()`. Without them the kernel fails in interpret mode with
#   AttributeError: 'ReshapeTransform' object has no attribute 'indices'  (f32; bf16 gives the
#     same for 'BitcastTransform'): loads support only index transforms of a ref, the kernel
#     loads through kv_bufs.reshape(...) and, for bf16, ref.bitcast(uint32);
#   ValueError: Out-of-bounds masked swap ... swapping [(0:8, 0:2, 0:128)] but buffer has shape
#     (8, 4, 128): SharedMemory.swap_buffer_content marks masked elements out of bounds along
#     axis 0 for every axis's extent (`in_bounds_mask[in_bounds_shape[i]:] = False`).


def _np_bitcast(x: np.ndarray, dtype) -> np.ndarray:
    """jax._src.state.utils.bitcast in numpy: the 2nd-minor axis packs/unpacks, low bits first."""
    dtype = np.dtype(dtype)
    src, dst = x.dtype.itemsize, dtype.itemsize
    if src < dst:
        r = dst // src
        x = x.reshape(*x.shape[:-2], x.shape[-2] // r, r, x.shape[-1]).swapaxes(-1, -2)
        return np.ascontiguousarray(x).view(dtype)[..., 0]
    if src > dst:
        y = np.ascontiguousarray(x)[..., None].view(dtype)  # [..., m, n, r]
        return y.swapaxes(-1, -2).reshape(*x.shape[:-2], -1, x.shape[-1])
    return x.view(dtype)


@contextlib.contextmanager
def _interpreter_fixes():
    internals = optional.pallas_interpret_internals()
    ipc, sm, iu = internals.interpret_pallas_call, internals.shared_memory, internals.utils
    indexing = internals.indexing
    BitcastTransform = internals.state_types.BitcastTransform
    ReshapeTransform = internals.state_types.ReshapeTransform
    orig_get = ipc.get
    raw_get = orig_get.__wrapped__  # DMAs call `get.__wrapped__`
    orig_swap = sm.SharedMemory.swap_buffer_content

    def get(token, device_id, local_core_id, memory_space, buffer_id, transforms, *a, **kw):
        # Read through the leading index transforms, then apply the rest to the array.
        ts = list(transforms)
        cut = next((i for i, t in enumerate(ts) if not isinstance(t, indexing.NDIndexer)), None)
        if cut is None:
            return raw_get(token, device_id, local_core_id, memory_space, buffer_id, ts, *a, **kw)
        token, x = raw_get(
            token, device_id, local_core_id, memory_space, buffer_id, ts[:cut], *a, **kw
        )
        x = np.asarray(x)
        for t in ts[cut:]:
            if isinstance(t, ReshapeTransform):
                x = x.reshape(t.shape)
            elif isinstance(t, BitcastTransform):
                x = _np_bitcast(x, t.dtype)
            else:
                t = jax.tree.map(int, t)
                x = x[tuple(iu._transform_slice_or_index(i) for i in t.indices)]
        return token, x

    def swap_buffer_content(self, key, rnge, value, mask, *a, **kw):
        # A fully in-bounds masked swap is the unmasked swap of the merged value.
        if mask is not None:
            try:
                old = self.mem[key][rnge].copy()
            except IndexError:
                old = None
            if old is not None and old.shape == value.shape:
                merged = np.where(mask, value, old)
                ret, shape_dtype, clock = orig_swap(self, key, rnge, merged, None, *a, **kw)
                return np.where(mask, ret, value), shape_dtype, clock
        return orig_swap(self, key, rnge, value, mask, *a, **kw)

    ipc.get = ipc.fail_on_exception(get)
    sm.SharedMemory.swap_buffer_content = swap_buffer_content
    try:
        yield
    finally:
        ipc.get = orig_get
        sm.SharedMemory.swap_buffer_content = orig_swap


__all__ = ["attend", "interpret", "pool_page_size", "pool_shapes", "write"]
