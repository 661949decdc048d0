"""Self-supervised process reward (SPR) loss and the score-gap metric
(docs/method.md section 3).

Shapes: N trajectories (rows), T positions. ``logits`` [N, T] are SPRM head logits at feature
positions, ``mask`` [N, T] marks the scored positions (``sprm.steps.shift_for_scoring`` of the step
mask), ``labels`` [N] is the outcome (1: final answer correct), ``include`` [N] is False for
trajectories left out of the loss (truncated and wrong). Pure jnp in fp32, runs under ``jit``
(``form`` and ``ranks`` are static). Counts are sums over the whole arrays passed in: under
``jit`` with sharded inputs they span all devices, as the released code's all-reduce; called
per micro-batch they are micro-batch counts. ``ranks`` > 1 also normalises per data-parallel
rank, as the released actor does (``spr_loss``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metastone_jax.sprm.aggregation import LOG_CLAMP, aggregate

FORMS = ("filtered", "paper", "bce")
POS_WEIGHT = 1.5  # extra weight on positive steps in the released class balance
WEIGHT_EPS = 1e-5  # denominator guard of the weighted mean (released code)


def scale_gradient(x, scale: float) -> jnp.ndarray:
    """Identity forward, gradient multiplied by ``scale``: x * scale + sg(x) * (1 - scale).

    The method (docs/method.md section 3) uses scale 1e-4 on the penultimate features, so the
    SPR loss barely moves the shared backbone while the head trains at full rate.
    """
    return x * scale + jax.lax.stop_gradient(x) * (1.0 - scale)


def bce_with_logits(s, y) -> jnp.ndarray:
    """Elementwise BCE with logits, torch's stable form: (1 - y) * s - log_sigmoid(s)."""
    return (1.0 - y) * s - jax.nn.log_sigmoid(s)


def spr_loss(logits, mask, labels, include, *, form: str = "filtered", ranks: int = 1):
    """SPR loss over scored steps -> (loss scalar, metrics).

    form "filtered" (released code, default): keep a step iff its prediction agrees with the
    outcome, (s > 0 and y = 1) or (s < 0 and y = 0); class-balanced weighted mean with
    pos = kept positives + 1, neg = kept negatives + 1, w+ = 1.5 neg / (pos + neg),
    w- = pos / (pos + neg), loss = sum(w * bce) / (sum(w) + 1e-5).
    form "paper": the same agreement filter (probability thresholded at 0.5 == logit 0, compared
    on logits so tiny |s| is not rounded to p = 0.5), plain mean over kept steps.
    form "bce": no filter, plain mean over all eligible steps (ablation baseline).
    Empty kept set -> loss 0. The filter is a comparison and the weights are counts, so neither
    carries gradient (class weights are data, as torch's ``weight=``); stop_gradient makes that
    explicit. metrics: spr_loss, spr_kept_fraction (kept / eligible, 0 if none), spr_kept_pos,
    spr_kept_neg, spr_steps (eligible = mask & include).

    ``ranks`` = R > 1: the released actor's scope (``dp_actor.py``). The N rows are R
    consecutive blocks of N/R rows, one per data-parallel rank (as ('data', 'fsdp') sharding
    lays them). With K+_r / K-_r the kept positive / negative steps of rank r, every rank adds
    1 to its counts before the all-reduce, so pos = sum_r (K+_r + 1) = K+ + R and
    neg = K- + R; the weights w+ = 1.5 neg / (pos + neg), w- = pos / (pos + neg) are shared,
    but each rank normalises its own steps, L_r = sum_{kept on r} w * bce / (sum_{kept on r}
    w + 1e-5), and DDP averages the ranks' gradients: loss = (1/R) sum_r L_r. "paper"/"bce":
    L_r is the plain mean over rank r's kept steps (0 if none). R = 1 is the pooled form above.
    """
    if form not in FORMS:
        raise ValueError(f"unknown SPR loss form {form!r}; expected one of {FORMS}")
    if not (isinstance(ranks, int) and ranks >= 1):
        raise ValueError(f"ranks: expected an integer >= 1, got {ranks!r}")
    if ranks > 1 and (len(jnp.shape(logits)) != 2 or jnp.shape(logits)[0] % ranks):
        raise ValueError(
            f"SPR logits {jnp.shape(logits)}: expected [N, T] rows that {ranks} data-parallel "
            "ranks split evenly"
        )
    s = jnp.asarray(logits, jnp.float32)
    y, include = jnp.asarray(labels, jnp.float32), jnp.asarray(include, bool)
    if y.ndim == 1:  # per row; packed rows give them per token
        y = y[:, None]
    if include.ndim == 1:
        include = include[:, None]
    y = jnp.broadcast_to(y, s.shape)
    eligible = jnp.asarray(mask, bool) & include
    if form == "bce":
        kept = eligible
    else:
        agrees = ((s > 0) & (y == 1)) | ((s < 0) & (y == 0))
        kept = eligible & agrees
    kept = jax.lax.stop_gradient(kept)
    positive = y == 1
    n_pos = jnp.sum(kept & positive).astype(jnp.float32)
    n_neg = jnp.sum(kept & ~positive).astype(jnp.float32)
    n_kept = n_pos + n_neg
    bce = bce_with_logits(s, y)

    def by_rank(x):  # [N, T] -> [R, N/R * T]: rank r's rows
        return x.reshape(ranks, -1)

    if form == "filtered":
        pos, neg = n_pos + ranks, n_neg + ranks
        total = pos + neg
        w = jnp.where(positive, POS_WEIGHT * neg / total, pos / total)
        w = jax.lax.stop_gradient(jnp.where(kept, w, 0.0))
        # where (not w * bce): a masked-out position with an inf/NaN logit must not leak in.
        num = jnp.sum(by_rank(jnp.where(kept, w * bce, 0.0)), axis=1)
        per_rank = num / (jnp.sum(by_rank(w), axis=1) + WEIGHT_EPS)
    else:
        num = jnp.sum(by_rank(jnp.where(kept, bce, 0.0)), axis=1)
        per_rank = num / jnp.maximum(jnp.sum(by_rank(kept), axis=1), 1.0)
    loss = jnp.mean(per_rank)
    n_steps = jnp.sum(eligible).astype(jnp.float32)
    metrics = {
        "spr_loss": loss,
        "spr_kept_fraction": n_kept / jnp.maximum(n_steps, 1.0),
        "spr_kept_pos": n_pos,
        "spr_kept_neg": n_neg,
        "spr_steps": n_steps,
    }
    return loss, jax.lax.stop_gradient(metrics)


