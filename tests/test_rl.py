"""GRPO pieces (metastone_jax.rl) against numpy / torch references of docs/method.md
section 4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tolerances import EPS32, fp32_reduction_tol, logprob_tol

from metastone_jax.rl import (
    clipped_policy_loss,
    entropy_from_logits,
    group_advantages,
    grpo_loss,
    low_var_kl,
    masked_mean,
    support_logits,
    token_logprobs,
)


def np_mask_mean(x, m):
    return float((x * m).sum() / max(m.sum(), 1))


def test_group_advantages_vs_numpy():
    rng = np.random.default_rng(0)
    r = rng.integers(0, 2, size=(4, 8)).astype(np.float32)
    r[1] = 1.0  # all correct: zero advantage
    r[2] = 0.0  # all wrong: zero advantage
    want = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-6)
    got = np.asarray(jax.jit(group_advantages)(r))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[1:3], 0.0)
    # hand case: rewards [1, 0, 0, 0]: mean .25, unbiased std sqrt(.25) = .5
    np.testing.assert_allclose(
        group_advantages(np.array([[1.0, 0, 0, 0]])),
        [[0.75 / (0.5 + 1e-6)] + [-0.25 / (0.5 + 1e-6)] * 3],
        rtol=1e-6,
    )


def test_group_advantages_group_of_one():
    r = np.array([[1.0], [0.0], [0.5]], np.float32)
    # mean 0, std 1 (verl): (r - 0) / (1 + 1e-6)
    np.testing.assert_allclose(group_advantages(r), r / (1 + 1e-6), rtol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_and_entropy_vs_torch(temperature):
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(3, 5, 11)) * 4).astype(np.float32)
    targets = rng.integers(0, 11, size=(3, 5))
    t_logits = torch.tensor(logits) / temperature
    want_lp = torch.log_softmax(t_logits, -1).gather(-1, torch.tensor(targets)[..., None])[..., 0]
    want_h = torch.distributions.Categorical(logits=t_logits).entropy()
    lp = jax.jit(token_logprobs, static_argnums=2)(logits, targets, temperature)
    h = jax.jit(entropy_from_logits, static_argnums=1)(logits, temperature)
    # torch's V-term log-sum-exp in another order; scale: max |logit / T|.
    tol = logprob_tol(0, logits.shape[-1], np.abs(logits).max() / temperature)
    np.testing.assert_allclose(lp, want_lp.numpy(), rtol=0, atol=tol)
    # dH = -sum_i q_i (1 + log q_i) d(log q_i): the log-prob error times 1 + log V.
    np.testing.assert_allclose(h, want_h.numpy(), rtol=0, atol=tol * (1 + np.log(logits.shape[-1])))


def test_logprobs_large_logits_stable():
    logits = np.array([[[1000.0, 0.0, -1000.0]]], np.float32)
    lp = token_logprobs(logits, np.array([[0]]))
    h = entropy_from_logits(logits)
    np.testing.assert_allclose(lp, [[0.0]], atol=1e-6)
    np.testing.assert_allclose(h, [[0.0]], atol=1e-6)


def test_low_var_kl_vs_numpy_with_clamp():
    logp = np.array([[-1.0, -2.0, -0.5, -30.0, -1.0, -1.0]], np.float32)
    ref = np.array([[-1.0, -1.5, -2.0, -1.0, -40.0, -200.0]], np.float32)
    d = (ref - logp).astype(np.float64)
    want = np.clip(np.exp(d) - d - 1, -10, 10)  # float64: exp(29) is fine here
    got = np.asarray(low_var_kl(logp, ref))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got[0, 0] == 0.0 and got[0, 3] == 10.0 and got[0, 4] == 10.0
    # backward through the clamped (overflowing) region is finite
    g = jax.grad(lambda lp: low_var_kl(lp, ref).sum())(jnp.asarray(logp))
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(g[0, 3:], 0.0)
    # d/dlogp (exp(d) - d - 1) = 1 - exp(d) inside the clamp range
    np.testing.assert_allclose(g[0, :3], 1 - np.exp(d[0, :3]), rtol=1e-5)


def test_masked_mean():
    x = np.array([[1.0, 2.0, np.nan], [3.0, 4.0, 5.0]], np.float32)
    m = np.array([[1, 1, 0], [0, 1, 0]], bool)
    # Sums of small integers are exact; the division rounds once (twice as x * (1 / y)).
    np.testing.assert_allclose(masked_mean(x, m), (1 + 2 + 4) / 3, rtol=EPS32)
    assert float(masked_mean(x, np.zeros_like(m))) == 0.0


def torch_clipped(logp, old, adv, mask, eps):
    """Direct torch computation of the clipped loss (docs/method.md section 4) and verl's clip
    fraction."""
    logp, old, adv, mask = map(torch.tensor, (logp, old, adv, mask))
    adv = adv[:, None] if adv.dim() == 1 else adv
    ratio = torch.exp(logp - old)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - eps, 1 + eps)
    per_tok = torch.maximum(l1, l2)
    m = mask.float()
    loss = (per_tok * m).sum() / m.sum()
    clipfrac = ((l2 > l1).float() * m).sum() / m.sum()
    approx_kl = ((old - logp) * m).sum() / m.sum()
    return loss.item(), clipfrac.item(), approx_kl.item()


def random_batch(seed, n=6, t=9):
    rng = np.random.default_rng(seed)
    old = rng.normal(-2, 0.5, size=(n, t)).astype(np.float32)
    logp = (old + rng.normal(0, 0.3, size=(n, t))).astype(np.float32)  # many |log r| > 0.2
    adv = rng.normal(size=n).astype(np.float32)
    mask = np.ones((n, t), bool)
    for i, length in enumerate(rng.integers(2, t + 1, size=n)):
        mask[i, length:] = False
    return logp, old, adv, mask


@pytest.mark.parametrize("adv_2d", [False, True])
def test_clipped_policy_loss_vs_torch(adv_2d):
    logp, old, adv, mask = random_batch(2)
    ratio = np.exp(logp - old)[mask]
    assert ((ratio > 1.2) | (ratio < 0.8)).mean() > 0.2  # the clip range is exercised
    if adv_2d:
        adv = np.repeat(adv[:, None], logp.shape[1], 1) * np.linspace(0.5, 1.5, logp.shape[1])
        adv = adv.astype(np.float32)
    want_loss, want_cf, want_kl = torch_clipped(logp, old, adv, mask, 0.2)
    loss, m = jax.jit(clipped_policy_loss)(logp, old, adv, mask)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["clip_fraction"], want_cf, rtol=1e-6)
    np.testing.assert_allclose(m["approx_kl"], want_kl, rtol=1e-5, atol=1e-6)
    assert 0.0 < float(m["clip_fraction"]) < 1.0


def test_clipped_policy_loss_hand_case():
    # A = +1: ratio e^0.5 ~ 1.65 is clipped to 1.2 (loss -1.2, clip binds); ratio e^-0.5 ~ .61
    # keeps -0.61 (the max of -0.61 and -0.8). A = -1: ratio 1.65 keeps 1.65 (max(1.65, 1.2)).
    logp = np.array([[0.5, -0.5], [0.5, 0.0]], np.float32)
    old = np.zeros_like(logp)
    adv = np.array([1.0, -1.0], np.float32)
    mask = np.array([[1, 1], [1, 0]], bool)
    loss, m = clipped_policy_loss(logp, old, adv, mask)
    # The terms (up to e^0.5) cancel to 0.05: an absolute bound. Each carries ~2 roundings
    # (exp or the clip, the product by A), then the sum of 3 and the division: ~10 roundings.
    want = (-1.2 - np.exp(-0.5) + np.exp(0.5)) / 3
    np.testing.assert_allclose(loss, want, rtol=0, atol=fp32_reduction_tol(10, np.exp(0.5)))
    np.testing.assert_allclose(m["clip_fraction"], 1 / 3, rtol=1e-6)


def test_grpo_loss_combination_and_grads():
    logp, old, adv, mask = random_batch(3)
    rng = np.random.default_rng(4)
    ref = (old + rng.normal(0, 0.2, size=old.shape)).astype(np.float32)
    ent = rng.uniform(0, 3, size=old.shape).astype(np.float32)
    want_pol, want_cf, want_akl = torch_clipped(logp, old, adv, mask, 0.2)
    m = mask.astype(np.float64)
    d = ref.astype(np.float64) - logp
    want_kl = np_mask_mean(np.clip(np.exp(d) - d - 1, -10, 10), m)
    want_ent = np_mask_mean(ent.astype(np.float64), m)
    loss, met = jax.jit(grpo_loss)(logp, old, ref, ent, adv, mask)
    want = want_pol - 0.001 * want_ent + 0.001 * want_kl
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(met["policy_loss"], want_pol, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(met["kl"], want_kl, rtol=1e-5)
    np.testing.assert_allclose(met["entropy"], want_ent, rtol=1e-5)
    np.testing.assert_allclose(met["clip_fraction"], want_cf, rtol=1e-6)
    np.testing.assert_allclose(met["approx_kl"], want_akl, rtol=1e-5, atol=1e-6)

    loss0, met0 = grpo_loss(logp, old, None, ent, adv, mask, kl_coef=0.5, entropy_coef=0.1)
    np.testing.assert_allclose(loss0, want_pol - 0.1 * want_ent, rtol=1e-5, atol=1e-6)
    assert float(met0["kl"]) == 0.0

    # End to end from logits: gradients are finite, and padded tokens get none.
    n, t = logp.shape
    logits = jnp.asarray(rng.normal(size=(n, t, 7)), jnp.float32)
    targets = rng.integers(0, 7, size=(n, t))

    def f(z):
        lp = token_logprobs(z, targets, 0.6)
        return grpo_loss(lp, old, ref, entropy_from_logits(z, 0.6), adv, mask)[0]

    g = np.asarray(jax.jit(jax.grad(f))(logits))
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(g[~mask], 0.0)
    assert np.abs(g[mask]).sum() > 0


def _hf_truncated_logprobs(logits, targets, temperature, top_k, top_p):
    """log-probs under HF's temperature -> top-k -> top-p warpers, renormalised (torch)."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    z = torch.tensor(np.asarray(logits, np.float32)).reshape(-1, logits.shape[-1])
    z = TemperatureLogitsWarper(temperature)(None, z)
    z = TopKLogitsWarper(top_k)(None, z)
    z = TopPLogitsWarper(top_p)(None, z)
    logp = torch.log_softmax(z, dim=-1).numpy().reshape(logits.shape)
    return np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0], logp


