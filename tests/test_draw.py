"""The decode loop's draw: the law of HF's processed distribution (nucleus by rejection and by
the exact mask, the fallback after the last round included), its support, row independence,
and the untruncated log-prob."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_processors import _hf_top_p_stable, _keys, _rand, _seen, _support

from metastone_jax.sample.draw import REJECTION_MAX_DROP, draw
from metastone_jax.sample.processors import SamplingParams, apply_repetition_penalty

_draw = jax.jit(draw, static_argnames=("params", "rounds"))

REJECTED = SamplingParams(temperature=1.2, top_p=0.92)  # 1 - top_p <= REJECTION_MAX_DROP
MASKED = SamplingParams(temperature=1.2, top_k=4, top_p=0.7)  # a wider cut: the exact mask


def test_the_paths_are_the_ones_meant():
    assert 1 - REJECTED.top_p <= REJECTION_MAX_DROP < 1 - MASKED.top_p


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return (
        x
        - x.max(-1, keepdims=True)
        - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1))[..., None]
    )


@pytest.mark.parametrize("rounds", [4, 1, 0])  # 1 and 0: the exact fallback draws some / all
@pytest.mark.parametrize(
    "params", [REJECTED, SamplingParams(temperature=0.9, top_k=5, top_p=0.95), MASKED]
)
def test_draw_has_the_law_of_the_processed_distribution(params, rounds):
    v, n = 6, 20000
    # The nucleus cuts the least likely tokens, and with top-p 0.92 the cut token's own mass
    # is ~1/3 rejected: rounds fail often enough for the fallback to matter.
    row = np.array([1.0, 0.2, -0.5, 0.9, 0.0, -1.5], np.float32)
    logits = jnp.broadcast_to(jnp.asarray(row), (n, v))
    tok, lp = _draw(logits, jnp.zeros((n, v), bool), _keys(13, n), params=params, rounds=rounds)
    allowed = _support(row[None], params)[0]
    assert 1 <= allowed.sum() < v
    x = np.where(allowed, row / params.temperature, -np.inf).astype(np.float64)
    expected = np.exp(x - x.max())
    expected /= expected.sum()
    counts = np.bincount(np.asarray(tok), minlength=v)
    assert (counts[~allowed] == 0).all(), counts
    e = expected[allowed] * n
    chi2 = float(((counts[allowed] - e) ** 2 / e).sum())
    assert chi2 < 30.0, (chi2, counts, e)  # df <= 5: p-value of 30 is ~1e-5
    # The log-prob is under softmax(logits / T), before top-k and top-p.
    ref = _log_softmax(row / params.temperature)[np.asarray(tok)]
    np.testing.assert_allclose(np.asarray(lp), ref, atol=1e-5)


@pytest.mark.parametrize("rounds", [4, 1])
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, top_p=0.95),
        SamplingParams(temperature=1.3, top_k=12, top_p=0.9),
        SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.3),
    ],
)
def test_draws_inside_the_nucleus(params, rounds):
    n, v = 32, 300
    logits, ids = _rand(5, n, v, scale=1.5)
    seen = _seen(jnp.asarray(ids), v)
    # The support of HF's chain, on the penalised logits (the penalty is tested against HF).
    penalised = apply_repetition_penalty(jnp.asarray(logits), seen, params.repetition_penalty)
    allowed = _support(np.asarray(penalised), params)
    assert (allowed.sum(axis=1) < v).all()
    hits = np.zeros((n, v), bool)
    for seed in range(25):
        tok = _draw(jnp.asarray(logits), seen, _keys(seed, n), params=params, rounds=rounds)[0]
        tok = np.asarray(tok)
        assert tok.dtype == np.int32 and allowed[np.arange(n), tok].all()
        hits[np.arange(n), tok] = True
    assert hits.sum() > 3 * n  # actually random, not stuck on a few tokens per row


def test_a_rows_draw_depends_only_on_its_logits_and_key():
    n, v = 8, 100
    logits, _ = _rand(7, n, v)
    seen, keys = jnp.zeros((n, v), bool), _keys(3, n)
    tok, lp = _draw(jnp.asarray(logits), seen, keys, params=REJECTED)
    np.testing.assert_array_equal(tok, _draw(jnp.asarray(logits), seen, keys, params=REJECTED)[0])
    other, _ = _rand(8, n, v)
    other[[0, 5]] = logits[[0, 5]]
    keys2 = _keys(9, n).at[jnp.array([0, 5])].set(keys[jnp.array([0, 5])])
    tok2, lp2 = _draw(jnp.asarray(other), seen, keys2, params=REJECTED)
    np.testing.assert_array_equal(np.asarray(tok2)[[0, 5]], np.asarray(tok)[[0, 5]])
    np.testing.assert_allclose(np.asarray(lp2)[[0, 5]], np.asarray(lp)[[0, 5]], rtol=1e-6)
    tok1, _ = _draw(jnp.asarray(logits[5:6]), seen[5:6], keys[5:6], params=REJECTED)
    assert int(tok1[0]) == int(tok[5])


@pytest.mark.parametrize("params", [REJECTED, SamplingParams(temperature=0.0)])
def test_forced_tokens_and_their_log_probs(params):
    n, v = 6, 40
    logits, _ = _rand(9, n, v)
    forced = jnp.array([-1, 3, -1, 39, 0, -1])
    tok, lp = _draw(jnp.asarray(logits), jnp.zeros((n, v), bool), _keys(2, n), params, forced)
    free, _ = _draw(jnp.asarray(logits), jnp.zeros((n, v), bool), _keys(2, n), params)
    tok, free = np.asarray(tok), np.asarray(free)
    np.testing.assert_array_equal(tok, np.where(np.asarray(forced) >= 0, forced, free))
    if params.greedy:
        np.testing.assert_array_equal(free, logits.argmax(-1))
    t = params.temperature or 1.0  # greedy: the model distribution at temperature 1
    ref = _log_softmax(logits / t)[np.arange(n), tok]
    np.testing.assert_allclose(np.asarray(lp), ref, atol=1e-5)


def test_ties_at_the_cut_drop_the_lower_ids_first():
    # 200 tokens tie at logit 0 and the cut falls inside them: HF's stable ascending sort
    # drops the lowest ids of the tie first.
    n, v = 64, 300
    row = np.full(v, 2.0, np.float32)
    row[50:250] = 0.0
    allowed = ~np.isneginf(_hf_top_p_stable(row[None], REJECTED.top_p)[0])  # T = 1 below
    assert 0 < allowed[50:250].sum() < 200 and allowed[:50].all()
    params = SamplingParams(temperature=1.0, top_p=REJECTED.top_p)
    logits = jnp.broadcast_to(jnp.asarray(row), (n, v))
    hits = np.zeros(v, bool)
    for seed in range(30):
        tok = np.asarray(_draw(logits, jnp.zeros((n, v), bool), _keys(seed, n), params=params)[0])
        assert allowed[tok].all(), sorted(set(tok[~allowed[tok]]))
        hits[tok] = True
    assert hits[50:250][allowed[50:250]].any()  # kept members of the tie are drawn too
