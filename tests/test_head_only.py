"""Head-only SPR training on cached features equals frozen-backbone `spr_step` updates."""

import jax
import numpy as np
import pytest
from flax import nnx
from test_train_step import CFG, STEP, _mesh, _rollout_batch, _state

from metastone_jax.model import create_model
from metastone_jax.train.head_only import HeadFitConfig, StepFeatures, fit_head, step_features
from metastone_jax.train.rollout import split_micro
from metastone_jax.train.state import OptimConfig, make_optimizer
from metastone_jax.train.step import StepConfig, compile_step


@pytest.mark.parametrize("form", ["filtered", "bce"])
def test_fit_head_equals_frozen_backbone_spr_steps(form):
    rows = _rollout_batch(np.random.default_rng(0), n=8)
    updates = 3
    # Reference: the real train step, kind spr, backbone frozen, no dropout, the full batch.
    mesh = _mesh({"data": 1, "fsdp": 1, "tensor": 1})
    tx = make_optimizer(OptimConfig(lr=1e-3, sprm_lr=1e-3, freeze_backbone=True))
    graphdef, state, shardings, _ = _state(mesh, tx)
    step = compile_step(graphdef, StepConfig(kind="spr", step=STEP, sprm_dropout=False,
                                             spr_form=form), tx, mesh, shardings)  # fmt: skip
    for _ in range(updates):
        state, _ = step(state, split_micro(rows, 1))
    want = jax.device_get(state.params["sprm"])

    model = create_model(CFG, seed=0)  # the same init as `_state`
    feats = step_features(model, rows, STEP, batch=4)  # two batches: padding/concat exercised
    cfg = HeadFitConfig(form=form, steps=updates, batch=8, lr=1e-3, dropout=False,
                        eval_every=1)  # fmt: skip
    head, history = fit_head(model.sprm, feats, cfg)
    got = nnx.to_pure_dict(nnx.state(head))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    assert [h["step"] for h in history] == list(range(updates + 1))


def test_step_features_are_the_forward_features_at_scored_steps():
    from metastone_jax.sprm import shift_for_scoring, step_mask

    rows = _rollout_batch(np.random.default_rng(1), n=6)
    model = create_model(CFG, seed=0)
    feats = step_features(model, rows, STEP, batch=4)
    full = np.asarray(model(rows["tokens"], valid=rows["valid"]).features)
    mask = np.asarray(shift_for_scoring(step_mask(
        rows["tokens"], STEP, mode="train", valid=rows["valid"],
        response_start=rows["response_start"])))  # fmt: skip
    assert isinstance(feats, StepFeatures) and len(feats) == 6
    for r in range(6):
        want = full[r, mask[r]]
        assert feats.mask[r].sum() == len(want) > 0
        np.testing.assert_allclose(feats.features[r, : len(want)], want, atol=1e-5)
        assert not feats.features[r, len(want) :].any()
