"""GRPO pieces: group advantages, token log-probs/entropy, low-variance KL and the clipped
policy loss (docs/method.md section 4).

Shapes: G groups (prompts), k rollouts per group, N rows (= G * k rollouts), T response length,
V vocab. Everything is a pure jnp function computed in fp32 and runs under ``jit``; ``mask``
[N, T] marks response tokens (bool or 0/1). Means over tokens are "token-mean": one mean over
all response tokens of the arrays passed in (under ``jit`` with sharded inputs that is the
global batch; with gradient accumulation it is the micro-batch, so callers that accumulate must
reweight by token counts to get the global token-mean).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metastone_jax.sample.processors import top_k_mask, top_p_mask

ADV_EPS = 1e-6
# |log ratio| bound before exp: exp(20) ~ 4.9e8 is finite in fp32, so neither the value nor its
# backward (where a masked-out or clipped position multiplies the derivative by 0) can be inf*0.
LOG_RATIO_CLAMP = 20.0
KL_CLAMP = 10.0


def _f32(x) -> jnp.ndarray:
    return jnp.asarray(x, jnp.float32)


def group_advantages(rewards) -> jnp.ndarray:
    """rewards [G, k] -> advantages [G, k]: (r - mean_g) / (std_g + 1e-6), std unbiased.

    A group of one (k == 1) uses mean 0, std 1 (so adv = r / (1 + 1e-6)), as verl does; a group
    whose rewards are all equal gets zeros.
    """
    r = _f32(rewards)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [G, k], got shape {r.shape}")
    if r.shape[1] == 1:
        return r / (1.0 + ADV_EPS)
    mean = r.mean(axis=1, keepdims=True)
    std = r.std(axis=1, ddof=1, keepdims=True)
    return (r - mean) / (std + ADV_EPS)


# Logit of a token outside the sampled support: finite, so that p * z stays 0 (not 0 * -inf)
# and its gradient 0; exp of it underflows to exactly 0 in fp32.
OUTSIDE_SUPPORT = -1e30


def support_logits(z, targets, top_k: int = 0, top_p: float = 1.0) -> jnp.ndarray:
    """Tempered logits z [..., V] restricted to the support the sampler draws from: top-k, then
    top-p, as `sample/processors.py` cuts them (HF order), with the target [...] always kept (a
    token drawn at the boundary stays drawable when the logits are recomputed). The cut is a
    constant: no gradient flows through which tokens it keeps. top_k 0 and top_p 1 are no-ops.
    """
    if top_k <= 0 and top_p >= 1.0:
        return z
    v = z.shape[-1]
    cut = jax.lax.stop_gradient(z).reshape(-1, v)
    if top_k > 0:
        cut = top_k_mask(cut, top_k)
    cut = top_p_mask(cut, top_p)
    ids = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1)
    keep = jnp.isfinite(cut).reshape(z.shape) | (ids == jnp.asarray(targets)[..., None])
    return jnp.where(keep, z, OUTSIDE_SUPPORT)


def token_logprobs(logits, targets, temperature: float = 1.0) -> jnp.ndarray:
    """log softmax(logits / temperature)[targets]: logits [N, T, V], targets [N, T] -> [N, T].

    Computed as gathered logit minus logsumexp, so no [N, T, V] log-softmax is kept (XLA fuses
    the scaling into the reduction). Logits cut by `support_logits` give the log-prob under the
    renormalised distribution the sampler draws from.
    """
    z = _f32(logits) / temperature
    picked = jnp.take_along_axis(z, jnp.asarray(targets)[..., None].astype(jnp.int32), axis=-1)
    return picked[..., 0] - jax.nn.logsumexp(z, axis=-1)


def entropy_from_logits(logits, temperature: float = 1.0) -> jnp.ndarray:
    """Entropy of softmax(logits / temperature): logits [N, T, V] -> [N, T] (of the truncated
    distribution, for logits cut by `support_logits`).

    H = logsumexp(z) - sum(softmax(z) * z), stable for large logits (no log of a tiny p).
    """
    z = _f32(logits) / temperature
    p = jax.nn.softmax(z, axis=-1)
    return jax.nn.logsumexp(z, axis=-1) - jnp.sum(p * z, axis=-1)


def low_var_kl(logp, ref_logp) -> jnp.ndarray:
    """Low-variance KL estimate [N, T]: d = ref_logp - logp, kl = exp(d) - d - 1, in [-10, 10].

    kl >= 0, and it reaches 10 at d ~ 2.53 and d ~ -11, so clamping d to [-20, 20] first (as
    current verl does) never changes the value; it keeps exp(d) finite so the backward pass of
    the clamped region is 0, not inf * 0 = NaN.
    """
    d = jnp.clip(_f32(ref_logp) - _f32(logp), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.clip(jnp.exp(d) - d - 1.0, -KL_CLAMP, KL_CLAMP)


def masked_mean(x, mask) -> jnp.ndarray:
    """sum(x * mask) / max(sum(mask), 1) -> scalar. Masked-out entries are selected away (not
    multiplied), so a NaN/inf there cannot leak into the value."""
    m = _f32(mask)
    x = jnp.broadcast_to(_f32(x), m.shape)
    total = jnp.sum(jnp.where(m != 0, x * m, 0.0))
    return total / jnp.maximum(jnp.sum(m), 1.0)


def clipped_policy_loss(logp, old_logp, advantages, mask, clip_eps: float = 0.2):
    """PPO clipped surrogate, token-mean: returns (loss scalar, metrics).

    logp, old_logp, mask [N, T]; advantages [N] (broadcast over T) or [N, T].
    Per token: max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), ratio = exp(logp - old_logp)
    (log ratio clamped to +-20 for overflow safety, like verl). metrics: "clip_fraction" (share
    of tokens where the clipped term is the larger one, i.e. clipping binds: verl's
    pg_clipfrac), "approx_kl" (masked mean of old_logp - logp).
    """
    logp, old_logp = _f32(logp), _f32(old_logp)
    adv = _f32(advantages)
    if adv.ndim == 1:
        adv = adv[:, None]
    log_ratio = jnp.clip(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    metrics = {
        "clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approx_kl": masked_mean(old_logp - logp, mask),
    }
    return loss, jax.lax.stop_gradient(metrics)


def grpo_loss(
    logp,
    old_logp,
    ref_logp,
    entropy,
    advantages,
    mask,
    *,
    clip_eps: float = 0.2,
    kl_coef: float = 0.001,
    entropy_coef: float = 0.001,
):
    """GRPO actor loss: policy - entropy_coef * H + kl_coef * KL(ref) -> (loss, metrics).

    All token arrays [N, T]; advantages [N] or [N, T]; ``ref_logp=None`` drops the KL term
    (metric "kl" is then 0). metrics: policy_loss, kl, entropy, clip_fraction, approx_kl.
    """
    policy, pm = clipped_policy_loss(logp, old_logp, advantages, mask, clip_eps)
    ent = masked_mean(entropy, mask)
    if ref_logp is None:
        kl = jnp.zeros((), jnp.float32)
    else:
        kl = masked_mean(low_var_kl(logp, ref_logp), mask)
    loss = policy - entropy_coef * ent + kl_coef * kl
    metrics = {"policy_loss": policy, "kl": kl, "entropy": ent, **pm}
    return loss, jax.lax.stop_gradient(metrics)
