"""Logit processors and sampling: HF parity, support and reproducibility properties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from metastone_jax.sample import processors
from metastone_jax.sample.processors import (
    SamplingParams,
    _block_rows,
    apply_repetition_penalty,
    process_logits,
    sample,
    seen_from_tokens,
    top_k_mask,
    top_p_mask,
    update_seen,
)

# Jitted once per static setting: also what the decode loop does, and much faster than eager.
_process = jax.jit(process_logits, static_argnames="params")
_sample = jax.jit(sample, static_argnames="params")
_penalty = jax.jit(apply_repetition_penalty, static_argnums=2)
_top_k = jax.jit(top_k_mask, static_argnums=1)
_top_p = jax.jit(top_p_mask, static_argnums=1)
_seen = jax.jit(seen_from_tokens, static_argnums=1)
_update_seen = jax.jit(update_seen)


@functools.partial(jax.jit, static_argnames="params")
def _process_and_sample(logits, seen, keys, params):
    return sample(process_logits(logits, seen, params), keys, params)


def _hf(logits, input_ids, params: SamplingParams):
    """HF's processor chain in generate's order (warpers only when sampling)."""
    procs = []
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)))
    if params.temperature > 0:
        procs.append(TemperatureLogitsWarper(float(params.temperature)))
        if params.top_k > 0:
            procs.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            procs.append(TopPLogitsWarper(params.top_p))
    ids = torch.from_numpy(np.asarray(input_ids, np.int64))
    scores = torch.from_numpy(np.array(logits, np.float32))
    for proc in procs:
        scores = proc(ids, scores)
    return scores.numpy()


def _assert_same(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(ours[fin], ref[fin], rtol=1e-6, atol=1e-6)


def _rand(seed, n, v, scale=2.0, t=12):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n, v)) * scale).astype(np.float32)
    ids = rng.integers(0, v, size=(n, t))
    return logits, ids


def _keys(seed, n):
    return jax.random.split(jax.random.PRNGKey(seed), n)


# ----------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(stop_ids=(1, -2)), "stop_ids"),
        (dict(think_budget=-1), "think_budget"),
    ],
)
def test_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_params_hashable_static():
    a = SamplingParams(temperature=0.7, top_p=0.9, stop_ids=[3, 4])
    b = SamplingParams(temperature=0.7, top_p=0.9, stop_ids=(3, 4))
    assert a == b and hash(a) == hash(b) and a.stop_ids == (3, 4)
    assert SamplingParams().greedy and not a.greedy


# ----------------------------------------------------------------------------- HF parity


@pytest.mark.parametrize("penalty", [1.3, 0.6, 1.0])
def test_repetition_penalty_matches_hf(penalty):
    logits, ids = _rand(0, 5, 40)
    seen = _seen(jnp.asarray(ids), 40)
    params = SamplingParams(repetition_penalty=penalty)  # greedy: only the penalty applies
    _assert_same(_process(jnp.asarray(logits), seen, params), _hf(logits, ids, params))
    _assert_same(_penalty(jnp.asarray(logits), seen, penalty), _hf(logits, ids, params))


def test_seen_from_tokens_matches_update_seen():
    _, ids = _rand(1, 4, 30, t=9)
    valid = np.ones_like(ids, bool)
    valid[:, :3] = False  # left padding is not part of the sequence
    seen = _seen(jnp.asarray(ids), 30, jnp.asarray(valid))
    inc = jnp.zeros((4, 30), bool)
    for t in range(3, 9):
        inc = _update_seen(inc, jnp.asarray(ids[:, t]))
    np.testing.assert_array_equal(seen, inc)
    # Out-of-range ids (pad -1, ids >= V) are ignored.
    np.testing.assert_array_equal(_update_seen(inc, jnp.full((4,), -1)), inc)
    np.testing.assert_array_equal(_update_seen(inc, jnp.full((4,), 30)), inc)


@pytest.mark.parametrize(
    "temperature, top_k, v",
    [(0.7, 5, 40), (1.3, 1, 40), (1.0, 1000, 40), (0.5, 40, 40), (2.0, 39, 40), (1.0, 0, 40),
     (1.0, 70, 100)],  # k > SMALL_TOP_K: lax.top_k
)  # fmt: skip
def test_temperature_top_k_matches_hf(temperature, top_k, v):
    logits, ids = _rand(2, 6, v)
    params = SamplingParams(temperature=temperature, top_k=top_k)
    seen = jnp.zeros((6, v), bool)
    _assert_same(_process(jnp.asarray(logits), seen, params), _hf(logits, ids, params))


def test_top_k_ties_keep_all_equal():
    logits = np.array([[1.0, 3.0, 2.0, 2.0, 2.0, 0.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]], np.float32)
    ours = _top_k(jnp.asarray(logits), 2)
    ref = TopKLogitsWarper(2)(None, torch.from_numpy(logits)).numpy()
    _assert_same(ours, ref)
    assert np.isfinite(np.asarray(ours)).sum(axis=1).tolist() == [4, 6]


def test_small_top_k_passes_equal_lax_top_k():
    """The max-and-count passes (k <= SMALL_TOP_K) find lax.top_k's k-th value, repeats and
    -inf entries included."""
    from metastone_jax.sample.processors import SMALL_TOP_K, _kth_largest

    rng = np.random.default_rng(3)
    v = SMALL_TOP_K + 20
    rows = [rng.normal(size=(16, v)), rng.integers(0, 4, (16, v)), rng.integers(0, 30, (16, v))]
    x = np.concatenate(rows).astype(np.float32)
    x[::5, rng.integers(0, v, v - 5)] = -np.inf  # rows with many -inf entries
    x[3, :] = -np.inf
    x[4, 1:] = -np.inf
    ref = jax.lax.top_k(jnp.asarray(x), SMALL_TOP_K)[0]  # column k-1: the k-th largest
    # Every k through one compilation (a traced trip count), and the static k the sampler
    # passes at both ends of the range.
    traced = jax.jit(_kth_largest)
    for k in range(1, SMALL_TOP_K + 1):
        np.testing.assert_array_equal(traced(x, k), ref[:, k - 1 : k], err_msg=f"k={k}")
    for k in (1, 3, SMALL_TOP_K):
        static = jax.jit(_kth_largest, static_argnums=1)(x, k)
        np.testing.assert_array_equal(static, ref[:, k - 1 : k], err_msg=f"static k={k}")


@pytest.mark.parametrize(
    "top_p, v", [(0.95, 300), (0.3, 300), (0.01, 300), (1.0, 300), (0.7, 7), (0.5, 7)]
)
def test_top_p_matches_hf(top_p, v):
    logits, ids = _rand(3, 8, v, scale=3.0)
    params = SamplingParams(temperature=1.0, top_p=top_p)
    _assert_same(
        _process(jnp.asarray(logits), jnp.zeros((8, v), bool), params), _hf(logits, ids, params)
    )


@pytest.mark.parametrize("n, rows", [(64, 32), (72, 24)])
def test_top_p_over_row_blocks_matches_hf(n, rows, monkeypatch):
    # Large batches run top-p over row blocks in a loop; each block must still be HF's filter,
    # ties (resolved only in the blocks that hold them) included.
    monkeypatch.setattr(processors, "TOP_P_BLOCK_ELEMENTS", 32 * 300)
    assert _block_rows(n, 300) == rows
    logits, _ = _rand(11, n, 300, scale=3.0)
    logits[5] = -5.0
    logits[5, :40] = 2.5  # the cut falls inside a tie: in the first block only
    logits[n - 1] = 0.0
    logits[n - 1, ::3] = 1.0  # and in the last block (in either group of ties)
    # Fresh functions: jax caches traces per function, and the block size is read at trace time.
    jaxpr = str(jax.make_jaxpr(lambda x: top_p_mask(x, 0.9))(jnp.asarray(logits)))
    # The blocked path is the one tested: a scan over the blocks yields each row's cut.
    assert f"i32[{n // rows},{rows},1] = scan" in jaxpr
    for top_p in (0.9, 0.5):
        ours = jax.jit(lambda x, p=top_p: top_p_mask(x, p))(jnp.asarray(logits))
        _assert_same(ours, _hf_top_p_stable(logits, top_p))
        plain = [r for r in range(n) if r not in (5, n - 1)]  # HF's own warper where no ties
        ref = TopPLogitsWarper(top_p)(None, torch.from_numpy(logits[plain])).numpy()
        _assert_same(np.asarray(ours)[plain], ref)


def _hf_top_p_stable(logits, top_p):
    """TopPLogitsWarper's steps with a stable sort: torch's default sort leaves the order of
    ties in rows this long unspecified."""
    scores = torch.from_numpy(logits)
    sorted_logits, sorted_idx = torch.sort(scores, descending=False, stable=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    remove = remove.scatter(1, sorted_idx, remove)
    return scores.masked_fill(remove, -float("inf")).numpy()


def test_top_p_rows_longer_than_a_block_still_run_in_blocks_of_8(monkeypatch):
    monkeypatch.setattr(processors, "TOP_P_BLOCK_ELEMENTS", 100)  # < one row of 300
    logits, _ = _rand(12, 64, 300, scale=3.0)
    jaxpr = jax.make_jaxpr(lambda x: top_p_mask(x, 0.9))(jnp.asarray(logits))  # fresh trace
    assert "i32[8,8,1] = scan" in str(jaxpr)  # 8 blocks of 8 rows
    ours = jax.jit(lambda x: top_p_mask(x, 0.9))(jnp.asarray(logits))
    _assert_same(ours, TopPLogitsWarper(0.9)(None, torch.from_numpy(logits)).numpy())


def test_top_p_block_rows(monkeypatch):
    # The sampler bench's [128, 16000] logits run in blocks of 32 rows; the demo's [256, 512]
    # fit in one; rows of a huge vocabulary go in blocks of at least 8.
    assert [_block_rows(n, v) for n, v in ((128, 16000), (256, 512), (64, 10**6))] == [32, 256, 8]
    monkeypatch.setattr(processors, "TOP_P_BLOCK_ELEMENTS", 32 * 300)
    rows = [_block_rows(n, 300) for n in (8, 32, 33, 37, 64, 96, 128)]
    assert rows == [8, 32, 11, 37, 32, 32, 32]  # 37 is prime: one block
    monkeypatch.setattr(processors, "TOP_P_BLOCK_ELEMENTS", 0)
    assert _block_rows(128, 16000) == 128


@pytest.mark.parametrize(
    "row, top_p",
    [
        ([0.0] * 4, 0.5),
        ([0.0] * 10, 0.35),
        ([1.0, 2.0, 1.0, 2.0, 1.0, 0.0, 2.0], 0.6),
        ([1.0, 2.0, 1.0, 2.0, 1.0, 0.0, 2.0], 0.9),
        ([-3.0, -3.0, -1.0, -1.0, -5.0], 0.4),
    ],
)
def test_top_p_ties_match_hf(row, top_p):
    logits = np.array([row], np.float32)
    ref = TopPLogitsWarper(top_p)(None, torch.from_numpy(logits)).numpy()
    _assert_same(_top_p(jnp.asarray(logits), top_p), ref)


def test_top_p_logits_that_round_to_one_probability_keep_their_order():
    # Distinct logits whose probabilities round to the same float: the cut must still follow
    # the logits' order (HF sorts the logits), not the token ids.
    logits = np.array([[1e-8, 0.0, 1e-8, 0.0], [0.0, 1e-8, 0.0, -3.0]], np.float32)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    assert probs[0, 0] == probs[0, 1] and probs[1, 0] == probs[1, 1]  # the premise
    for top_p in (0.5, 0.3):
        ref = TopPLogitsWarper(top_p)(None, torch.from_numpy(logits)).numpy()
        _assert_same(_top_p(jnp.asarray(logits), top_p), ref)
    assert np.isfinite(np.asarray(_top_p(jnp.asarray(logits), 0.5)))[0].tolist() == [
        True, False, True, False
    ]  # fmt: skip


def test_top_p_after_neg_inf_and_min_keep():
    # A tiny top_p still keeps the most likely token; -inf inputs (e.g. from top-k) stay -inf.
    logits = np.array([[0.1, -np.inf, 0.3, 0.2], [-np.inf, -np.inf, 4.0, 4.0]], np.float32)
    ref = TopPLogitsWarper(1e-4)(None, torch.from_numpy(logits)).numpy()
    _assert_same(_top_p(jnp.asarray(logits), 1e-4), ref)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.2),
        SamplingParams(temperature=1.5, top_k=100, top_p=0.5, repetition_penalty=0.8),
        SamplingParams(temperature=0.3, top_k=3, top_p=0.99),
    ],
)
def test_process_logits_matches_hf_chain(params):
    logits, ids = _rand(4, 6, 64, scale=2.5, t=30)
    seen = _seen(jnp.asarray(ids), 64)
    _assert_same(_process(jnp.asarray(logits), seen, params), _hf(logits, ids, params))


# ----------------------------------------------------------------------------- sampling


def _support(logits, params):
    """Allowed tokens, computed independently in float64 (ties have measure zero here)."""
    x = np.asarray(logits, np.float64) / params.temperature
    allowed = np.ones(x.shape, bool)
    if params.top_k:
        kth = np.sort(x, axis=-1)[:, -min(params.top_k, x.shape[-1])][:, None]
        allowed &= x >= kth
    if params.top_p < 1:
        p = np.where(allowed, np.exp(x - x.max(-1, keepdims=True)), 0.0)
        p /= p.sum(-1, keepdims=True)
        # Keep a token iff the mass of strictly more likely tokens is below top_p.
        above = np.array([[row[row > pi].sum() for pi in row] for row in p])
        allowed &= above < params.top_p
    return allowed


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=4),
        SamplingParams(temperature=0.8, top_p=0.6),
        SamplingParams(temperature=1.3, top_k=12, top_p=0.75),
    ],
)
def test_samples_inside_support(params):
    n, v = 32, 30
    logits, _ = _rand(5, n, v, scale=1.5)
    allowed = _support(logits, params)
    assert allowed.sum(axis=1).min() >= 1 and (allowed.sum(axis=1) < v).all()
    seen = jnp.zeros((n, v), bool)
    hits = np.zeros((n, v), bool)
    for seed in range(25):
        tok, lp = _process_and_sample(jnp.asarray(logits), seen, _keys(seed, n), params)
        tok = np.asarray(tok)
        assert tok.dtype == np.int32 and allowed[np.arange(n), tok].all()
        assert np.isfinite(np.asarray(lp)).all() and (np.asarray(lp) <= 0).all()
        hits[np.arange(n), tok] = True
    assert hits.sum() > n  # actually random, not stuck on one token per row


def test_greedy_is_argmax():
    logits, ids = _rand(6, 9, 50)
    # Truncation settings are irrelevant at temperature 0.
    params = SamplingParams(temperature=0.0, top_k=3, top_p=0.5)
    tok, lp = _process_and_sample(
        jnp.asarray(logits), jnp.zeros((9, 50), bool), _keys(0, 9), params
    )
    tok2, _ = _process_and_sample(
        jnp.asarray(logits), jnp.zeros((9, 50), bool), _keys(1, 9), params
    )
    np.testing.assert_array_equal(tok, logits.argmax(-1))
    np.testing.assert_array_equal(tok, tok2)
    # Greedy log-prob is the raw softmax's: log p(argmax) = -log sum exp(x - max x).
    x = logits.astype(np.float64)
    ref_lp = -np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1))
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-6, atol=1e-6)
    # With a penalty, greedy is the argmax of the penalized logits (as in HF).
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    seen = _seen(jnp.asarray(ids), 50)
    tok, _ = _process_and_sample(jnp.asarray(logits), seen, _keys(0, 9), params)
    np.testing.assert_array_equal(tok, _hf(logits, ids, params).argmax(-1))


def test_reproducible_and_batch_independent():
    n, v = 8, 100
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50)
    logits, _ = _rand(7, n, v)
    seen = jnp.zeros((n, v), bool)
    keys = _keys(3, n)
    tok, lp = _process_and_sample(jnp.asarray(logits), seen, keys, params)
    tok_again, _ = _process_and_sample(jnp.asarray(logits), seen, keys, params)
    np.testing.assert_array_equal(tok, tok_again)
    # Change every other row (logits and keys): row 0 and row 5 must not change.
    other, _ = _rand(8, n, v)
    other[[0, 5]] = logits[[0, 5]]
    keys2 = _keys(9, n).at[jnp.array([0, 5])].set(keys[jnp.array([0, 5])])
    tok2, lp2 = _process_and_sample(jnp.asarray(other), seen, keys2, params)
    np.testing.assert_array_equal(np.asarray(tok2)[[0, 5]], np.asarray(tok)[[0, 5]])
    np.testing.assert_allclose(np.asarray(lp2)[[0, 5]], np.asarray(lp)[[0, 5]], rtol=1e-6)
    # A batch of one gives the same draw too.
    tok1, _ = _process_and_sample(jnp.asarray(logits[5:6]), seen[5:6], keys[5:6], params)
    assert int(tok1[0]) == int(tok[5])


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.8), SamplingParams(temperature=1.2, top_k=4, top_p=0.7)],
)
def test_empirical_distribution(params):
    v, n = 6, 20000
    row = np.array([1.0, 0.2, -0.5, 0.9, 0.0, -1.5], np.float32)
    logits = jnp.broadcast_to(jnp.asarray(row), (n, v))
    tok, lp = _process_and_sample(logits, jnp.zeros((n, v), bool), _keys(11, n), params)
    allowed = _support(row[None], params)[0]
    x = np.where(allowed, row / params.temperature, -np.inf).astype(np.float64)
    expected = np.exp(x - x.max())
    expected /= expected.sum()
    counts = np.bincount(np.asarray(tok), minlength=v)
    assert (counts[~allowed] == 0).all()
    e = expected[allowed] * n
    chi2 = float(((counts[allowed] - e) ** 2 / e).sum())
    assert chi2 < 30.0, (chi2, counts, e)  # df <= 5: p-value of 30 is ~1e-5
    # The reported log-prob is the token's probability under the processed distribution.
    np.testing.assert_allclose(np.asarray(lp), np.log(expected[np.asarray(tok)]), atol=1e-5)


@pytest.mark.parametrize("n, v", [(1, 1), (3, 2), (5, 33)])
def test_odd_shapes(n, v):
    params = SamplingParams(temperature=0.9, top_k=3, top_p=0.5, repetition_penalty=1.1)
    logits, ids = _rand(12, n, v)
    seen = _seen(jnp.asarray(ids), v)
    out = _process(jnp.asarray(logits), seen, params)
    _assert_same(out, _hf(logits, ids, params))
    tok, lp = _sample(out, _keys(0, n), params)
    assert tok.shape == (n,) and lp.shape == (n,)
    assert np.isfinite(np.asarray(out))[np.arange(n), np.asarray(tok)].all()


def test_top_p_treats_signed_zeros_as_ties():
    # A sort compares -0.0 == +0.0, so HF orders them by id like any tie; an integer image of
    # the float bits would put -0.0 first.
    logits = np.full((2, 300), -3.0, np.float32)
    logits[:, 10:90] = np.where(np.arange(80) % 2, 0.0, -0.0)  # alternating signs, cut inside
    logits[1, 200] = 1.0
    assert np.signbit(logits[0, 10]) and not np.signbit(logits[0, 11])
    for top_p in (0.3, 0.5, 0.9):
        ours = jax.jit(lambda x, p=top_p: top_p_mask(x, p))(jnp.asarray(logits))
        ref = _hf_top_p_stable(logits, top_p)
        _assert_same(ours, ref)
        kept = np.isfinite(ref[0])
        if top_p < 0.9:
            assert 0 < kept[10:90].sum() < 80  # the cut is inside the zeros
        else:  # inside the ties at -3.0, below the maximum (ids 10..89)
            assert kept[10:90].all() and 0 < kept[90:].sum() < 210
