"""The blocked online-softmax attention (attention/flash.py) equals a dense softmax attention
with an explicit mask, in values and in gradients: causal, packed segments, GQA, left padding,
queries that are the last T of S slots, lengths that are not a multiple of the blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metastone_jax.attention.flash import flash_attention

EPS = float(jnp.finfo(jnp.float32).eps)


def dense(q, k, v, q_seg, k_seg, scale):
    """The reference: [B,K,G,T,S] scores, an explicit mask, softmax; a query that sees no key
    outputs 0 (as the blocked kernel defines it)."""
    t, s = q.shape[3], k.shape[2]
    causal = jnp.arange(s)[None, :] <= (jnp.arange(t) + s - t)[:, None]
    mask = causal[None] & (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
    scores = jnp.einsum("bkgqd,bksd->bkgqs", q, k) * scale
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    any_key = mask.any(-1)[:, None, None, :, None]
    probs = jax.nn.softmax(jnp.where(any_key, scores, 0.0), axis=-1) * any_key
    return jnp.einsum("bkgqs,bksd->bkgqd", probs, v)


def _case(seed, b, kh, g, t, s, hd, segments):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, kh, g, t, hd)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, kh, s, hd)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, kh, s, hd)), jnp.float32)
    k_seg = jnp.asarray(segments, jnp.int32)
    return q, k, v, k_seg[:, s - t :], k_seg


def _segments(s, spans):
    """One row's segment ids from (segment, length) spans (0: padding)."""
    row = np.concatenate([np.full(n, seg) for seg, n in spans])
    assert len(row) == s
    return row


CASES = {
    # name: (b, kh, g, t, s, hd, per-row spans, (block_q, block_k))
    "causal, one block": (1, 2, 2, 16, 16, 8, [[(1, 16)]], (16, 16)),
    "causal, GQA, square blocks": (2, 2, 3, 40, 40, 8, [[(1, 40)], [(1, 40)]], (8, 8)),
    "left padding, tall blocks": (
        2,
        1,
        2,
        37,
        37,
        8,
        [[(0, 5), (1, 32)], [(0, 20), (1, 17)]],
        (16, 8),
    ),
    "packed segments, wide blocks": (
        2,
        2,
        2,
        48,
        48,
        8,
        [[(1, 10), (2, 25), (3, 13)], [(1, 30), (2, 11), (0, 7)]],
        (8, 24),
    ),
    "packed segments, tall blocks": (
        2,
        2,
        2,
        48,
        48,
        8,
        [[(1, 10), (2, 25), (3, 13)], [(1, 30), (2, 11), (0, 7)]],
        (16, 8),
    ),
    "queries the last T of S": (1, 2, 2, 12, 45, 8, [[(0, 3), (1, 42)]], (8, 16)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_values_and_gradients_equal_the_dense_attention(name):
    b, kh, g, t, s, hd, spans, blocks = CASES[name]
    q, k, v, q_seg, k_seg = _case(len(name), b, kh, g, t, s, hd, [_segments(s, r) for r in spans])
    scale = hd**-0.5
    # A fixed cotangent on the queries that see a key (padding queries are outside any loss).
    seen = np.asarray(q_seg != 0)[:, None, None, :, None]
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape) * seen, jnp.float32)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * w)

    ours = lambda q, k, v: flash_attention(  # noqa: E731
        q, k, v, q_seg, k_seg, scale=scale, block_q=blocks[0], block_k=blocks[1]
    )
    ref = lambda q, k, v: dense(q, k, v, q_seg, k_seg, scale)  # noqa: E731
    # f32 sums of up to s terms of O(1) values, each side rounding its own way.
    tol = 8 * EPS * s
    np.testing.assert_allclose(jax.jit(ours)(q, k, v) * seen, ref(q, k, v) * seen, atol=tol,
                               rtol=tol)  # fmt: skip
    got = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2)))(q, k, v)
    for name_, a, e in zip("qkv", got, want, strict=True):
        np.testing.assert_allclose(a, e, atol=4 * tol, rtol=4 * tol, err_msg=f"d{name_}")


def test_causal_blocks_after_the_query_are_never_read():
    """Keys wholly after a query block are skipped, not masked: NaN there changes nothing."""
    q, k, v, q_seg, k_seg = _case(0, 1, 1, 1, 32, 32, 8, [np.ones(32)])
    k_nan = k.at[:, :, 16:].set(jnp.nan)
    v_nan = v.at[:, :, 16:].set(jnp.nan)
    out = flash_attention(q, k_nan, v_nan, q_seg, k_seg, scale=0.3, block_q=16, block_k=16)
    ref = dense(q, k, v, q_seg, k_seg, 0.3)
    np.testing.assert_allclose(out[:, :, :, :16], ref[:, :, :, :16], atol=8 * EPS * 32)


def test_more_queries_than_keys_is_an_error():
    q, k, v, _, k_seg = _case(0, 1, 1, 1, 8, 8, 4, [np.ones(8)])
    with pytest.raises(ValueError, match="16 queries but only 8 key slots"):
        flash_attention(jnp.concatenate([q, q], 3), k, v, jnp.ones((1, 16)), k_seg, scale=1.0)
