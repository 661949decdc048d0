"""SPR loss forms, gradient isolation and score gap (metastone_jax.sprm.loss),
docs/method.md section 3."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tolerances import fp32_reduction_tol

from metastone_jax.sprm.loss import scale_gradient, score_gap, spr_loss

spr_jit = jax.jit(spr_loss, static_argnames="form")

# Hand case: 3 trajectories x 4 positions.
LOGITS = np.array(
    [
        [2.0, -1.0, 0.5, 1.5],  # y=1: keep 2.0, 0.5, 1.5 (s > 0); drop -1.0
        [-3.0, 1.0, -0.2, 0.0],  # y=0: keep -3.0, -0.2 (s < 0); drop 1.0 and 0.0 (not < 0)
        [-1.0, -2.0, 5.0, 5.0],  # y=0, truncated: excluded (both would be kept if included)
    ],
    np.float32,
)
MASK = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], bool)
LABELS = np.array([1, 0, 0])
INCLUDE = np.array([True, True, False])


def bce_pos(s):  # BCEWithLogits(s, 1)
    return math.log1p(math.exp(-s))


def bce_neg(s):  # BCEWithLogits(s, 0)
    return math.log1p(math.exp(s))


def test_filtered_hand_case():
    kept_pos, kept_neg = [2.0, 0.5, 1.5], [-3.0, -0.2]
    pos, neg = len(kept_pos) + 1, len(kept_neg) + 1  # 4, 3
    total = pos + neg  # 7
    w_pos, w_neg = 1.5 * neg / total, pos / total  # 9/14, 4/7
    num = w_pos * sum(map(bce_pos, kept_pos)) + w_neg * sum(map(bce_neg, kept_neg))
    want = num / (w_pos * 3 + w_neg * 2 + 1e-5)
    loss, m = spr_jit(LOGITS, MASK, LABELS, INCLUDE)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(m["spr_loss"], want, rtol=1e-6)
    assert float(m["spr_kept_pos"]) == 3 and float(m["spr_kept_neg"]) == 2
    assert float(m["spr_steps"]) == 8  # row 2 excluded
    np.testing.assert_allclose(m["spr_kept_fraction"], 5 / 8)

    # the same number with torch's class-weighted BCE (weights as data)
    s = torch.tensor(kept_pos + kept_neg)
    y = torch.tensor([1.0] * 3 + [0.0] * 2)
    w = torch.tensor([w_pos] * 3 + [w_neg] * 2)
    t = F.binary_cross_entropy_with_logits(s, y, weight=w, reduction="sum") / (w.sum() + 1e-5)
    np.testing.assert_allclose(loss, t.item(), rtol=1e-6)


def test_truncation_exclusion_changes_counts():
    # Including row 2 adds its two negatives (-1.0, -2.0): pos 4, neg 5, total 9.
    w_pos, w_neg = 1.5 * 5 / 9, 4 / 9
    kept_pos, kept_neg = [2.0, 0.5, 1.5], [-3.0, -0.2, -1.0, -2.0]
    num = w_pos * sum(map(bce_pos, kept_pos)) + w_neg * sum(map(bce_neg, kept_neg))
    want = num / (w_pos * 3 + w_neg * 4 + 1e-5)
    loss_in, m = spr_jit(LOGITS, MASK, LABELS, np.ones(3, bool))
    loss_ex, _ = spr_jit(LOGITS, MASK, LABELS, INCLUDE)
    np.testing.assert_allclose(loss_in, want, rtol=1e-6)
    assert abs(float(loss_in) - float(loss_ex)) > 1e-3
    assert float(m["spr_kept_neg"]) == 4 and float(m["spr_steps"]) == 10


@pytest.mark.parametrize("form", ["paper", "bce"])
def test_paper_and_bce_forms_vs_torch(form):
    if form == "paper":  # same agreement filter, no weights
        s, y = [2.0, 0.5, 1.5, -3.0, -0.2], [1.0, 1, 1, 0, 0]
    else:  # every eligible step of rows 0 and 1
        s, y = LOGITS[:2].ravel().tolist(), [1.0] * 4 + [0.0] * 4
    want = F.binary_cross_entropy_with_logits(torch.tensor(s), torch.tensor(y)).item()
    loss, m = spr_jit(LOGITS, MASK, LABELS, INCLUDE, form=form)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(m["spr_kept_fraction"], len(s) / 8)


@pytest.mark.parametrize("form", ["filtered", "paper", "bce"])
def test_nothing_kept_is_zero(form):
    logits = np.array([[-1.0, -2.0]], np.float32)  # y=1 with s < 0: filtered away
    loss, m = spr_jit(logits, np.ones((1, 2), bool), np.array([1]), np.array([form == "bce"]))
    assert float(loss) == 0.0 and float(m["spr_kept_fraction"]) == 0.0
    assert float(m["spr_steps"]) == (2.0 if form == "bce" else 0.0)


def test_stable_for_large_logits():
    logits = np.array([[200.0, -200.0, -200.0]], np.float32)
    for form in ("filtered", "paper", "bce"):
        loss, _ = spr_loss(
            logits, np.ones((1, 3), bool), np.array([1]), np.array([True]), form=form
        )
        assert np.isfinite(float(loss))
    loss, _ = spr_loss(logits, np.ones((1, 3), bool), np.array([1]), np.array([True]), form="bce")
    np.testing.assert_allclose(loss, 400 / 3, rtol=1e-6)  # BCE(-200, 1) = 200


def test_counts_are_global_under_sharding():
    """Counts span the whole batch even when rows are split over 8 devices."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 12)).astype(np.float32)
    mask = rng.random((16, 12)) < 0.6
    labels = rng.integers(0, 2, 16)
    include = rng.random(16) < 0.8
    # numpy reference of the released formula
    y = np.broadcast_to(labels[:, None], logits.shape).astype(np.float64)
    s = logits.astype(np.float64)
    keep = mask & include[:, None] & (((s > 0) & (y == 1)) | ((s < 0) & (y == 0)))
    pos, neg = (keep & (y == 1)).sum() + 1, (keep & (y == 0)).sum() + 1
    w = np.where(y == 1, 1.5 * neg / (pos + neg), pos / (pos + neg)) * keep
    bce = np.maximum(s, 0) - s * y + np.log1p(np.exp(-np.abs(s)))
    want = (w * bce).sum() / (w.sum() + 1e-5)

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    args = [jax.device_put(a, rows) for a in (logits, mask, labels, include)]
    loss, _ = spr_jit(*args)
    # Numerator and denominator: sums of up to 16 x 12 one-signed terms over 8 devices; the
    # ratio's relative error is at most the sum of theirs.
    np.testing.assert_allclose(loss, want, rtol=fp32_reduction_tol(2 * logits.size, 1.0))


