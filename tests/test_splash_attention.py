"""The splash-kernel wrapper (attention/splash.py), run in Pallas interpret mode on the CPU,
equals a dense f32 masked-softmax attention in values and in gradients: causal, GQA, left
padding, packed segments with padding at the end, a length that is not a multiple of the block.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metastone_jax.attention.splash import splash_attention, splash_available

EPS = float(jnp.finfo(jnp.float32).eps)


def dense(q, k, v, q_seg, k_seg, scale):
    """The reference in f32: [B,K,G,T,S] scores, an explicit mask (causal, same segment, key not
    padding), softmax; a query that sees no key (a padding query) outputs 0."""
    t, s = q.shape[3], k.shape[2]
    causal = jnp.arange(s)[None, :] <= (jnp.arange(t) + s - t)[:, None]
    mask = causal[None] & (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
    scores = jnp.einsum("bkgqd,bksd->bkgqs", q, k, precision="highest") * scale
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    any_key = mask.any(-1)[:, None, None, :, None]
    probs = jax.nn.softmax(jnp.where(any_key, scores, 0.0), axis=-1) * any_key
    return jnp.einsum("bkgqs,bksd->bkgqd", probs, v, precision="highest")


def _close(actual, desired, terms, what):
    """Both sides are f32 with O(1) inputs and scores (hd-term dot products scaled by
    hd**-0.5); every output or gradient entry is a sum of at most `terms` products, rounded by
    each side its own way (the kernel by blocks with an online max, the reference densely).
    Independent roundings add like a random walk, ~eps * sqrt(terms) * magnitude, so allow 4x
    that (at t = 256: ~2e-5 for values, ~1e-4 for gradients; the observed errors are <= 1e-6
    and <= 8e-6). Mask or scale bugs give errors of order 0.1 to 1."""
    atol = 4 * EPS * np.sqrt(terms) * float(jnp.max(jnp.abs(desired)))
    np.testing.assert_allclose(actual, desired, atol=atol, rtol=0, err_msg=what)


def _segments(t, spans):
    """One row's segment ids from (segment, length) spans (0: padding)."""
    row = np.concatenate([np.full(n, seg) for seg, n in spans])
    assert len(row) == t
    return row


CASES = {
    # name: (b, kh, g, t, hd, per-row spans, block)
    # Cases with the same (g, padded t, block) reuse one cached kernel across separate jits.
    "causal, one block (512 clipped to T)": (1, 2, 1, 256, 64, [[(1, 256)]], 512),
    "causal, GQA": (2, 2, 2, 256, 64, [[(1, 256)], [(1, 256)]], 128),
    "left padding, GQA": (2, 1, 2, 256, 128, [[(0, 40), (1, 216)], [(0, 150), (1, 106)]], 128),
    "packed segments, end padding": (
        2,
        2,
        2,
        256,
        64,
        [[(1, 60), (2, 100), (3, 96)], [(1, 130), (2, 70), (3, 20), (0, 36)]],
        128,
    ),
    # T = 200 is padded up to 256 (two blocks of 128) inside the wrapper.
    "packed, length not a multiple of the block": (
        1,
        1,
        2,
        200,
        64,
        [[(0, 10), (1, 90), (2, 100)]],
        128,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_values_and_gradients_equal_the_dense_attention(name):
    b, kh, g, t, hd, spans, block = CASES[name]
    rng = np.random.default_rng(len(name))
    q = jnp.asarray(rng.standard_normal((b, kh, g, t, hd)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, kh, t, hd)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, kh, t, hd)), jnp.float32)
    seg = jnp.asarray(np.stack([_segments(t, r) for r in spans]), jnp.int32)
    scale = hd**-0.5
    # A random cotangent on every query, padding ones included: the wrapper must pass no
    # gradient back from them, as the reference (which outputs a constant 0 there) does not.
    d_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    ours = jax.jit(
        lambda q, k, v: splash_attention(
            q, k, v, seg, seg, scale=scale, interpret=True, block=block
        )  # fmt: skip
    )
    ref = jax.jit(lambda q, k, v: dense(q, k, v, seg, seg, scale))
    out, vjp = jax.vjp(ours, q, k, v)
    got = vjp(d_out)
    want_out, ref_vjp = jax.vjp(ref, q, k, v)
    want = ref_vjp(d_out)

    assert out.dtype == q.dtype and out.shape == q.shape
    _close(out, want_out, t, "out")
    for which, a, e in zip("qkv", got, want, strict=True):
        _close(a, e, g * t, f"d{which}")  # dk, dv also sum over the G heads sharing a KV head
    padding = np.asarray(seg == 0)[:, None, None, :, None]
    assert np.all(np.asarray(out)[np.broadcast_to(padding, out.shape)] == 0.0)
    assert np.all(np.asarray(got[0])[np.broadcast_to(padding, q.shape)] == 0.0)


