"""LM-head losses that never hold the [N, T, V] logits: the head is applied to chunks of positions.

With a vocabulary of 152k (Qwen2) the fp32 logits of one micro-batch are the largest array of a
train step (4 x 4608 x 151936 x 4 B = 10.4 GiB, before their log-softmax pieces and cotangent).
Both functions here take the final hidden states h [N, T, D] and the head kernel w [D, V]
instead, and walk T in chunks of C positions, so at most [N, C, V] logits are alive at a time:

- `chunked_logprobs`: log p(target) (and optionally the entropy) per position, for any loss
  built on them (GRPO). Each chunk is rematerialised in the backward pass: one extra [N, C, D] x
  [D, V] matmul per chunk buys the memory.
- `fused_nll`: the SFT loss sum(weight * -log p(target)) as one scalar whose gradient is computed
  in the forward pass, chunk by chunk (the weights are known there), so the backward pass only
  scales it: no rematerialisation and no [N, T, V] array in either pass. Chunks whose weights
  are all zero (prompt or padding positions in every row) skip the head entirely.

Logits are accumulated in fp32 (`preferred_element_type`) whatever the compute dtype.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from metastone_jax.rl import support_logits
from metastone_jax.sharding import constrain


def _chunked(x: jax.Array, chunk: int) -> jax.Array:
    """[N, T, ...] -> [T/C, N, C, ...], zero-padding T up to a multiple of C (padded targets
    are id 0 and padded weights 0; their outputs are dropped)."""
    n, t = x.shape[:2]
    pad = -t % chunk
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(n, (t + pad) // chunk, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _unchunked(x: jax.Array, t: int) -> jax.Array:
    """[T/C, N, C] -> [N, T] (drops the padding)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1)[:, :t]


def _logits(h: jax.Array, w: jax.Array) -> jax.Array:
    """[N, C, D] x [D, V] -> fp32 [N, C, V]."""
    z = jnp.einsum("ncd,dv->ncv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
    return constrain(z, ("batch", "length", "vocab"))


def _like_kernel(x: jax.Array) -> jax.Array:
    """The head's gradient accumulator [D, V], sharded like the kernel (embed over fsdp, vocab
    over tensor), not replicated."""
    return constrain(x, ("embed", "vocab"))


def _check(h, w, targets, chunk):
    if h.ndim != 3 or w.ndim != 2 or h.shape[-1] != w.shape[0]:
        raise ValueError(f"h must be [N, T, D] and w [D, V]; got {h.shape} and {w.shape}")
    if targets.shape != h.shape[:2]:
        raise ValueError(f"targets must be [N, T] = {h.shape[:2]}, got {targets.shape}")
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")


def chunked_logprobs(
    h: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    *,
    chunk: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    with_entropy: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """log softmax(h @ w / temperature)[targets] and its entropy, C positions at a time; with
    top_k / top_p, of the truncated distribution the sampler draws from (`rl.support_logits`).

    h [N, T, D]; w [D, V]; targets [N, T] int -> (logp [N, T] fp32, entropy [N, T] fp32 or None).
    Equal to `rl.token_logprobs` / `rl.entropy_from_logits` on the full logits (cut alike).
    """
    _check(h, w, targets, chunk)
    t = h.shape[1]

    @partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
    def one(w, hc, tc):
        z = support_logits(_logits(hc, w) / temperature, tc, top_k, top_p)
        lse = jax.nn.logsumexp(z, axis=-1)
        logp = jnp.take_along_axis(z, tc[..., None], axis=-1)[..., 0] - lse
        ent = lse - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1) if with_entropy else None
        return logp, ent

    hs, ts = _chunked(h, chunk), _chunked(targets.astype(jnp.int32), chunk)
    logp, ent = jax.lax.map(lambda xs: one(w, *xs), (hs, ts))
    return _unchunked(logp, t), (_unchunked(ent, t) if with_entropy else None)


def fused_nll(
    h: jax.Array, w: jax.Array, targets: jax.Array, weights: jax.Array, *, chunk: int
) -> jax.Array:
    """sum(weights * -log softmax(h @ w)[targets]) -> fp32 scalar, C positions at a time.

    h [N, T, D]; w [D, V]; targets [N, T] int; weights [N, T] (not differentiated: the SFT loss
    passes mask / count). The gradients w.r.t. h and w are formed in the forward pass from
    softmax - onehot per chunk; the backward pass multiplies them by the incoming cotangent.
    """
    _check(h, w, targets, chunk)
    if weights.shape != targets.shape:
        raise ValueError(f"weights must be [N, T] = {targets.shape}, got {weights.shape}")
    return _fused_nll(chunk, h, w, targets.astype(jnp.int32), weights.astype(jnp.float32))


def _nll_and_grads(chunk, h, w, targets, weights):
    t = h.shape[1]
    hs, ts, ws = _chunked(h, chunk), _chunked(targets, chunk), _chunked(weights, chunk)

    def compute(dw, hc, tc, wc):
        z = _logits(hc, w)
        lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
        picked = jnp.take_along_axis(z, tc[..., None], axis=-1)
        loss = jnp.sum(wc * (lse - picked)[..., 0])
        onehot = jax.nn.one_hot(tc, z.shape[-1], dtype=jnp.float32)
        dz = wc[..., None] * (jnp.exp(z - lse) - onehot)  # d loss / d logits [N, C, V]
        dh = jnp.einsum("ncv,dv->ncd", dz, w.astype(jnp.float32)).astype(h.dtype)
        dw = dw + jnp.einsum("ncd,ncv->dv", hc.astype(jnp.float32), dz)
        return _like_kernel(dw), (loss, dh)

    def skip(dw, hc, tc, wc):
        return dw, (jnp.zeros((), jnp.float32), jnp.zeros_like(hc))

    def one(dw, xs):
        # A chunk where every weight is 0 (prompt or padding positions of all rows) adds
        # nothing to the loss or either gradient: skip its three [N, C, D] x [D, V] matmuls.
        return jax.lax.cond(jnp.any(xs[2] != 0), compute, skip, dw, *xs)

    dw0 = _like_kernel(jnp.zeros(w.shape, jnp.float32))
    dw, (losses, dhs) = jax.lax.scan(one, dw0, (hs, ts, ws))
    dh = jnp.moveaxis(dhs, 0, 1).reshape(h.shape[0], -1, h.shape[2])[:, :t]
    return jnp.sum(losses), dh, dw.astype(w.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_nll(chunk, h, w, targets, weights):
    return _nll_and_grads(chunk, h, w, targets, weights)[0]


def _fused_nll_fwd(chunk, h, w, targets, weights):
    loss, dh, dw = _nll_and_grads(chunk, h, w, targets, weights)
    return loss, (dh, dw, targets, weights)


def _fused_nll_bwd(chunk, res, g):
    dh, dw, targets, weights = res
    del targets, weights  # integer / not differentiated: zero cotangents
    g = g.astype(jnp.float32)
    return (g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), None, None


_fused_nll.defvjp(_fused_nll_fwd, _fused_nll_bwd)
