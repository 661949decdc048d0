"""Model properties: causality, padding, cached decoding, the SPRM head, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import (
    bf16_rounding_tol,
    fp32_reduction_tol,
    sprm_head_terms,
    transformer_bf16_roundings,
    transformer_terms,
)

from metastone_jax.attention.kv_cache import KVCache
from metastone_jax.model import create_model
from metastone_jax.presets import get_preset

CFG = get_preset("tiny")


@pytest.fixture(scope="module")
def model():
    return create_model(CFG, seed=0)


def _tokens(b, t, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t))


def test_future_tokens_do_not_change_earlier_logits(model):
    tokens = _tokens(2, 24)
    changed = tokens.copy()
    changed[:, 15:] = (changed[:, 15:] + 7) % CFG.vocab_size
    a, b = model(tokens), model(changed)
    np.testing.assert_array_equal(np.asarray(a.logits[:, :15]), np.asarray(b.logits[:, :15]))
    np.testing.assert_array_equal(np.asarray(a.features[:, :15]), np.asarray(b.features[:, :15]))
    assert np.abs(np.asarray(a.logits[:, 15:] - b.logits[:, 15:])).max() > 1e-3


def test_padded_tokens_change_no_valid_logit(model):
    tokens = _tokens(2, 20, seed=1)
    valid = np.ones((2, 20), bool)
    valid[0, :6] = False  # left padding
    valid[1, 12:] = False  # right padding
    changed = tokens.copy()
    changed[~valid] = (changed[~valid] + 11) % CFG.vocab_size
    a = np.asarray(model(tokens, valid=valid).logits)
    b = np.asarray(model(changed, valid=valid).logits)
    np.testing.assert_array_equal(a[valid], b[valid])
    assert np.isfinite(a).all() and np.isfinite(b).all()


def test_left_padding_equals_unpadded_sequence(model):
    tokens = _tokens(1, 12, seed=2)
    padded = np.concatenate([np.zeros((1, 5), tokens.dtype), tokens], axis=1)
    valid = np.concatenate([np.zeros((1, 5), bool), np.ones((1, 12), bool)], axis=1)
    ref = np.asarray(model(tokens).logits)
    got = np.asarray(model(padded, valid=valid).logits)[:, 5:]
    # The padded forward sums over 17 positions (5 masked) in its own order; scale: max |logit|.
    tol = fp32_reduction_tol(transformer_terms(CFG, padded.shape[1]), np.abs(ref).max())
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol)


def test_cached_decoding_equals_full_forward(model):
    tokens = _tokens(3, 18, seed=3)
    full = model(tokens)
    cache = KVCache.init(CFG, batch_size=3, max_len=32)
    step = jax.jit(lambda toks, c: model(toks, cache=c))
    logits, feats = [], []
    for t in range(tokens.shape[1]):
        out = step(tokens[:, t : t + 1], cache)
        cache = out.cache
        logits.append(out.logits)
        feats.append(out.features)
    assert int(cache.index) == tokens.shape[1]
    # Decoding attends over the cache's 32 slots; features: the first L - 1 blocks' output.
    n_logit = transformer_terms(CFG, cache.valid.shape[1])
    n_feat = transformer_terms(CFG, cache.valid.shape[1], n_layers=CFG.n_layers - 1, lm_head=False)
    for got, want, n in ((logits, full.logits, n_logit), (feats, full.features, n_feat)):
        want = np.asarray(want)
        tol = fp32_reduction_tol(n, np.abs(want).max())  # scale: max |logit| / |feature|
        np.testing.assert_allclose(np.asarray(jnp.concatenate(got, 1)), want, rtol=0, atol=tol)


def test_prefill_then_decode_with_left_padding(model):
    """A left-padded prompt prefilled into the cache, then decoded: same as the unpadded forward."""
    seq = _tokens(1, 14, seed=4)
    prompt_len, pad = 9, 4
    prompt = np.concatenate([np.zeros((1, pad), seq.dtype), seq[:, :prompt_len]], axis=1)
    valid = np.concatenate([np.zeros((1, pad), bool), np.ones((1, prompt_len), bool)], axis=1)
    cache = KVCache.init(CFG, batch_size=1, max_len=24)
    out = model(prompt, valid=valid, cache=cache)
    logits = [out.logits[:, pad:]]
    cache = out.cache
    for t in range(prompt_len, seq.shape[1]):
        out = model(seq[:, t : t + 1], cache=cache)
        cache = out.cache
        logits.append(out.logits)
    ref = np.asarray(model(seq).logits)
    # Decoding attends over the cache's 24 slots; scale: max |logit|.
    tol = fp32_reduction_tol(transformer_terms(CFG, cache.valid.shape[1]), np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(jnp.concatenate(logits, 1)), ref, rtol=0, atol=tol)


def test_cache_repeat_for_k_candidates(model):
    prompt = _tokens(2, 6, seed=5)
    cache = model(prompt, cache=KVCache.init(CFG, 2, 16)).cache.repeat(3)
    assert cache.k[0].shape[0] == 6 and cache.valid.shape == (6, 16)
    nxt = np.repeat(_tokens(2, 1, seed=6), 3, axis=0)
    out = model(nxt, cache=cache)
    ref = np.asarray(model(np.concatenate([prompt, nxt[::3]], axis=1)).logits[:, -1])
    # Decoding attends over the cache's 16 slots; scale: max |logit|.
    tol = fp32_reduction_tol(transformer_terms(CFG, cache.valid.shape[1]), np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(out.logits[::3, 0]), ref, rtol=0, atol=tol)


def test_sprm_head_shape_count_and_dropout(model):
    from flax import nnx

    d = CFG.d_model
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model.sprm, nnx.Param)))
    assert n == 2 * d * d + 4 * d + 1 == CFG.sprm_param_count
    feats = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, d)), jnp.float32)
    det = model.sprm_logits(feats)
    assert det.shape == (2, 5)
    np.testing.assert_array_equal(np.asarray(det), np.asarray(model.sprm_logits(feats)))
    w1, b1 = model.sprm.fc1.kernel[...], model.sprm.fc1.bias[...]
    w2, b2 = model.sprm.fc2.kernel[...], model.sprm.fc2.bias[...]
    ref = np.maximum(np.asarray(feats) @ w1 + b1, 0) @ w2 + b2  # Linear -> ReLU -> Linear
    # numpy's fp32 matmuls in another order: D + 2D terms; scale: max |head logit|.
    tol = fp32_reduction_tol(sprm_head_terms(d), np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(det), ref[..., 0], rtol=0, atol=tol)
    dropped = model.sprm_logits(feats, dropout_rng=jax.random.key(1))
    assert np.abs(np.asarray(dropped - det)).max() > 1e-4


def test_bf16_compute_close_to_fp32():
    cfg32 = get_preset("tiny")
    m32 = create_model(cfg32, seed=1)
    m16 = create_model(cfg32.replace(compute_dtype="bfloat16"), seed=1)
    tokens = _tokens(2, 16, seed=7)
    a = np.asarray(m32(tokens).logits)
    b = m16(tokens)
    assert b.logits.dtype == jnp.float32 and b.features.dtype == jnp.bfloat16
    # Every rounding to bf16 on the way to a logit adds <= 2^-8 relative; scale: max |logit|.
    tol = bf16_rounding_tol(transformer_bf16_roundings(cfg32), np.abs(a).max())
    np.testing.assert_allclose(np.asarray(b.logits), a, rtol=0, atol=tol)
