"""Chunked LM-head losses (metastone_jax/lm_loss.py) against the full-logits formulas, and the
train steps with `logits_chunk` against the same steps on full logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerances import fp32_reduction_tol, transformer_terms

from metastone_jax import lm_loss
from metastone_jax.model import create_model
from metastone_jax.presets import get_preset
from metastone_jax.sharding import make_mesh
from metastone_jax.train.state import pure_params
from metastone_jax.train.step import LOSSES, StepConfig, rollout_logprobs_fn

N, T, D, V = 3, 37, 16, 50
RNG = np.random.default_rng(0)
H = RNG.standard_normal((N, T, D)).astype(np.float32)
W = (RNG.standard_normal((D, V)) * 0.5).astype(np.float32)
TARGETS = RNG.integers(0, V, (N, T)).astype(np.int32)
WEIGHTS = RNG.random((N, T)).astype(np.float32)
# fp32 terms per log-prob: the D-term logit and the V-term log-sum-exp. A value summed over the
# N * T positions adds those; a gradient also sums V (dh) or N * T (dw) terms on the way back.
LOGP_TERMS = D + V
GRAD_TERMS = D + V + max(V, N * T)


def _np_log_softmax(h, w, temperature=1.0):
    z = (h.astype(np.float64) @ w.astype(np.float64)) / temperature
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _jnp_full(h, w, temperature=1.0):
    """Reference on the full [N, T, V] logits (plain formulas, autodiff for the gradients)."""
    logq = jax.nn.log_softmax(jnp.einsum("ntd,dv->ntv", h, w) / temperature, axis=-1)
    logp = jnp.take_along_axis(logq, TARGETS[..., None], axis=-1)[..., 0]
    return logp, -jnp.sum(jnp.exp(logq) * logq, axis=-1)


@pytest.mark.parametrize("chunk", [1, 8, 37, 64])
def test_chunked_logprobs_and_entropy_match_the_full_logits(chunk):
    logp, ent = lm_loss.chunked_logprobs(
        H, W, TARGETS, chunk=chunk, temperature=0.7, with_entropy=True
    )
    logq = _np_log_softmax(H, W, 0.7)
    want_logp = np.take_along_axis(logq, TARGETS[..., None], -1)[..., 0]
    want_ent = -(np.exp(logq) * logq).sum(-1)
    # Against float64: scale max |log q|, which bounds the logits' spread.
    tol = fp32_reduction_tol(LOGP_TERMS, np.abs(logq).max())
    np.testing.assert_allclose(logp, want_logp, rtol=0, atol=tol)
    # d(entropy) = -sum_i q_i (1 + log q_i) d(log q_i): the log-prob error times 1 + log V.
    np.testing.assert_allclose(ent, want_ent, rtol=0, atol=tol * (1 + np.log(V)))
    assert lm_loss.chunked_logprobs(H, W, TARGETS, chunk=chunk)[1] is None


def test_chunked_logprobs_gradients_match_the_full_logits():
    def objective(fn):
        def f(h, w):
            logp, ent = fn(h, w)
            return jnp.sum(jnp.sin(logp) * WEIGHTS) + jnp.sum(ent**2)

        return jax.jit(jax.grad(f, argnums=(0, 1)))

    chunked = lambda h, w: lm_loss.chunked_logprobs(
        h, w, TARGETS, chunk=8, temperature=0.7, with_entropy=True
    )
    got = objective(chunked)(H, W)
    want = objective(lambda h, w: _jnp_full(h, w, 0.7))(H, W)
    for g, r in zip(got, want, strict=True):  # scale: the largest gradient entry
        np.testing.assert_allclose(
            g, r, rtol=0, atol=fp32_reduction_tol(GRAD_TERMS, np.abs(r).max())
        )


@pytest.mark.parametrize("chunk", [5, 37, 100])
def test_fused_nll_value_and_gradients_match_the_full_logits(chunk):
    logq = _np_log_softmax(H, W)
    want = -(WEIGHTS * np.take_along_axis(logq, TARGETS[..., None], -1)[..., 0]).sum()
    fused = lambda h, w: lm_loss.fused_nll(h, w, TARGETS, WEIGHTS, chunk=chunk)
    # N * T log-probs of one sign, weights >= 0: no cancellation, relative to the value.
    rtol = fp32_reduction_tol(LOGP_TERMS + N * T, 1.0)
    np.testing.assert_allclose(jax.jit(fused)(H, W), want, rtol=rtol)
    # A cotangent other than 1 (the SFT loss is scaled, e.g. by the micro-batch average).
    got = jax.jit(jax.grad(lambda h, w: 3.0 * fused(h, w), argnums=(0, 1)))(H, W)
    full = lambda h, w: -3.0 * jnp.sum(WEIGHTS * _jnp_full(h, w)[0])
    ref = jax.grad(full, argnums=(0, 1))(H, W)
    for g, r in zip(got, ref, strict=True):  # scale: the largest gradient entry
        np.testing.assert_allclose(
            g, r, rtol=0, atol=fp32_reduction_tol(GRAD_TERMS, np.abs(r).max())
        )


def test_fused_nll_skips_chunks_without_weight():
    """Chunks whose weights are zero in every row (prompt, padding) are not computed: their
    hidden states never reach the loss or either gradient, so NaNs planted there stay out, and
    the rest equals the full-logits reference."""
    weights = WEIGHTS.copy()
    weights[:, :10] = 0  # chunks 0 and 1 of 5 positions: prompt-like
    weights[:, 35:] = 0  # chunk 7 (positions 35-36 and the T-padding): padding-like, skipped
    weights[1, 20:25] = 0  # zero in one row only: chunk 4 still computed
    h = H.copy()
    h[:, :10] = np.nan
    h0 = np.where(np.isnan(h), 0, h)
    logq = _np_log_softmax(h0, W)
    want = -(weights * np.take_along_axis(logq, TARGETS[..., None], -1)[..., 0]).sum()
    fused = lambda h, w: lm_loss.fused_nll(h, w, TARGETS, weights, chunk=5)
    rtol = fp32_reduction_tol(LOGP_TERMS + N * T, 1.0)  # one sign: relative to the value
    np.testing.assert_allclose(jax.jit(fused)(h, W), want, rtol=rtol)
    dh, dw = jax.jit(jax.grad(fused, argnums=(0, 1)))(h, W)
    assert np.all(np.asarray(dh)[:, :10] == 0) and np.isfinite(dw).all()
    ref = jax.grad(lambda h, w: -jnp.sum(weights * _jnp_full(h, w)[0]), argnums=(0, 1))(h0, W)
    for g, r in zip((dh, dw), ref, strict=True):  # scale: the largest gradient entry
        np.testing.assert_allclose(
            g, r, rtol=0, atol=fp32_reduction_tol(GRAD_TERMS, np.abs(r).max())
        )


def test_bad_shapes_and_chunks_are_named():
    with pytest.raises(ValueError, match=r"h must be \[N, T, D\] and w \[D, V\]"):
        lm_loss.chunked_logprobs(H, W.T, TARGETS, chunk=4)
    with pytest.raises(ValueError, match="targets must be"):
        lm_loss.fused_nll(H, W, TARGETS[:, 1:], WEIGHTS, chunk=4)
    with pytest.raises(ValueError, match="weights must be"):
        lm_loss.fused_nll(H, W, TARGETS, WEIGHTS[:, 1:], chunk=4)
    with pytest.raises(ValueError, match="chunk must be an integer >= 1"):
        lm_loss.chunked_logprobs(H, W, TARGETS, chunk=0)
    with pytest.raises(ValueError, match="logits_chunk must be an integer >= 0"):
        StepConfig(kind="sft", logits_chunk=-1)


# --- the train-step losses with logits_chunk against the same losses on full logits ----------

CFG = get_preset("tiny")


def _batch(kind, rng, n=8, t=23):
    tokens = rng.integers(10, CFG.vocab_size, size=(n, t)).astype(np.int32)
    valid = np.ones((n, t), bool)
    valid[1::2, -5:] = False
    batch = {"tokens": tokens, "valid": valid}
    if kind == "sft":
        loss_mask = valid.copy()
        loss_mask[:, :6] = False
        return {**batch, "loss_mask": loss_mask}
    response = valid.copy()
    response[:, :6] = False
    return {
        **batch,
        "response_mask": response,
        "advantages": rng.normal(size=n).astype(np.float32),
        "old_logp": rng.normal(-5, 0.3, (n, t - 1)).astype(np.float32),
        "ref_logp": rng.normal(-5, 0.3, (n, t - 1)).astype(np.float32),
    }


@pytest.mark.parametrize("kind", ["sft", "grpo"])
@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2)])
def test_chunked_step_losses_equal_full_logits(kind, mesh_shape):
    """Loss, metrics and gradients with logits_chunk = 4 (T = 23: a ragged last chunk) equal the
    full-logits loss on one device; on a 2x2x2 mesh the vocabulary is tensor-sharded."""
    batch = _batch(kind, np.random.default_rng(1))
    single = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    model = create_model(CFG, seed=0, mesh=single)
    graphdef, params = nnx.graphdef(model), pure_params(model)
    full_cfg = StepConfig(kind=kind, temperature=0.8, spr_coef=0.0)

    def value_and_grad(graphdef, cfg):
        loss = lambda p: LOSSES[kind](p, batch, None, graphdef=graphdef, cfg=cfg)
        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    want = value_and_grad(graphdef, full_cfg)(params)

    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape, strict=True)),
                     devices=jax.devices()[: int(np.prod(mesh_shape))])  # fmt: skip
    model = create_model(CFG, seed=0, mesh=mesh)
    graphdef, params = nnx.graphdef(model), pure_params(model)
    cfg = StepConfig(kind=kind, temperature=0.8, spr_coef=0.0, logits_chunk=4)
    with jax.set_mesh(mesh):
        got = value_and_grad(graphdef, cfg)(params)
    (got_loss, got_metrics), got_grads = jax.device_get(got)
    (want_loss, want_metrics), want_grads = jax.device_get(want)
    # The mesh and the chunks reorder every sum of the forward, then the batch's positions.
    n_value = transformer_terms(CFG, batch["tokens"].shape[1]) + batch["tokens"].size
    np.testing.assert_allclose(got_loss, want_loss, rtol=fp32_reduction_tol(n_value, 1.0))
    # Metrics: means over the positions, relative to the value (GRPO's policy loss mixes signs:
    # this assumes its terms cancel by less than the bound's factor n over the typical error).
    for key in want_metrics:
        np.testing.assert_allclose(got_metrics[key], want_metrics[key],
                                   rtol=fp32_reduction_tol(n_value, 1.0), err_msg=key)  # fmt: skip
    # The backward pass reorders the forward's sums once more; scale: the largest entry.
    n_grad = n_value + transformer_terms(CFG, batch["tokens"].shape[1])
    for g, r in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, r, rtol=0, atol=fp32_reduction_tol(n_grad, np.abs(r).max()))


def _head_tol(logp) -> float:
    """Chunked vs full rollout log-probs: the backbone is the same computation in both; the LM
    head's d_model terms and the log-softmax's vocab_size terms are added in another order.
    Scale: max |log-prob|, which bounds the spread of the logits that matter."""
    return fp32_reduction_tol(CFG.d_model + CFG.vocab_size, np.abs(np.asarray(logp)).max())


def test_chunked_rollout_logprobs_equal_full_logits():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:8])
    model = create_model(CFG, seed=0, mesh=mesh)
    graphdef, params = nnx.graphdef(model), pure_params(model)
    batch = {k: v[None] for k, v in _batch("sft", np.random.default_rng(2)).items()}
    full, _ = rollout_logprobs_fn(graphdef, mesh, temperature=0.6)(params, None, batch)
    chunked, _ = rollout_logprobs_fn(graphdef, mesh, temperature=0.6, logits_chunk=5)(
        params, None, batch
    )
    np.testing.assert_allclose(chunked, full, rtol=0, atol=_head_tol(full))


def test_chunking_bounds_the_compiled_step_memory():
    """The point of chunking: XLA's temporary memory for the SFT loss and its gradient stops
    holding [b, T, V] arrays. Vocab 32768, T 256: full logits are 8 x 256 x 32768 x 4 B =
    256 MiB per copy; a chunk of 32 positions is 1/8 of that."""
    cfg = CFG.replace(vocab_size=32768, max_len=256)
    model = create_model(cfg, seed=0)
    graphdef, params = nnx.graphdef(model), pure_params(model)
    rng = np.random.default_rng(0)
    batch = {
        "tokens": rng.integers(0, 32768, (8, 256)).astype(np.int32),
        "valid": np.ones((8, 256), bool),
        "loss_mask": np.ones((8, 256), bool),
    }

    def temp_bytes(chunk):
        step_cfg = StepConfig(kind="sft", logits_chunk=chunk)
        fn = jax.grad(lambda p: LOSSES["sft"](p, batch, None, graphdef=graphdef, cfg=step_cfg)[0])
        return jax.jit(fn).lower(params).compile().memory_analysis().temp_size_in_bytes

    full, chunked = temp_bytes(0), temp_bytes(32)
    logits = 8 * 256 * 32768 * 4
    assert full > 2 * logits, full  # the logits and their cotangent, at least
    assert chunked < logits, chunked  # less than one copy of them


def test_bf16_compute_chunks_match_full_logits_within_bf16_rounding():
    """With bf16 compute the full path rounds the logits to bf16 before its fp32 loss; the
    chunks accumulate them in fp32. The two SFT losses agree to bf16 precision."""
    cfg = CFG.replace(compute_dtype="bfloat16")
    model = create_model(cfg, seed=0)
    graphdef, params = nnx.graphdef(model), pure_params(model)
    batch = _batch("sft", np.random.default_rng(3))

    def loss(chunk):
        step_cfg = StepConfig(kind="sft", logits_chunk=chunk)
        return jax.jit(lambda p: LOSSES["sft"](p, batch, None, graphdef=graphdef, cfg=step_cfg)[0])

    full, chunked = float(loss(0)(params)), float(loss(4)(params))
    assert abs(chunked - full) <= 2**-7 * abs(full), (full, chunked)


def test_chunked_rollout_logprobs_with_a_sampled_support_equal_full_logits():
    """rl.logprob_support="sampled": the chunked path cuts the same support as the full one, and
    the cut lowers no log-prob of a drawn token (the support renormalises upwards)."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:8])
    model = create_model(CFG, seed=0, mesh=mesh)
    graphdef, params = nnx.graphdef(model), pure_params(model)
    batch = {k: v[None] for k, v in _batch("sft", np.random.default_rng(2)).items()}
    cut = {"temperature": 3.0, "top_k": 3, "top_p": 0.85}
    full, _ = rollout_logprobs_fn(graphdef, mesh, **cut)(params, None, batch)
    chunked, _ = rollout_logprobs_fn(graphdef, mesh, logits_chunk=5, **cut)(params, None, batch)
    np.testing.assert_allclose(chunked, full, rtol=0, atol=_head_tol(full))
    whole, _ = rollout_logprobs_fn(graphdef, mesh, temperature=3.0)(params, None, batch)
    assert (np.asarray(full) >= np.asarray(whole) - 1e-5).all()
    assert (np.asarray(full) > np.asarray(whole) + 1e-3).mean() > 0.5
