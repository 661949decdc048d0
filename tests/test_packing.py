"""Packing (data/packing.py): first-fit decreasing, the packed layout, and losses unchanged.

A packed batch holds the same sequences as the padded one, laid end to end with segment ids:
every loss (SFT token mean, the GRPO policy loss with its KL and entropy, the SPR loss with its
class weights) and its gradients must equal the padded batch's.
"""

import jax
import numpy as np
import pytest
from test_train_step import CFG, STEP, _rollout_batch, _sft_batch
from tolerances import fp32_reduction_tol, transformer_terms

from metastone_jax.data.packing import (
    first_fit_decreasing,
    pack_micro_batches,
    pack_rows,
    tokens_per_useful,
)
from metastone_jax.model import create_model
from metastone_jax.train.rollout import pack_for_training, split_micro
from metastone_jax.train.step import LOSSES, StepConfig


@pytest.mark.parametrize("seed", range(5))
def test_first_fit_decreasing_is_a_partition_within_capacity(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 100, size=60).tolist()
    bins = first_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(60))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    # FFD's bound: at most 11/9 OPT + 6/9 bins, and OPT >= the total over the capacity.
    assert len(bins) <= 11 / 9 * np.ceil(sum(lengths) / 128) + 1
    # First fit: no two bins fit together (else the later one's items would have gone first).
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    assert len(loads) < 2 or loads[0] + loads[1] > 128


def test_packing_errors_name_the_sequence():
    with pytest.raises(ValueError, match="sequence 1 has 9 tokens, more than the row budget"):
        first_fit_decreasing([3, 9, 2], 8)
    valid = np.array([[True, False, True, False]])
    with pytest.raises(ValueError, match="row 0's valid tokens are not contiguous"):
        pack_rows({"tokens": np.zeros((1, 4), int), "valid": valid}, 8)


def test_pack_rows_lays_each_sequence_whole_with_its_row_values():
    rng = np.random.default_rng(0)
    batch = _rollout_batch(rng)
    packed, bins = pack_rows(batch, 24)
    seg = packed["segment_ids"]
    for b, members in enumerate(bins):
        for s, i in enumerate(sorted(members)):
            at = seg[b] == s + 1
            np.testing.assert_array_equal(
                packed["tokens"][b, at], batch["tokens"][i][batch["valid"][i]]
            )
            np.testing.assert_array_equal(packed["response_mask"][b, at],
                                          batch["response_mask"][i][batch["valid"][i]])  # fmt: skip
            assert (packed["advantages"][b, at] == batch["advantages"][i]).all()
    assert packed["valid"].sum() == batch["valid"].sum()
    assert tokens_per_useful(packed) == packed["valid"].size / batch["valid"].sum()


def _loss_and_grads(kind, batch, key_seed=0):
    model = create_model(CFG, seed=0)
    from flax import nnx

    graphdef, params = nnx.split(model)
    cfg = StepConfig(kind=kind, step=STEP, sprm_dropout=False, kl_coef=0.05, entropy_coef=0.01)
    loss_fn = jax.jit(lambda p, b: jax.value_and_grad(LOSSES[kind], has_aux=True)(
        p, b, jax.random.key(key_seed), graphdef=graphdef, cfg=cfg))  # fmt: skip
    (loss, metrics), grads = loss_fn(params, batch)
    return float(loss), jax.device_get(metrics), jax.device_get(grads)


def _with_old_logp(batch, rng):
    """Token-indexed old/ref log-probs (entry j: of token j), so both layouts get the same."""
    n, t = batch["tokens"].shape
    batch["old_tok"] = rng.normal(-2.0, 0.3, (n, t)).astype(np.float32)
    batch["ref_tok"] = batch["old_tok"] - 0.1
    return batch


def _as_step_input(mb):
    """Token-indexed log-probs -> the step's [b, T-1] (predicting token t + 1 at t)."""
    mb = dict(mb)
    if "old_tok" in mb:
        mb["old_logp"] = mb.pop("old_tok")[:, 1:]
        mb["ref_logp"] = mb.pop("ref_tok")[:, 1:]
    return mb


# grpo runs the SPR loss too (the spr kind is the same loss without the policy terms).
@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_packed_batch_has_the_padded_batchs_loss_and_gradients(kind):
    rng = np.random.default_rng(7)
    if kind == "sft":
        batch = _sft_batch(rng, n=8, t=16)
    else:
        batch = _with_old_logp(_rollout_batch(rng, n=8, p=6, g=10), rng)
    padded = split_micro(batch, 1)
    packed = pack_for_training(padded, 40, rows_multiple=1, step=STEP if kind != "sft" else None)
    assert packed["tokens"].shape[1] < padded["tokens"].shape[1]  # fewer rows
    ref_loss, ref_m, ref_g = _loss_and_grads(
        kind, _as_step_input({k: v[0] for k, v in padded.items()})
    )
    got_loss, got_m, got_g = _loss_and_grads(
        kind, _as_step_input({k: v[0] for k, v in packed.items()})
    )
    terms = transformer_terms(CFG, 40)
    # The loss is a mean of per-token terms of magnitude ~|loss| (and log-probs ~ max |logit|,
    # bounded by 10 here): the same sums in another order.
    assert abs(got_loss - ref_loss) <= fp32_reduction_tol(terms + 8 * 16, max(abs(ref_loss), 10))
    for name in ("tokens", "spr_kept_pos", "spr_kept_neg", "n_correct", "n_incorrect"):
        if name in ref_m:
            assert got_m[name] == ref_m[name], name
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_g), jax.tree.leaves(got_g),
                            strict=True):  # fmt: skip
        scale = max(np.abs(a).max(), 1e-30)
        tol = fp32_reduction_tol(2 * terms + 8 * 16, scale)
        np.testing.assert_allclose(b, a, rtol=0, atol=tol, err_msg=jax.tree_util.keystr(path))


def test_micro_batches_pack_apart_to_one_row_count():
    rng = np.random.default_rng(3)
    batch = split_micro(_rollout_batch(rng, n=8), 2)
    packed = pack_micro_batches({k: batch[k] for k in ("tokens", "valid")}, 24, rows_multiple=4)
    assert packed["tokens"].shape[:2] == (2, 4)
    for a in range(2):  # each micro-batch keeps exactly its own sequences
        seg = packed["segment_ids"][a]
        got = sorted(tuple(packed["tokens"][a, r, seg[r] == s])
                     for r in range(4) for s in range(1, 9) if (seg[r] == s).any())  # fmt: skip
        want = sorted(tuple(batch["tokens"][a, i][batch["valid"][a, i]]) for i in range(4))
        assert got == want