# Released scope hand case: 4 rows on 2 data-parallel ranks (rows 0-1 rank 0, rows 2-3 rank 1).
RANK_LOGITS = np.array(
    [
        [2.0, -1.0, 0.5],  # y=1: keep 2.0, 0.5
        [-3.0, 1.0, -0.2],  # y=0: keep -3.0, -0.2
        [1.5, 0.0, -2.0],  # y=1: keep 1.5
        [-1.0, 4.0, 2.0],  # y=0, excluded (truncated)
    ],
    np.float32,
)
RANK_LABELS, RANK_INCLUDE = np.array([1, 0, 1, 0]), np.array([True, True, True, False])


def test_released_per_rank_scope_hand_case():
    # Counts summed over ranks, +1 per rank: pos = 3 + 2 = 5, neg = 2 + 2 = 4, total 9.
    w_pos, w_neg = 1.5 * 4 / 9, 5 / 9
    rank0 = (w_pos * (bce_pos(2.0) + bce_pos(0.5)) + w_neg * (bce_neg(-3.0) + bce_neg(-0.2))) / (
        2 * w_pos + 2 * w_neg + 1e-5
    )
    rank1 = w_pos * bce_pos(1.5) / (w_pos + 1e-5)  # rank 1 normalises its one kept step
    want = (rank0 + rank1) / 2  # DDP averages the ranks' gradients
    mask = np.ones_like(RANK_LOGITS, bool)
    loss, m = spr_loss(RANK_LOGITS, mask, RANK_LABELS, RANK_INCLUDE, ranks=2)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    assert float(m["spr_kept_pos"]) == 3 and float(m["spr_kept_neg"]) == 2
    # The pooled scope (one rank): pos 4, neg 3, one normalisation over all five kept steps.
    p_pos, p_neg = 1.5 * 3 / 7, 4 / 7
    num = p_pos * (bce_pos(2.0) + bce_pos(0.5) + bce_pos(1.5))
    num += p_neg * (bce_neg(-3.0) + bce_neg(-0.2))
    pooled = num / (3 * p_pos + 2 * p_neg + 1e-5)
    loss1, _ = spr_loss(RANK_LOGITS, mask, RANK_LABELS, RANK_INCLUDE, ranks=1)
    np.testing.assert_allclose(loss1, pooled, rtol=1e-6)
    assert abs(want - pooled) > 1e-2  # the scopes differ on this case