def score_gap(logits, mask, labels, include=None, segment_ids=None) -> dict[str, jnp.ndarray]:
    """Mean trajectory score of correct vs incorrect rollouts (the paper's "aha" curves).

    logits, mask [N, T]; labels [N]; include [N] or None (all). A trajectory's score is the
    geometric mean of sigmoid(logit) over its scored steps, log clamped at 1e-10 (the same
    ``aggregation.aggregate`` the test-time selector uses); trajectories with no scored step
    are skipped. Returns score_correct, score_incorrect (0 when the class is empty), score_gap
    (correct - incorrect; 0 unless both classes are non-empty, so an empty class cannot fake a
    separation), n_correct, n_incorrect (trajectories counted).

    segment_ids [N, T] (packed rows, several trajectories each; data/packing.py): a trajectory
    is a (row, segment), and labels / include are per token [N, T].
    """
    s = jnp.asarray(logits, jnp.float32)
    m = jnp.asarray(mask, bool)
    if segment_ids is not None:
        traj, valid, labels, include = _per_segment(s, m, labels, include, segment_ids)
    else:
        traj = aggregate(jax.nn.sigmoid(s), m, "geomean")  # [N]
        valid = m.any(axis=-1)
    if include is not None:
        valid = valid & jnp.asarray(include, bool)
    correct = jnp.asarray(labels) == 1
    out = {}
    for name, sel in (("correct", valid & correct), ("incorrect", valid & ~correct)):
        n = jnp.sum(sel).astype(jnp.float32)
        out[f"score_{name}"] = jnp.sum(jnp.where(sel, traj, 0.0)) / jnp.maximum(n, 1.0)
        out[f"n_{name}"] = n
    both = (out["n_correct"] > 0) & (out["n_incorrect"] > 0)
    out["score_gap"] = jnp.where(both, out["score_correct"] - out["score_incorrect"], 0.0)
    return jax.lax.stop_gradient(out)


def _per_segment(logits, mask, labels, include, segment_ids):
    """score_gap's per-trajectory values for packed rows: (geomean score, has a scored step,
    label, include), each [N*T] over (row, segment) ids row * T + segment."""
    n, t = logits.shape
    ids = (jnp.arange(n)[:, None] * t + jnp.asarray(segment_ids)).reshape(-1)
    m = mask.reshape(-1)

    def seg_sum(x):
        return jax.ops.segment_sum(x.reshape(-1), ids, num_segments=n * t)

    log_p = jnp.where(m, jnp.log(jnp.maximum(jax.nn.sigmoid(logits.reshape(-1)), LOG_CLAMP)), 0)
    count = seg_sum(m.astype(jnp.float32))
    traj = jnp.exp(seg_sum(log_p) / jnp.maximum(count, 1.0))
    real = (jnp.asarray(segment_ids) > 0).reshape(-1)
    label = jax.ops.segment_max(jnp.where(real, jnp.asarray(labels, jnp.float32).reshape(-1),
                                          -1.0), ids, num_segments=n * t)  # fmt: skip
    keep = None
    if include is not None:
        keep = jax.ops.segment_max(jnp.asarray(include, bool).reshape(-1) & real, ids,
                                   num_segments=n * t)  # fmt: skip
    return traj, count > 0, label, keep
