"""The SPR loss's normalisation scope inside the train step: spr_scope="rank" (the released
per-rank normalisation) against a numpy computation of the released formula on the head's
logits, with the rank count read from the mesh or set explicitly."""

import jax
import numpy as np
import pytest
from flax import nnx
from tolerances import fp32_reduction_tol, sprm_head_terms, transformer_terms

from metastone_jax.model import create_model
from metastone_jax.presets import get_preset
from metastone_jax.sharding import make_mesh, placement
from metastone_jax.sprm.steps import StepTokens, shift_for_scoring, step_mask
from metastone_jax.train.rollout import split_micro
from metastone_jax.train.state import (
    OptimConfig,
    init_train_state,
    make_optimizer,
    pure_params,
    state_shardings,
)
from metastone_jax.train.step import StepConfig, compile_step

CFG = get_preset("tiny")
STEP = StepTokens(step_ids=(5,), think_open=6, think_close=7)
N, P, G, MICRO = 8, 4, 12, 2  # rows, prompt width, response width, micro-batches


def rollout_rows(seed=0):
    """Rows [prompt | <think> words and steps </think> answer], labels alternating, one row
    left out of the SPR loss (truncated and wrong)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(10, CFG.vocab_size, size=(N, P + G)).astype(np.int32)
    tokens[:, P] = 6
    tokens[:, P + 2 : P + G - 2 : 2] = 5  # a step every other token
    tokens[:, P + G - 2] = 7
    return {
        "tokens": tokens,
        "valid": np.ones((N, P + G), bool),
        "response_mask": np.arange(P + G)[None].repeat(N, 0) >= P,
        "response_start": np.full((N,), P, np.int32),
        "labels": np.array([1, 0, 1, 1, 0, 0, 1, 0], np.float32),
        "include": np.array([True] * 7 + [False]),
    }


def released_loss(logits, mask, labels, include, ranks):
    """The released dp_actor SPR loss of one micro-batch spread over `ranks` ranks, float64."""
    s, y = logits.astype(np.float64), np.broadcast_to(labels[:, None], logits.shape)
    keep = mask & include[:, None] & (((s > 0) & (y == 1)) | ((s < 0) & (y == 0)))
    blocks = np.split(np.arange(len(s)), ranks)
    pos = sum((keep[b] & (y[b] == 1)).sum() + 1 for b in blocks)  # all-reduce of count + 1
    neg = sum((keep[b] & (y[b] == 0)).sum() + 1 for b in blocks)
    w = np.where(y == 1, 1.5 * neg / (pos + neg), pos / (pos + neg)) * keep
    bce = np.maximum(s, 0) - s * y + np.log1p(np.exp(-np.abs(s)))
    per_rank = [(w[b] * bce[b]).sum() / (w[b].sum() + 1e-5) for b in blocks]
    return float(np.mean(per_rank))  # DDP: the ranks' gradients are averaged


def head_logits_and_mask(rows):
    """SPRM head logits [N, T] of the unsharded model and the feature positions they score."""
    graphdef, params = nnx.split(create_model(CFG, seed=0))

    @jax.jit
    def head_logits(params, tokens, valid):
        model = nnx.merge(graphdef, params)
        return model.sprm_logits(model(tokens, valid=valid, with_logits=False).features)

    logits = np.asarray(head_logits(params, rows["tokens"], rows["valid"]))
    mask = step_mask(rows["tokens"], STEP, mode="train", response_start=rows["response_start"])
    return logits, np.asarray(shift_for_scoring(mask))


def reference(rows, scope_ranks):
    """Mean over the micro-batches of the released loss, from the unsharded model's logits."""
    logits, mask = head_logits_and_mask(rows)
    micro = np.split(np.arange(N), MICRO)
    return float(np.mean([
        released_loss(logits[m], mask[m], rows["labels"][m], rows["include"][m], scope_ranks)
        for m in micro
    ]))  # fmt: skip


def spr_step_metrics(mesh_shape, **cfg):
    n = int(np.prod(list(mesh_shape.values())))
    mesh = make_mesh(mesh_shape, devices=jax.devices()[:n])
    tx = make_optimizer(OptimConfig(lr=1e-3, sprm_lr=1e-3))
    model = create_model(CFG, seed=0, mesh=mesh)
    graphdef, params = nnx.graphdef(model), pure_params(model)
    init = lambda p: init_train_state(p, tx, seed=1, with_ref=False)  # noqa: E731
    shardings = state_shardings(jax.eval_shape(init, params), placement(nnx.state(model), mesh),
                                mesh)  # fmt: skip
    state = jax.jit(init, out_shardings=shardings)(params)
    step_cfg = StepConfig(kind="spr", step=STEP, sprm_dropout=False, **cfg)
    step = compile_step(graphdef, step_cfg, tx, mesh, shardings)
    _, metrics = step(state, split_micro(rollout_rows(), MICRO))
    return jax.device_get(metrics)


def loss_tol(logits, mask):
    """The step's logits differ from the reference's by fp32 reduction order only (another
    device layout, another batch): at most fp32_reduction_tol over the terms of the backbone
    and the head. |d BCE / d s| <= 1 and the weights are fixed while no kept step changes
    sign, so a weighted mean of BCEs moves by at most as much; checked: every scored logit is
    further from 0 than that."""
    tol = fp32_reduction_tol(
        transformer_terms(CFG, P + G, lm_head=False) + sprm_head_terms(CFG.d_model),
        np.abs(logits[mask]).max(),
    )
    assert np.abs(logits[mask]).min() > tol  # the filter keeps the same steps
    return tol


def test_rank_scope_follows_the_mesh_and_matches_the_released_formula():
    rows = rollout_rows()
    tol = loss_tol(*head_logits_and_mask(rows))
    ranks_from_mesh = spr_step_metrics({"data": 2, "fsdp": 2, "tensor": 1}, spr_scope="rank")
    want = reference(rows, scope_ranks=4)  # 2 x 2 ranks: one row each
    np.testing.assert_allclose(ranks_from_mesh["spr_loss"], want, rtol=0, atol=tol)
    pooled = reference(rows, scope_ranks=1)
    assert abs(want - pooled) > 10 * tol  # the scope is visible on these rows
    # The same four ranks set explicitly on one device.
    explicit = spr_step_metrics({"data": 1, "fsdp": 1, "tensor": 1}, spr_scope="rank",
                                spr_ranks=4)  # fmt: skip
    np.testing.assert_allclose(explicit["spr_loss"], want, rtol=0, atol=tol)


def test_bad_scope_values_name_the_key():
    with pytest.raises(ValueError, match=r"spr.scope='global'; expected one of \('batch', 'rank'"):
        StepConfig(kind="spr", step=STEP, spr_scope="global")
    with pytest.raises(ValueError, match=r"spr.ranks=-1; expected an integer >= 0"):
        StepConfig(kind="spr", step=STEP, spr_scope="rank", spr_ranks=-1)
    with pytest.raises(ValueError, match=r"a micro-batch of 4 rows cannot be split over 3"):
        spr_step_metrics({"data": 1, "fsdp": 1, "tensor": 1}, spr_scope="rank", spr_ranks=3)
