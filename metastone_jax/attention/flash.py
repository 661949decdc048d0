"""Blocked online-softmax attention in plain XLA (flash-style), for training and prefill.

Memory is linear in the length: a query block attends to one key block at a time with a running
max and sum, so neither [B,H,T,S] scores nor a [B,T,S] mask exist; the mask comes from slot
order (causal) and segment ids (packing, padding). The backward pass recomputes each block's
probabilities from the saved log-sum-exp (a custom VJP, as FlashAttention does), so the
residuals are q, k, v, the output and one f32 per query and head.

Causality is by slot: key slot s is visible to query slot t when s <= t + (S - T) (queries are
the last T of the S key slots; T == S in training). Key blocks wholly after a query block are
skipped, so the causal work is ~half of T x S. Segment ids: a query sees keys of its own segment
only; segment 0 marks padding (never attended; a query there sees nothing and outputs 0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from metastone_jax.attention import MASK_VALUE

DEFAULT_BLOCK = 512


def flash_attention(q, k, v, q_segments, k_segments, *, scale: float,
                    block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK):  # fmt: skip
    """q [B,K,G,T,hd] (G query heads per KV head), k, v [B,K,S,hd]; q_segments [B,T],
    k_segments [B,S] int (0: padding). -> [B,K,G,T,hd] in q's dtype.

    Lengths that are not a multiple of the blocks are padded up (padding is segment 0)."""
    t, s = q.shape[3], k.shape[2]
    if t > s:
        raise ValueError(f"flash_attention: {t} queries but only {s} key slots")
    bq, bk = min(block_q, _round_up(t, 8)), min(block_k, _round_up(s, 8))
    tp, sp = _round_up(t, bq), _round_up(s, bk)
    # Queries are the last t of s slots; pad queries at the end and keys at the end, keeping
    # each query's key offset (s - t) by padding the queries to the same end.
    q = jnp.pad(q, ((0, 0),) * 3 + ((0, tp - t), (0, 0)))
    q_segments = jnp.pad(q_segments, ((0, 0), (0, tp - t)))
    k = jnp.pad(k, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    k_segments = jnp.pad(k_segments, ((0, 0), (0, sp - s)))
    out = _flash(q, k, v, q_segments.astype(jnp.int32), k_segments.astype(jnp.int32),
                 scale, bq, bk, s - t)  # fmt: skip
    return out[:, :, :, :t]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _blocks(bq, bk, offset, i, nk):
    """Key blocks [0, end) that query block i can see (causal by slot)."""
    last_slot = (i + 1) * bq - 1 + offset
    return jnp.minimum(last_slot // bk + 1, nk)


def _first_query_block(bq, bk, offset, j, nq):
    """The first query block that sees key block j."""
    return jnp.clip((j * bk - offset) // bq, 0, nq)


def _scores(qi, kj, qseg, kseg, i, j, bq, bk, offset, scale):
    """One block's scaled scores [B,K,G,bq,bk] f32 and its mask [B,1,1,bq,bk]."""
    s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
    q_slot = i * bq + jnp.arange(bq) + offset
    k_slot = j * bk + jnp.arange(bk)
    causal = k_slot[None, :] <= q_slot[:, None]
    same = (qseg[:, :, None] == kseg[:, None, :]) & (kseg[:, None, :] != 0)
    mask = (causal[None] & same)[:, None, None]
    return s, mask


def _slice(x, start, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, start * size, size, axis)