def test_sampled_support_logprobs_match_hf_warpers():
    """Log-probs of the distribution the sampler draws from (rl.logprob_support="sampled"):
    HF's temperature, top-k and top-p warpers then log-softmax, for targets inside the cut; a
    target outside it is kept (its own mass is added to the support), and the entropy is the
    truncated distribution's."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 2
    t, k, p = 3.0, 4, 0.85
    _, hf = _hf_truncated_logprobs(logits, np.zeros((3, 5), int), t, k, p)
    inside = np.isfinite(hf)
    # One target inside the support and one outside it, per position.
    t_in = np.argmax(np.where(inside, rng.random(hf.shape), -1), -1)
    t_out = np.argmax(np.where(inside, -1, rng.random(hf.shape)), -1)
    assert (~inside).any(-1).all()

    def cut_logprobs(x, targets, k, p):
        return token_logprobs(support_logits(x / t, targets, k, p), targets)

    got = np.asarray(jax.jit(cut_logprobs, static_argnums=(2, 3))(logits, t_in, k, p))
    np.testing.assert_allclose(got, np.take_along_axis(hf, t_in[..., None], -1)[..., 0],
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    # Outside: the support plus the target, renormalised (by hand from the tempered softmax).
    z = logits / t
    keep = inside | (np.arange(11) == t_out[..., None])
    zk = np.where(keep, z, -np.inf)
    want_out = np.take_along_axis(zk, t_out[..., None], -1)[..., 0] - np.log(np.exp(zk).sum(-1))
    np.testing.assert_allclose(cut_logprobs(logits, t_out, k, p), want_out, rtol=1e-5)
    hf_in = np.where(inside, hf, 0.0)
    want_ent = -(np.exp(hf_in) * hf_in * inside).sum(-1)
    np.testing.assert_allclose(entropy_from_logits(support_logits(logits / t, t_in, k, p)),
                               want_ent, rtol=1e-5)  # fmt: skip
    # Without a cut it is the whole softmax, as before.
    np.testing.assert_array_equal(support_logits(logits / t, t_in, 0, 1.0), logits / t)


def test_sampled_support_gives_no_gradient_outside_the_cut():
    """Pushing a drawn token down moves mass only among the tokens the sampler could draw:
    logits outside the cut get exactly zero gradient (with the whole softmax they do not)."""
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.normal(size=(2, 3, 9)) * 2, jnp.float32)
    targets = jnp.asarray(jnp.argmax(logits, -1))

    def loss(z, k, p):
        cut = support_logits(z / 2.0, targets, k, p)
        return jnp.sum(token_logprobs(cut, targets)) + jnp.sum(entropy_from_logits(cut))

    g = np.asarray(jax.grad(loss)(logits, 3, 0.9))
    _, hf = _hf_truncated_logprobs(np.asarray(logits), np.asarray(targets), 2.0, 3, 0.9)
    outside = ~np.isfinite(hf)
    assert outside.sum() >= 2 * 3 * 6
    np.testing.assert_array_equal(g[outside], 0.0)
    assert np.isfinite(g).all() and np.abs(g[~outside]).sum() > 0
    assert np.abs(np.asarray(jax.grad(loss)(logits, 0, 1.0))[outside]).min() > 0
