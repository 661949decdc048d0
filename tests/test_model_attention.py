"""The model's attention settings (ModelConfig.attention) and packed rows (segment_ids).

Flash attention (blocked online softmax) must give the dense path's logits and gradients;
a packed row (several sequences, segment ids) must give each sequence's own logits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerances import fp32_reduction_tol, transformer_terms

from metastone_jax.attention import flash as flash_attention
from metastone_jax.config import ModelConfig
from metastone_jax.layers import attention_impl
from metastone_jax.model import create_model, segment_positions
from metastone_jax.presets import get_preset

CFG = get_preset("tiny")
T = 96


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 32 so that T = 96 spans several query and key blocks."""
    monkeypatch.setattr(flash_attention, "DEFAULT_BLOCK", 32)


def _models(*impls):
    return [create_model(CFG.replace(attention=impl), seed=0) for impl in impls]


def _logits_and_grads(model, tokens, valid, weights, segment_ids=None):
    """Logits [B,T,V] and d(sum weights * logits)/d params."""
    graphdef, params = nnx.split(model)

    def f(p):
        out = nnx.merge(graphdef, p)(tokens, valid=valid, segment_ids=segment_ids)
        return jnp.sum(out.logits * weights), out.logits

    (_, logits), grads = jax.value_and_grad(f, has_aux=True)(params)
    return np.asarray(logits), jax.tree.map(np.asarray, grads)


def test_flash_equals_dense_in_logits_and_gradients(small_blocks):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (2, T))
    valid = np.ones((2, T), bool)
    valid[0, :17] = False  # left padding
    valid[1, 70:] = False  # right padding
    weights = rng.normal(size=(2, T, CFG.vocab_size)) * valid[..., None]
    dense, flash = _models("dense", "flash")
    ref, ref_grads = _logits_and_grads(dense, tokens, valid, weights)
    got, got_grads = _logits_and_grads(flash, tokens, valid, weights)
    # Same fp32 sums in another order (blocks, online rescaling); scale: max |logit|.
    terms = transformer_terms(CFG, T)
    tol = fp32_reduction_tol(terms, np.abs(ref[valid]).max())
    np.testing.assert_allclose(got[valid], ref[valid], rtol=0, atol=tol)
    # Gradients: the backward pass sums the same terms again plus the B*T weighted logits
    # into each weight's gradient; scale: each leaf's largest gradient.
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(ref_grads), jax.tree.leaves(got_grads), strict=True
    ):
        scale = max(np.abs(a).max(), 1e-30)
        gtol = fp32_reduction_tol(2 * terms + tokens.size, scale)
        np.testing.assert_allclose(b, a, rtol=0, atol=gtol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("impl", ["dense", "flash"])
def test_packed_row_equals_separate_rows(small_blocks, impl):
    rng = np.random.default_rng(1)
    lengths = (40, 25, 19)
    seqs = [rng.integers(0, CFG.vocab_size, n) for n in lengths]
    packed = np.zeros((1, T), np.int64)
    segments = np.zeros((1, T), np.int32)
    start = 0
    for i, s in enumerate(seqs):
        packed[0, start : start + len(s)] = s
        segments[0, start : start + len(s)] = i + 1
        start += len(s)
    (model,) = _models(impl)
    out = np.asarray(model(packed, valid=segments > 0, segment_ids=segments).logits)[0]
    start = 0
    for s in seqs:
        ref = np.asarray(model(s[None]).logits)[0]
        tol = fp32_reduction_tol(transformer_terms(CFG, T), np.abs(ref).max())
        np.testing.assert_allclose(out[start : start + len(s)], ref, rtol=0, atol=tol)
        start += len(s)


def test_segment_positions_restart_per_segment():
    seg = jnp.array([[0, 0, 1, 1, 1, 2, 2, 0], [3, 3, 3, 3, 4, 4, 4, 4]])
    want = [[0, 1, 0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1, 2, 3]]
    np.testing.assert_array_equal(np.asarray(segment_positions(seg)), want)


def test_attention_setting_errors():
    with pytest.raises(ValueError, match="ModelConfig.attention"):
        CFG.replace(attention="ring")
    if jax.default_backend() != "tpu":
        with pytest.raises(ValueError, match="attention='splash' needs a TPU"):
            attention_impl("splash", 4096)
    assert attention_impl("dense", 8192) == "dense"
    assert isinstance(CFG, ModelConfig) and CFG.attention == "auto"


def test_prefill_kv_with_flash_equals_dense(small_blocks):
    """The engine's prefill (a cacheless forward that returns every layer's keys and values)
    takes the same attention setting: right-padded prompts give the dense path's hidden
    states and caches at every real position."""
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, CFG.vocab_size, (2, T))
    valid = np.ones((2, T), bool)
    valid[1, 50:] = False  # a shorter prompt, right-padded
    dense, flash = _models("dense", "flash")
    h_ref, f_ref, (k_ref, v_ref) = dense.prefill_kv(tokens, valid)
    tol = fp32_reduction_tol(transformer_terms(CFG, T), 1.0)
    # The engine's CPU prefill reads the out-major decode weights: the same path either way.
    for weights in (None, flash.decode_weights()):
        h, f, (k, v) = flash.prefill_kv(tokens, valid, weights)
        for got, want in ((h, h_ref), (f, f_ref)):
            want = np.asarray(want)[valid]
            np.testing.assert_allclose(np.asarray(got)[valid], want, rtol=0,
                                       atol=tol * max(np.abs(want).max(), 1.0))  # fmt: skip
        for got, want in ((k, k_ref), (v, v_ref)):  # [L, B, K, T, hd]
            got, want = np.moveaxis(np.asarray(got), 3, 2), np.moveaxis(np.asarray(want), 3, 2)
            np.testing.assert_allclose(got[:, valid], want[:, valid], rtol=0,
                                       atol=tol * max(np.abs(want).max(), 1.0))  # fmt: skip