def _forward(q, k, v, qseg, kseg, scale, bq, bk, offset):
    b, kh, g, tp, hd = q.shape
    nq, nk = tp // bq, k.shape[2] // bk

    def query_block(i):
        qi, qsi = _slice(q, i, bq, 3), _slice(qseg, i, bq, 1)

        def key_block(j, carry):
            top, total, acc = carry
            kj, vj, ksj = _slice(k, j, bk, 2), _slice(v, j, bk, 2), _slice(kseg, j, bk, 1)
            s, mask = _scores(qi, kj, qsi, ksj, i, j, bq, bk, offset, scale)
            new_top = jnp.maximum(top, jnp.max(jnp.where(mask, s, MASK_VALUE), axis=-1))
            p = jnp.where(mask, jnp.exp(s - new_top[..., None]), 0.0)
            decay = jnp.exp(top - new_top)
            part = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), vj,
                              preferred_element_type=jnp.float32)  # fmt: skip
            return new_top, total * decay + p.sum(-1), acc * decay[..., None] + part

        start = (jnp.full((b, kh, g, bq), MASK_VALUE, jnp.float32),
                 jnp.zeros((b, kh, g, bq), jnp.float32),
                 jnp.zeros((b, kh, g, bq, hd), jnp.float32))  # fmt: skip
        top, total, acc = jax.lax.fori_loop(0, _blocks(bq, bk, offset, i, nk), key_block, start)
        out = acc / jnp.maximum(total, 1e-30)[..., None]
        lse = top + jnp.log(jnp.maximum(total, 1e-30))  # fully masked rows: p below is 0
        return out.astype(q.dtype), lse

    out, lse = jax.lax.map(query_block, jnp.arange(nq))  # [nq, B,K,G,bq,(hd)]
    out = jnp.moveaxis(out, 0, 3).reshape(b, kh, g, tp, hd)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, kh, g, tp)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, qseg, kseg, scale, bq, bk, offset):
    return _forward(q, k, v, qseg, kseg, scale, bq, bk, offset)[0]


def _flash_fwd(q, k, v, qseg, kseg, scale, bq, bk, offset):
    out, lse = _forward(q, k, v, qseg, kseg, scale, bq, bk, offset)
    return out, (q, k, v, qseg, kseg, out, lse)


def _flash_bwd(scale, bq, bk, offset, res, d_out):
    q, k, v, qseg, kseg, out, lse = res
    b, kh, g, tp, hd = q.shape
    nq, nk = tp // bq, k.shape[2] // bk
    # D_t = sum_d dO * O: the softmax's Jacobian term, one per query and head.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    def probs(i, j):
        """Block (i, j)'s probabilities from the saved log-sum-exp, and its inputs."""
        qi, kj = _slice(q, i, bq, 3), _slice(k, j, bk, 2)
        s, mask = _scores(qi, kj, _slice(qseg, i, bq, 1), _slice(kseg, j, bk, 1), i, j, bq, bk,
                          offset, scale)  # fmt: skip
        p = jnp.where(mask, jnp.exp(s - _slice(lse, i, bq, 3)[..., None]), 0.0)
        do_i = _slice(d_out, i, bq, 3)
        dp = jnp.einsum("bkgqd,bksd->bkgqs", do_i, _slice(v, j, bk, 2),
                        preferred_element_type=jnp.float32)  # fmt: skip
        ds = p * (dp - _slice(delta, i, bq, 3)[..., None]) * scale
        return qi, kj, p, do_i, ds

    def dq_block(i):  # dq_i = sum_j dS_ij k_j
        def step(j, acc):
            _, kj, _, _, ds = probs(i, j)
            return acc + jnp.einsum("bkgqs,bksd->bkgqd", ds, kj.astype(jnp.float32))

        zero = jnp.zeros((b, kh, g, bq, hd), jnp.float32)
        return jax.lax.fori_loop(0, _blocks(bq, bk, offset, i, nk), step, zero)

    def dkv_block(j):  # dk_j = sum_i dS_ij^T q_i, dv_j = sum_i P_ij^T dO_i (summed over G)
        def step(i, carry):
            dk, dv = carry
            qi, _, p, do_i, ds = probs(i, j)
            dk = dk + jnp.einsum("bkgqs,bkgqd->bksd", ds, qi.astype(jnp.float32))
            dv = dv + jnp.einsum("bkgqs,bkgqd->bksd", p, do_i.astype(jnp.float32))
            return dk, dv

        zero = jnp.zeros((b, kh, bk, hd), jnp.float32)
        return jax.lax.fori_loop(_first_query_block(bq, bk, offset, j, nq), nq, step, (zero, zero))

    dq = jnp.moveaxis(jax.lax.map(dq_block, jnp.arange(nq)), 0, 3).reshape(q.shape)
    dk, dv = jax.lax.map(dkv_block, jnp.arange(nk))
    dk = jnp.moveaxis(dk, 0, 2).reshape(k.shape)
    dv = jnp.moveaxis(dv, 0, 2).reshape(v.shape)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