def test_queries_and_keys_of_different_lengths_are_an_error():
    q = jnp.zeros((1, 1, 2, 128, 64), jnp.float32)
    k = jnp.zeros((1, 1, 256, 64), jnp.float32)
    seg_q, seg_k = jnp.ones((1, 128), jnp.int32), jnp.ones((1, 256), jnp.int32)
    with pytest.raises(ValueError, match=r"T == S.*\(1, 1, 2, 128, 64\).*\(1, 1, 256, 64\)"):
        splash_attention(q, k, k, seg_q, seg_k, scale=1.0, interpret=True)


def test_block_must_be_a_multiple_of_the_lanes():
    q = jnp.zeros((1, 1, 1, 128, 64), jnp.float32)
    k = jnp.zeros((1, 1, 128, 64), jnp.float32)
    seg = jnp.ones((1, 128), jnp.int32)
    with pytest.raises(ValueError, match="multiple of 128"):
        splash_attention(q, k, k, seg, seg, scale=1.0, interpret=True, block=96)


def test_available_only_on_tpu():
    assert splash_available() == (jax.default_backend() == "tpu")


def test_sharded_call_on_a_2x2x2_mesh_equals_the_dense_attention():
    """Under a mesh the kernel runs in a shard_map over rows (data, fsdp) and KV heads
    (tensor); each device's share must give the dense values and gradients."""
    from metastone_jax.attention.splash import sharded_splash_attention
    from metastone_jax.sharding import make_mesh

    b, kh, g, t, hd = 4, 2, 2, 128, 64
    rng = np.random.default_rng(5)
    q, d_out = (jnp.asarray(rng.standard_normal((b, kh, g, t, hd)), jnp.float32) for _ in "12")
    k, v = (jnp.asarray(rng.standard_normal((b, kh, t, hd)), jnp.float32) for _ in "12")
    spans = [[(1, 128)], [(0, 28), (1, 100)], [(1, 50), (2, 78)], [(1, 90), (0, 38)]]
    seg = jnp.asarray(np.stack([_segments(t, r) for r in spans]), jnp.int32)
    scale = hd**-0.5
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})

    def ours(q, k, v):
        return sharded_splash_attention(q, k, v, seg, seg, scale=scale, interpret=True,
                                        block=128)  # fmt: skip

    @jax.jit
    def forward_backward(q, k, v, d_out):
        out, vjp = jax.vjp(ours, q, k, v)
        return out, vjp(d_out)

    with jax.set_mesh(mesh):
        out, got = forward_backward(q, k, v, d_out)
        hlo = forward_backward.lower(q, k, v, d_out).compile().as_text()
    want_out, ref_vjp = jax.vjp(lambda q, k, v: dense(q, k, v, seg, seg, scale), q, k, v)
    _close(out, want_out, t, "out")
    for which, a, e in zip("qkv", got, ref_vjp(d_out), strict=True):
        _close(a, e, g * t, f"d{which}")
    # Each device attends its own row and KV head: per-device q is [1, 1, G, T, hd].
    assert f"f32[1,1,{g},{t},{hd}]" in hlo