def test_released_per_rank_scope_paper_form_and_empty_rank():
    # paper: each rank's plain mean over its kept steps; a rank with none contributes 0.
    include = np.array([True, True, False, False])  # rank 1 keeps nothing
    mask = np.ones_like(RANK_LOGITS, bool)
    rank0 = (bce_pos(2.0) + bce_pos(0.5) + bce_neg(-3.0) + bce_neg(-0.2)) / 4
    loss, _ = spr_loss(RANK_LOGITS, mask, RANK_LABELS, include, form="paper", ranks=2)
    np.testing.assert_allclose(loss, rank0 / 2, rtol=1e-6)
    # filtered, rank 1 empty: pos = 2 + 2, neg = 2 + 2; rank 1's loss is 0/(0 + 1e-5) = 0.
    w = 1.5 * 4 / 8, 4 / 8
    rank0 = (w[0] * (bce_pos(2.0) + bce_pos(0.5)) + w[1] * (bce_neg(-3.0) + bce_neg(-0.2))) / (
        2 * w[0] + 2 * w[1] + 1e-5
    )
    loss, _ = spr_loss(RANK_LOGITS, mask, RANK_LABELS, include, ranks=2)
    np.testing.assert_allclose(loss, rank0 / 2, rtol=1e-6)


def test_ranks_must_split_the_rows():
    mask = np.ones_like(RANK_LOGITS, bool)
    with pytest.raises(ValueError, match=r"\(4, 3\): expected \[N, T\] rows that 3 data-parallel"):
        spr_loss(RANK_LOGITS, mask, RANK_LABELS, RANK_INCLUDE, ranks=3)
    with pytest.raises(ValueError, match="ranks: expected an integer >= 1, got 0"):
        spr_loss(RANK_LOGITS, mask, RANK_LABELS, RANK_INCLUDE, ranks=0)


def test_scale_gradient_isolates_backbone():
    """d loss / d backbone is exactly scale x the unscaled one; the head gradient is unchanged."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.float32)
    backbone = jnp.asarray(rng.normal(size=(5, 8)) * 0.5, jnp.float32)
    head = (jnp.asarray(rng.normal(size=(8,)), jnp.float32), jnp.float32(0.1))
    mask = rng.random((4, 6)) < 0.7
    labels = np.array([1, 0, 1, 0])
    include = np.ones(4, bool)

    def loss_fn(backbone, head, scale):
        feat = jnp.tanh(x @ backbone)  # [N, T, D]
        if scale is not None:
            feat = scale_gradient(feat, scale)
        logits = feat @ head[0] + head[1]
        return spr_loss(logits, mask, labels, include)[0]

    grad = jax.jit(jax.grad(loss_fn, argnums=(0, 1)), static_argnums=2)
    g_bb, g_head = grad(backbone, head, None)
    s_bb, s_head = grad(backbone, head, 1e-4)
    assert np.abs(np.asarray(g_bb)).max() > 1e-3  # a real gradient reaches the backbone
    np.testing.assert_allclose(s_bb, 1e-4 * np.asarray(g_bb), rtol=1e-5, atol=1e-12)
    for a, b in zip(jax.tree.leaves(s_head), jax.tree.leaves(g_head), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    # forward value unchanged
    v = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    np.testing.assert_allclose(scale_gradient(v, 1e-4), v, rtol=1e-6)


def np_geomean(s):
    p = 1.0 / (1.0 + np.exp(-s.astype(np.float64)))
    return float(np.exp(np.log(np.maximum(p, 1e-10)).mean()))


def test_score_gap_vs_numpy():
    logits = np.array(
        [
            [1.0, 2.0, -0.5, 9.0],
            [-40.0, 3.0, 0.0, 0.0],  # sigmoid(-40) is clamped at 1e-10
            [0.3, 0.0, 0.0, 0.0],  # no scored step: skipped
            [-1.0, -2.0, 0.5, 0.0],
            [4.0, 4.0, 4.0, 4.0],  # excluded
            [0.2, -0.7, 0.0, 0.0],
        ],
        np.float32,
    )
    mask = np.array(
        [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], bool
    )
    labels = np.array([1, 1, 1, 0, 0, 0])
    include = np.array([True, True, True, True, False, True])
    sc = {i: np_geomean(logits[i][mask[i]]) for i in (0, 1, 3, 4, 5)}  # row 2 has no step
    want_c, want_i = (sc[0] + sc[1]) / 2, (sc[3] + sc[5]) / 2
    out = jax.jit(score_gap)(logits, mask, labels, include)
    np.testing.assert_allclose(out["score_correct"], want_c, rtol=1e-5)
    np.testing.assert_allclose(out["score_incorrect"], want_i, rtol=1e-5)
    np.testing.assert_allclose(out["score_gap"], want_c - want_i, rtol=1e-5, atol=1e-7)
    assert float(out["n_correct"]) == 2 and float(out["n_incorrect"]) == 2

    out = score_gap(logits, mask, labels)  # include=None: row 4 counts
    np.testing.assert_allclose(out["score_incorrect"], (sc[3] + sc[4] + sc[5]) / 3, rtol=1e-5)

    out = score_gap(logits, mask, np.ones(6, int))  # no incorrect class
    assert float(out["n_incorrect"]) == 0 and float(out["score_incorrect"]) == 0.0
    assert float(out["score_gap"]) == 0.0
    assert all(np.isfinite(float(v)) for v in out.values())
