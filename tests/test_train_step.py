"""Train steps: mesh equivalence, the SPR gradient scale through the model, restore onto another
mesh, and GRPO raising the reward on a tiny task."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metastone_jax.model import create_model
from metastone_jax.presets import get_preset
from metastone_jax.sample.processors import SamplingParams
from metastone_jax.sharding import make_mesh, placement, sharded_abstract
from metastone_jax.sprm import StepTokens
from metastone_jax.train.checkpoint import TrainCheckpointer
from metastone_jax.train.rollout import pack_rollouts, sample_rollouts, split_micro
from metastone_jax.train.state import (
    OptimConfig,
    init_train_state,
    make_optimizer,
    pure_params,
    state_shardings,
)
from metastone_jax.train.step import (
    LOSSES,
    StepConfig,
    compile_step,
    rollout_logprobs_fn,
    spr_only_loss,
)

CFG = get_preset("tiny")
STEP = StepTokens(step_ids=(5,), think_open=6, think_close=7)


def _mesh(shape):
    n = int(np.prod(list(shape.values())))
    return make_mesh(shape, devices=jax.devices()[:n])


def _state(mesh, tx, *, with_ref=False, seed=0):
    model = create_model(CFG, seed=seed, mesh=mesh)
    graphdef = nnx.graphdef(model)
    params = pure_params(model)
    param_sh = placement(nnx.state(model), mesh)
    init = lambda p: init_train_state(p, tx, seed=1, with_ref=with_ref)
    abstract = jax.eval_shape(init, params)
    shardings = state_shardings(abstract, param_sh, mesh)
    return graphdef, jax.jit(init, out_shardings=shardings)(params), shardings, abstract


def _rollout_batch(rng, n=8, p=6, g=10):
    """Hand-made GRPO rows: left-padded prompts, responses with think tags and step tokens."""
    t = p + g
    tokens = rng.integers(10, CFG.vocab_size, size=(n, t)).astype(np.int32)
    valid = np.ones((n, t), bool)
    valid[::2, :2] = False  # left padding in half the prompts
    lengths = rng.integers(4, g + 1, size=n)
    response = np.zeros((n, t), bool)
    for i, n_gen in enumerate(lengths):
        response[i, p : p + n_gen] = True
        valid[i, p + n_gen :] = False
        tokens[i, p] = 6  # <think>
        tokens[i, p + 2] = 5  # a step
        tokens[i, p + 3] = 5  # a run of step tokens: only the first counts
        if n_gen > 6:
            tokens[i, p + 5] = 5
            tokens[i, p + 6] = 7  # </think>
    labels = rng.integers(0, 2, size=n).astype(np.float32)
    return {
        "tokens": tokens,
        "valid": valid,
        "response_mask": response,
        "response_start": np.full((n,), p, np.int32),
        "advantages": rng.normal(size=n).astype(np.float32),
        "labels": labels,
        "include": np.array([True] * (n - 1) + [False]),
    }


def _sft_batch(rng, n=8, t=16):
    tokens = rng.integers(0, CFG.vocab_size, size=(n, t)).astype(np.int32)
    valid = np.ones((n, t), bool)
    valid[1::2, -5:] = False  # right padding
    loss_mask = valid.copy()
    loss_mask[:, :6] = False  # the prompt
    return {"tokens": tokens, "valid": valid, "loss_mask": loss_mask}


def _run(kind, mesh_shape, batch, cfg_kwargs=None):
    mesh = _mesh(mesh_shape)
    tx = make_optimizer(OptimConfig(lr=1e-3, sprm_lr=1e-3))
    step_cfg = StepConfig(kind=kind, step=STEP, sprm_dropout=False, **(cfg_kwargs or {}))
    graphdef, state, shardings, _ = _state(mesh, tx, with_ref=kind == "grpo")
    batch = split_micro(batch, 2)  # gradient accumulation over 2 micro-batches
    if kind == "grpo":
        old, ref = rollout_logprobs_fn(graphdef, mesh, temperature=1.0)(
            state.params, state.ref_params, batch
        )
        # Perturb the old log-probs so some ratios leave the clip range.
        old = old + jnp.asarray(np.random.default_rng(3).normal(0, 0.3, old.shape), old.dtype)
        batch = {**batch, "old_logp": np.asarray(old), "ref_logp": np.asarray(ref) - 0.1}
    step = compile_step(graphdef, step_cfg, tx, mesh, shardings)
    state, metrics = step(state, batch)
    return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_step_on_2x2x2_mesh_equals_one_device(kind):
    rng = np.random.default_rng(0)
    batch = _rollout_batch(rng) if kind == "grpo" else _sft_batch(rng)
    p1, m1 = _run(kind, {"data": 1, "fsdp": 1, "tensor": 1}, batch)
    p8, m8 = _run(kind, {"data": 2, "fsdp": 2, "tensor": 2}, batch)
    # Tolerance: fp32 reductions are split differently across 8 devices (~1e-7 relative).
    for key in m1:
        np.testing.assert_allclose(m8[key], m1[key], rtol=2e-5, atol=1e-6, err_msg=key)
    if kind == "grpo":
        assert m1["clip_fraction"] > 0 and m1["spr_steps"] > 0 and m1["spr_loss"] > 0
    # Parameters after one AdamW step (lr 1e-3). Adam's first update is lr * g / (|g| + eps):
    # its size does not depend on |g|, so for small entries the ~1e-7 relative reduction-order
    # noise of the gradient (checked tightly below) moves the update by up to a few 1e-6.
    # Bar: 2% of the step size (2e-5) for every entry; the median leaf agrees to < 1e-6.
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), p1, p8)
    assert max(jax.tree.leaves(diffs)) < 2e-5, diffs
    assert np.median(jax.tree.leaves(diffs)) < 1e-6, diffs


@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_gradients_on_2x2x2_mesh_equal_one_device(kind):
    rng = np.random.default_rng(0)
    batch = _rollout_batch(rng) if kind == "grpo" else _sft_batch(rng)
    t = batch["tokens"].shape[1]
    batch["old_logp"] = rng.normal(-5, 0.3, (8, t - 1)).astype(np.float32)
    batch["ref_logp"] = batch["old_logp"] - 0.1
    cfg = StepConfig(kind=kind, step=STEP, sprm_dropout=False)
    grads = []
    for shape in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
        mesh = _mesh(shape)
        model = create_model(CFG, seed=0, mesh=mesh)
        graphdef, params = nnx.graphdef(model), pure_params(model)
        loss = lambda p, b, g=graphdef: LOSSES[kind](p, b, None, graphdef=g, cfg=cfg)[0]
        with jax.set_mesh(mesh):
            grads.append(jax.device_get(jax.jit(jax.grad(loss))(params, batch)))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * max(np.abs(a).max(), 1e-12))


def test_spr_loss_reaches_the_backbone_scaled_by_1e_minus_4():
    model = create_model(CFG, seed=0)
    graphdef, params = nnx.graphdef(model), pure_params(model)
    batch = _rollout_batch(np.random.default_rng(1))
    batch["labels"] = np.array([1, 0] * 4, np.float32)

    def grads(scale):
        cfg = StepConfig(kind="spr", step=STEP, sprm_dropout=False, spr_grad_scale=scale)
        fn = lambda p: spr_only_loss(p, batch, None, graphdef=graphdef, cfg=cfg)[0]
        return jax.grad(fn)(params)

    g_scaled, g_full = grads(1e-4), grads(1.0)
    # The head learns at full rate (the scaled feature's forward value is f up to rounding).
    for a, b in zip(
        jax.tree.leaves(g_scaled["sprm"]), jax.tree.leaves(g_full["sprm"]), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    backbone_scaled = {k: v for k, v in g_scaled.items() if k != "sprm"}
    backbone_full = {k: v for k, v in g_full.items() if k != "sprm"}
    for a, b in zip(jax.tree.leaves(backbone_scaled), jax.tree.leaves(backbone_full), strict=True):
        np.testing.assert_allclose(np.asarray(a), 1e-4 * np.asarray(b), rtol=1e-4, atol=1e-12)
    assert float(jnp.max(jnp.abs(g_full["blocks"]["mlp"]["up_proj"]["kernel"]))) > 1e-5


def test_restore_onto_a_different_mesh(tmp_path):
    tx = make_optimizer(OptimConfig(lr=1e-3))
    mesh_a = _mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, state, _, abstract = _state(mesh_a, tx, with_ref=True)
    ckpt = TrainCheckpointer(str(tmp_path), keep=2)
    ckpt.save(1, state, {"step": 1, "seed": 0, "size": 10}, {"note": "a"})
    ckpt.wait()
    mesh_b = _mesh({"data": 1, "fsdp": 8, "tensor": 1})
    model_b = create_model(CFG, seed=0, mesh=mesh_b)
    shardings_b = state_shardings(abstract, placement(nnx.state(model_b), mesh_b), mesh_b)
    restored, data, meta = ckpt.restore(1, sharded_abstract(abstract, shardings_b))
    ckpt.close()
    assert data == {"step": 1, "seed": 0, "size": 10} and meta == {"note": "a"}
    want, got = jax.device_get(state), jax.device_get(restored)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)
    up = restored.params["blocks"]["mlp"]["up_proj"]["kernel"]
    assert up.sharding.mesh.shape == mesh_b.shape
    assert up.sharding.spec == shardings_b.params["blocks"]["mlp"]["up_proj"]["kernel"].spec
    mu = restored.opt_state.inner_states["policy"].inner_state[1][0].mu
    assert mu["blocks"]["mlp"]["up_proj"]["kernel"].sharding.spec == up.sharding.spec


def test_grpo_raises_the_mean_reward_on_a_tiny_task():
    """Reward 1 when the first sampled token is in a target set (1/8 of the vocabulary at the
    random start); 30 GRPO steps with a fixed seed must lift the mean reward well above that."""
    mesh = _mesh({"data": 1, "fsdp": 1, "tensor": 1})
    tx = make_optimizer(OptimConfig(lr=3e-3))
    step_cfg = StepConfig(kind="grpo", spr_coef=0.0, kl_coef=0.001)
    graphdef, state, shardings, _ = _state(mesh, tx, with_ref=True)
    step = compile_step(graphdef, step_cfg, tx, mesh, shardings)
    logprobs = rollout_logprobs_fn(graphdef, mesh, temperature=1.0)
    prompts = [[1, 10 + i] for i in range(8)]
    target = set(range(32, 48))
    sampling = SamplingParams(temperature=1.0, max_new_tokens=2)
    rewards_per_step = []
    for it in range(30):
        cands = sample_rollouts(
            graphdef, state.params, prompts, k=8, sampling=sampling, step=STEP,
            seeds=[it * 100 + i for i in range(8)], pad_id=0, mesh=mesh,
        )  # fmt: skip
        rewards = np.isin(cands.tokens[:, :, 0], list(target)).astype(np.float32)
        rewards_per_step.append(rewards.mean())
        rows = split_micro(pack_rollouts(prompts, cands, rewards, prompt_width=2, pad_id=0), 1)
        old, ref = logprobs(state.params, state.ref_params, rows)
        state, _ = step(state, {**rows, "old_logp": old, "ref_logp": ref})
    start, end = np.mean(rewards_per_step[:5]), np.mean(rewards_per_step[-5:])
    assert start < 0.3 and end > start + 0.3, rewards_per_step


def test_checkpoints_keep_the_last_n_plus_the_best(tmp_path):
    mesh = _mesh({"data": 1, "fsdp": 1, "tensor": 1})
    tx = make_optimizer(OptimConfig())
    _, state, _, _ = _state(mesh, tx)
    losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: float("nan"), 6: 2.5}
    ckpt = TrainCheckpointer(str(tmp_path), keep=2, best_metric="loss", best_mode="min")
    for step, loss in losses.items():
        ckpt.save(step, state, {"step": step}, {}, {"loss": loss})
    ckpt.wait()
    assert sorted(ckpt.all_steps()) == [2, 5, 6]  # best (lowest loss), then the last two
    ckpt.close()
    ckpt = TrainCheckpointer(str(tmp_path), keep=1, best_metric="reward_mean", best_mode="max")
    for step, reward in {7: 0.1, 8: 0.9, 9: 0.2}.items():
        ckpt.save(step, state, {"step": step}, {}, {"reward_mean": reward})
    ckpt.wait()
    assert 8 in ckpt.all_steps() and 9 in ckpt.all_steps() and 7 not in ckpt.all_steps()
    ckpt.close()


def _changed_fraction(cfg, lr):
    """Share of the policy's weight-matrix entries (embedding aside) one SFT step at `lr`
    changes."""
    mesh = _mesh({"data": 1, "fsdp": 1, "tensor": 1})
    tx = make_optimizer(OptimConfig(lr=lr, train_sprm=False))
    model = create_model(cfg, seed=0, mesh=mesh)
    graphdef, params = nnx.graphdef(model), pure_params(model)
    init = lambda p: init_train_state(p, tx, seed=1, with_ref=False)
    shardings = state_shardings(jax.eval_shape(init, params), placement(nnx.state(model), mesh),
                                mesh)  # fmt: skip
    state = jax.jit(init, out_shardings=shardings)(params)
    before = jax.device_get(state.params)
    step = compile_step(graphdef, StepConfig(kind="sft"), tx, mesh, shardings)
    state, _ = step(state, split_micro(_sft_batch(np.random.default_rng(0)), 1))
    after = jax.device_get(state.params)
    # The embedding's rows of tokens absent from the batch get no gradient; SFT leaves the head.
    skip = {"embed", "sprm"}
    flat = jax.tree_util.tree_flatten_with_path(before)[0]
    pairs = [(b, a) for (path, b), a in zip(flat, jax.tree.leaves(after), strict=True)
             if b.ndim >= 2 and getattr(path[0], "key", None) not in skip]  # fmt: skip
    changed = sum(int(np.sum(np.asarray(b) != np.asarray(a))) for b, a in pairs)
    return changed / sum(b.size for b, _ in pairs)


def test_released_recipe_keeps_fp32_weights_that_move_at_its_lr():
    """An AdamW update is about lr per entry; at the released LR (1e-6) that is far below bf16's
    spacing (2^-8 relative), so bf16 weights stay put. The released presets train fp32 master
    weights with bf16 compute, which move."""
    from metastone_jax.main import TRAIN_CONFIG, _parse

    for preset in ("sft-1.5b", "grpo-1.5b"):
        c = _parse(["t", f"--config={TRAIN_CONFIG}:{preset}"], preset, TRAIN_CONFIG)
        assert (c.model.param_dtype, c.model.compute_dtype) == ("float32", "bfloat16"), preset
    moved = {d: _changed_fraction(CFG.replace(param_dtype=d, compute_dtype="bfloat16"), 1e-6)
             for d in ("bfloat16", "float32")}  # fmt: skip
    assert moved["bfloat16"] < 0.2, moved  # the failure the fp32 master weights avoid
    assert moved["float32"] > 0.95, moved
