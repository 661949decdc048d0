"""Causal, segment-masked attention through the Pallas TPU splash kernel that ships with jax.

The calling convention and the masking are those of attention/flash.py (the plain-XLA blocked
attention), so the two are interchangeable for training and prefill of whole rows (T == S):

- causal by slot: query slot t sees key slots s <= t;
- a query sees only keys of its own segment id (packing);
- segment 0 is padding: keys there are never seen by a non-padding query, and a query there
  outputs exactly 0 and passes no gradient back.

How it maps onto splash: one MQA kernel (`make_splash_mqa_single_device`) over the G query heads
that share a KV head, vmapped over the batch and the KV heads, so K/V are never repeated. The
kernel's static mask is a CausalMask per query head; its SegmentIds add the same-segment rule.
Splash lets padding queries (segment 0) attend padding keys (segment 0); every query sees at
least its own slot, so no softmax row is empty, and those outputs are then replaced by 0 with a
where on q_segments != 0, which also zeroes their cotangent (so no gradient flows from them).
The kernel applies no scale, so q is scaled first. Lengths are padded up to a multiple of the
block with segment 0 slots at the end (invisible to every real query) and sliced back off.

On anything other than a TPU the kernel only runs with interpret=True (slow; for tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from metastone_jax.sharding import MESH_AXES, logical_to_spec

DEFAULT_BLOCK = 512
LANES = 128  # splash's block_q and block_kv must be multiples of the TPU lane count


def splash_available() -> bool:
    """Whether the splash kernel can run compiled here (a TPU backend)."""
    return jax.default_backend() == "tpu"


def splash_attention(q, k, v, q_segments, k_segments, *, scale: float, interpret: bool = False,
                     block: int = DEFAULT_BLOCK):  # fmt: skip
    """q [B,K,G,T,hd] (G query heads per KV head), k, v [B,K,S,hd] with S == T; q_segments
    [B,T], k_segments [B,S] int (0: padding). -> [B,K,G,T,hd] in q's dtype.

    block: the query and key block of the forward and both backward kernels, a multiple of 128;
    it is clipped to T rounded up to 128, and T is padded up to a multiple of it. A non-padding
    query must see at least one key (true when q_segments == k_segments, as in self-attention).
    """
    b, kh, g, t, hd = q.shape
    s = k.shape[2]
    if t != s or k.shape != (b, kh, s, hd) or v.shape != k.shape:
        raise ValueError(
            f"splash_attention: needs T == S (whole rows; use flash_attention for decode), "
            f"got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if q_segments.shape != (b, t) or k_segments.shape != (b, s):
        raise ValueError(
            f"splash_attention: segments must be [B,T] and [B,S], got q_segments "
            f"{q_segments.shape} and k_segments {k_segments.shape} for q {q.shape}"
        )
    if block <= 0 or block % LANES:
        raise ValueError(f"splash_attention: block must be a multiple of {LANES}, got {block}")
    blk = min(block, _round_up(t, LANES))
    tp = _round_up(t, blk)
    kernel = _kernel(g, tp, blk, interpret)

    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)  # the kernel applies no scale
    pad = tp - t
    qs = jnp.pad(qs, ((0, 0),) * 3 + ((0, pad), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
    q_seg = jnp.pad(q_segments.astype(jnp.int32), ((0, 0), (0, pad)))
    k_seg = jnp.pad(k_segments.astype(jnp.int32), ((0, 0), (0, pad)))

    def one_kv_head(q_h, k_h, v_h, q_seg_b, k_seg_b):  # [G,Tp,hd], [Tp,hd], [Tp,hd], [Tp], [Tp]
        return kernel(q_h, k_h, v_h, segment_ids=splash.SegmentIds(q=q_seg_b, kv=k_seg_b))

    per_row = jax.vmap(one_kv_head, in_axes=(0, 0, 0, None, None))  # over K
    out = jax.vmap(per_row)(qs, k, v, q_seg, k_seg)[:, :, :, :t]  # over B
    # Padding queries attended padding keys inside the kernel: their output (and so their
    # cotangent) is 0 here.
    real = (q_segments != 0)[:, None, None, :, None]
    return jnp.where(real, out, jnp.zeros((), out.dtype)).astype(q.dtype)


def sharded_splash_attention(q, k, v, q_segments, k_segments, *, scale: float,
                             interpret: bool = False, block: int = DEFAULT_BLOCK):  # fmt: skip
    """`splash_attention` under the current mesh: a Pallas call is opaque to XLA's sharding
    propagation (it would gather its operands whole onto every device), so it runs in a
    shard_map over the rows ('batch': data, fsdp) and the KV heads ('kv_heads': tensor), each
    device on its own rows and heads; the sequence is whole inside (all-gathered, as the
    projections before it are). Without a mesh, the plain call."""
    mesh = jax.sharding.get_abstract_mesh()
    attend = functools.partial(splash_attention, scale=scale, interpret=interpret, block=block)
    if mesh.empty or set(mesh.axis_names) != set(MESH_AXES):
        return attend(q, k, v, q_segments, k_segments)
    rows, heads = logical_to_spec(("batch", "kv_heads"), q.shape[:2], dict(mesh.shape),
                                  strict=False)  # fmt: skip
    q_spec = PartitionSpec(rows, heads, None, None, None)
    kv_spec = PartitionSpec(rows, heads, None, None)
    seg_spec = PartitionSpec(rows, None)
    specs = (q_spec, kv_spec, kv_spec, seg_spec, seg_spec)
    sharded = jax.shard_map(attend, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)
    return sharded(q, k, v, q_segments, k_segments)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, length: int, blk: int, interpret: bool):
    """The MQA splash kernel for `heads` query heads over one KV head, causal over (length,
    length). Its mask tables are built from numpy once per configuration; building them under
    ensure_compile_time_eval keeps them concrete (not tracers of whichever jit first asked)."""
    sizes = splash.BlockSizes(
        block_q=blk, block_kv=blk, block_kv_compute=blk,
        block_q_dkv=blk, block_kv_dkv=blk, block_kv_dkv_compute=blk,
        block_q_dq=blk, block_kv_dq=blk,
    )  # fmt: skip
    mask = splash.MultiHeadMask([splash.CausalMask((length, length)) for _ in range(heads)])
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
