"""Head-only SPR training on cached features equals frozen-backbone `spr_step` updates."""

import jax
import numpy as np
import pytest
from flax import nnx
from test_train_step import CFG, STEP, _adam_moments, _mesh, _rollout_batch, _state
from tolerances import adam_params_tol, fp32_reduction_tol, sprm_head_terms, transformer_terms

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
    optim = OptimConfig(lr=1e-3, sprm_lr=1e-3, freeze_backbone=True, schedule="constant")
    tx = make_optimizer(optim)  # a constant lr, as fit_head's
    graphdef, state, shardings, _ = _state(mesh, tx)
    step = compile_step(graphdef, StepConfig(kind="spr", step=STEP, sprm_dropout=False,
                                             spr_form=form), tx, mesh, shardings)  # fmt: skip
    metrics, grad_rms = [], []  # per update: its metrics; sqrt(v_hat) of every head entry
    for t in range(1, updates + 1):
        state, m = step(state, split_micro(rows, 1))
        metrics.append(jax.device_get(m))
        moments = _adam_moments(jax.device_get(state.opt_state))
        grad_rms.append(
            {path: np.sqrt(nu / (1 - optim.b2**t)) for path, (_, nu) in moments.items()}
        )
    want = jax.device_get(state.params["sprm"])

    model = create_model(CFG, seed=0)  # the same init as `_state`
    feats = step_features(model, rows, STEP, batch=4)  # two batches: padding/concat exercised
    cfg = HeadFitConfig(form=form, steps=updates, batch=8, lr=1e-3, dropout=False,
                        eval_every=1)  # fmt: skip
    head, history = fit_head(model.sprm, feats, cfg)
    got = nnx.to_pure_dict(nnx.state(head))
    assert [h["step"] for h in history] == list(range(updates + 1))

    # The features come from another forward (batches of 4, L - 1 blocks), then the head's
    # D + 2D terms and the sum over the batch's positions; the gradient runs the head back.
    n_feat = transformer_terms(CFG, rows["tokens"].shape[1], n_layers=CFG.n_layers - 1,
                               lm_head=False)  # fmt: skip
    n_value = n_feat + sprm_head_terms(CFG.d_model) + rows["tokens"].size
    n_grad = n_value + sprm_head_terms(CFG.d_model)
    # Losses and scores are well conditioned in the parameters (an entry whose Adam step
    # rounding can flip has a gradient near 0: it barely moves them). history[i] holds update
    # i's loss and the scores update i + 1 starts from; one-signed values: relative bounds.
    value_tol = fp32_reduction_tol(n_value, 1.0)
    for i, m in enumerate(metrics, start=1):
        np.testing.assert_allclose(history[i]["loss"], m["loss"], rtol=value_tol)
    for i, m in enumerate(metrics[1:], start=1):
        for key in ("score_correct", "score_incorrect"):
            np.testing.assert_allclose(history[i][key], m[key], rtol=value_tol, err_msg=key)
    # The parameters: Adam's steps per entry, sensitive where a gradient is near rounding.
    # Scale: the leaf's largest gradient; a gradient exactly 0 (a ReLU unit no position
    # activates) is exactly 0 in both runs.
    flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    for path, a in jax.tree_util.tree_flatten_with_path(want)[0]:
        key = ("sprm", *(str(p.key) for p in path))
        rms = [r[key] for r in grad_rms]
        grad_tols = [np.where(r > 0, fp32_reduction_tol(n_grad, r.max()), 0) for r in rms]
        tol = adam_params_tol(rms, grad_tols, cfg.lr, a, b1=optim.b1, b2=optim.b2)
        diff = np.abs(np.asarray(flat_got[path], np.float64) - a)
        assert np.all(diff <= tol), (key, np.max(diff / tol))


def test_step_features_are_the_forward_features_at_scored_steps():
    from metastone_jax.sprm.steps import shift_for_scoring, step_mask

    rows = _rollout_batch(np.random.default_rng(1), n=6)
    model = create_model(CFG, seed=0)
    feats = step_features(model, rows, STEP, batch=4)
    full = np.asarray(model(rows["tokens"], valid=rows["valid"]).features)
    mask = np.asarray(shift_for_scoring(step_mask(
        rows["tokens"], STEP, mode="train", valid=rows["valid"],
        response_start=rows["response_start"])))  # fmt: skip
    assert isinstance(feats, StepFeatures) and len(feats) == 6
    # Batches of 4 against one of 6: L - 1 blocks' sums in other orders; scale: max |feature|.
    n_feat = transformer_terms(CFG, rows["tokens"].shape[1], n_layers=CFG.n_layers - 1,
                               lm_head=False)  # fmt: skip
    tol = fp32_reduction_tol(n_feat, np.abs(full).max())
    for r in range(6):
        want = full[r, mask[r]]
        assert feats.mask[r].sum() == len(want) > 0
        np.testing.assert_allclose(feats.features[r, : len(want)], want, rtol=0, atol=tol)
        assert not feats.features[r, len(want) :].any()
