"""Train steps: mesh equivalence, the SPR gradient scale through the model, restore onto another
mesh, and GRPO raising the reward on a tiny task."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerances import EPS32, fp32_reduction_tol, sprm_head_terms, transformer_terms

from metastone_jax.model import create_model
from metastone_jax.presets import get_preset
from metastone_jax.sample.processors import SamplingParams
from metastone_jax.sharding import make_mesh, placement, sharded_abstract
from metastone_jax.sprm.steps import StepTokens
from metastone_jax.train.checkpoint import TrainCheckpointer
from metastone_jax.train.rollout import pack_rollouts, sample_rollouts, split_micro
from metastone_jax.train.state import (
    OptimConfig,
    init_train_state,
    learning_rate,
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


OPTIM = OptimConfig(lr=1e-3, sprm_lr=1e-3)


def _run(kind, mesh_shape, batch, cfg_kwargs=None):
    """One jitted train step on `mesh_shape` -> (params before, state after, metrics)."""
    mesh = _mesh(mesh_shape)
    tx = make_optimizer(OPTIM)
    step_cfg = StepConfig(kind=kind, step=STEP, sprm_dropout=False, **(cfg_kwargs or {}))
    graphdef, state, shardings, _ = _state(mesh, tx, with_ref=kind == "grpo")
    before = jax.device_get(state.params)  # the step donates the state
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
    return before, jax.device_get(state), jax.device_get(metrics)


def _adam_moments(opt_state) -> dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]]:
    """{param path: (mu, nu)} of every parameter that an Adam transform updates."""
    out = {}
    for label_state in opt_state.inner_states.values():
        adam = [s for s in jax.tree.leaves(label_state.inner_state, is_leaf=_is_adam)
                if _is_adam(s)]  # fmt: skip
        for s in adam:
            flat_nu = dict(jax.tree_util.tree_flatten_with_path(s.nu)[0])
            for path, mu in jax.tree_util.tree_flatten_with_path(s.mu)[0]:
                keys = tuple(str(p.key) for p in path)
                out[keys] = (np.asarray(mu), np.asarray(flat_nu[path]))
    return out


def _is_adam(x) -> bool:
    return hasattr(x, "mu") and hasattr(x, "nu")


def _flat(tree) -> dict[tuple[str, ...], np.ndarray]:
    return {
        tuple(str(p.key) for p in path): np.asarray(x)
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_step_on_2x2x2_mesh_equals_one_device(kind):
    """The sharded step computes the same gradients, and applies AdamW to them exactly.

    Why not compare the parameters after the step directly: Adam's first update is
    lr * g / (|g| + 1e-8), whose derivative in g is 1e-8 / (|g| + 1e-8)^2, so for an entry with
    |g| near 1e-8 a reduction-order difference of 1e-12 in g moves the parameter by up to lr/10:
    the bar would depend on how small the smallest gradient entry happens to be on a machine.
    Instead: (1) the Adam moments (the accumulated, clipped gradient) agree across meshes within
    the fp32 reduction-order bound, and (2) on each mesh the new parameters are AdamW's update of
    that mesh's own moments to within fp32 rounding of the update.
    """
    rng = np.random.default_rng(0)
    batch = _rollout_batch(rng) if kind == "grpo" else _sft_batch(rng)
    # The mesh reorders every sum of the forward and backward pass and those over the batch's
    # positions (as test_gradients_on_2x2x2_mesh_equal_one_device); relative to the values.
    n_terms = 2 * transformer_terms(CFG, batch["tokens"].shape[1]) + batch["tokens"].size
    reduction_tol = fp32_reduction_tol(n_terms, 1.0)
    runs = [
        _run(kind, shape, batch)
        for shape in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2})
    ]
    (before1, state1, m1), (before8, state8, m8) = runs
    for key in m1:  # means over the batch's positions, norms of the gradients
        np.testing.assert_allclose(m8[key], m1[key], rtol=reduction_tol, atol=0, err_msg=key)
    if kind == "grpo":
        assert m1["clip_fraction"] > 0 and m1["spr_steps"] > 0 and m1["spr_loss"] > 0

    moments1, moments8 = _adam_moments(state1.opt_state), _adam_moments(state8.opt_state)
    assert moments1.keys() == moments8.keys() and moments1
    for path, (mu1, nu1) in moments1.items():
        mu8, nu8 = moments8[path]
        scale = float(np.max(np.abs(mu1)))  # the leaf's gradient scale (x (1 - b1))
        np.testing.assert_allclose(mu8, mu1, rtol=0, atol=reduction_tol * scale, err_msg=path)
        # |g| = sqrt(nu / (1 - b2)) moves by at most the change of g itself.
        g8, g1 = (np.sqrt(nu / (1 - OPTIM.b2)) * (1 - OPTIM.b1) for nu in (nu8, nu1))
        np.testing.assert_allclose(g8, g1, rtol=0, atol=reduction_tol * scale, err_msg=path)

    lr = float(learning_rate(OPTIM.lr, OPTIM)(0))
    for before, state in ((before1, state1), (before8, state8)):
        p0, p = _flat(before), _flat(state.params)
        for path, (mu, nu) in _adam_moments(state.opt_state).items():
            # AdamW's first step in float64 from the fp32 moments; the bias corrections
            # 1 - b^1 with b as the fp32 constant optax holds (0.999 -> 1 - 1.3e-5 relative).
            m_hat = mu.astype(np.float64) / (1 - float(np.float32(OPTIM.b1)))
            v_hat = nu.astype(np.float64) / (1 - float(np.float32(OPTIM.b2)))
            x0 = p0[path].astype(np.float64)
            want = x0 - lr * (m_hat / (np.sqrt(v_hat) + 1e-8) + OPTIM.weight_decay * x0)
            # ~8 fp32 roundings, each within eps/2 of |x0| (the sum) or of lr (the update).
            tol = 4 * EPS32 * (np.abs(x0) + lr)
            assert np.all(np.abs(p[path] - want) <= tol), (path, np.max(np.abs(p[path] - want)))
        untouched = set(p0) - set(_adam_moments(state.opt_state))
        for path in untouched:  # the frozen SPRM head of an SFT step
            np.testing.assert_array_equal(p[path], p0[path], err_msg=path)


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
    # The mesh reorders every sum of the forward and of the backward pass, and the sums over
    # the batch's positions; scale: the leaf's largest entry.
    n_terms = 2 * transformer_terms(CFG, t) + batch["tokens"].size
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=fp32_reduction_tol(n_terms, np.abs(a).max()))


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
    # f * 1e-4 + f * (1 - 1e-4) rounds f, a rounding the head's D + 2D terms and the positions'
    # sum carry on; scale: the leaf's largest entry.
    positions = batch["tokens"].size
    n_head = sprm_head_terms(CFG.d_model) + positions
    for a, b in zip(
        jax.tree.leaves(g_scaled["sprm"]), jax.tree.leaves(g_full["sprm"]), strict=True
    ):
        tol = fp32_reduction_tol(n_head, np.abs(b).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=tol)
    backbone_scaled = {k: v for k, v in g_scaled.items() if k != "sprm"}
    backbone_full = {k: v for k, v in g_full.items() if k != "sprm"}
    # Scaling the cotangent by 1e-4 (not a power of 2) rounds every value of the backward pass
    # anew: the sums through the first L - 1 blocks and over the positions; scale: largest entry.
    n_back = transformer_terms(CFG, batch["tokens"].shape[1], n_layers=CFG.n_layers - 1,
                               lm_head=False) + positions  # fmt: skip
    for a, b in zip(jax.tree.leaves(backbone_scaled), jax.tree.leaves(backbone_full), strict=True):
        want = 1e-4 * np.asarray(b, np.float64)
        tol = fp32_reduction_tol(n_back, np.abs(want).max())
        np.testing.assert_allclose(np.asarray(a), want, rtol=0, atol=tol)
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
    from metastone_jax import configs

    for preset in ("sft-1.5b", "grpo-1.5b"):
        c = configs.load("train.py", preset)
        assert (c.model.param_dtype, c.model.compute_dtype) == ("float32", "bfloat16"), preset
    moved = {d: _changed_fraction(CFG.replace(param_dtype=d, compute_dtype="bfloat16"), 1e-6)
             for d in ("bfloat16", "float32")}  # fmt: skip
    assert moved["bfloat16"] < 0.2, moved  # the failure the fp32 master weights avoid
    assert moved["float32"] > 0.95, moved
