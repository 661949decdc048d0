"""The decode loop's per-step draw, with the nucleus (top-p) sampled by rejection.

`processors.top_p_mask` finds a row's nucleus exactly, but it takes ~33 masked passes over
[N, V] (no sort on CPU): 16% of a decode step at the sampler bench's [128, 16000]. Sampling
*from* the nucleus needs far less. Draw a token from the distribution before the cut; it is
in the nucleus iff the mass of the tokens before it in HF's order (ascending logit, ties by
id), plus its own, exceeds 1 - top_p: one masked pass decides it. Accepted draws are
distributed exactly as the nucleus (p restricted to the kept set, renormalised); a rejected
row draws again. A round rejects a row with probability 1 - (kept mass) <= 1 - top_p, so
after `REJECTION_ROUNDS` (4) rounds a row is still undrawn with probability <= (1 - top_p)^4;
those rows (if any) draw from the exact `top_p_mask`, which keeps the law exact:
P(x) = q(x)(1 - r^R) + r^R q(x) = q(x) for a rejection rate r and the nucleus law q.

Rejection pays when little mass is cut: `REJECTION_MAX_DROP` (1 - top_p at most 0.1, the
released evaluation's 0.95 included); a wider cut uses the exact mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metastone_jax.sample.processors import (
    NEG_INF,
    SamplingParams,
    _inverse_cdf,
    _inverse_cdf_from_blocks,
    _sortable_key,
    apply_repetition_penalty,
    apply_temperature,
    cdf_blocks,
    sample,
    softmax_parts,
    top_k_mask,
    top_p_mask,
)

REJECTION_MAX_DROP = 0.1
REJECTION_ROUNDS = 4


def draw(
    logits: jax.Array,
    seen: jax.Array,
    keys: jax.Array,
    params: SamplingParams,
    forced: jax.Array | None = None,
    *,
    rounds: int = REJECTION_ROUNDS,
) -> tuple[jax.Array, jax.Array]:
    """One token per row from raw logits [N, V], presence mask `seen` [N, V], keys [N, 2].

    The token is distributed as `sample(process_logits(logits, seen, params), ...)` (HF's
    penalty -> temperature -> top-k -> top-p chain), and each row's draw depends only on
    its logits and key. Rows where `forced` [N] is >= 0 take that token instead. `rounds`
    (static): rejection rounds before the exact fallback.

    Returns (token [N] int32, logprob [N] f32). logprob is under the tempered, penalised
    model distribution before any truncation, softmax(penalised logits / T) (T = 1 when
    greedy): the distribution a GRPO update scores rollouts under (`rl.token_logprobs`), and
    one that needs no exact nucleus mass.
    """
    logits = apply_repetition_penalty(logits.astype(jnp.float32), seen, params.repetition_penalty)
    if not params.greedy:
        logits = apply_temperature(logits, params.temperature)
    top, shifted, total = softmax_parts(logits)
    if params.greedy:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        kept = top_k_mask(logits, params.top_k)
        if params.top_p < 1.0 and 1.0 - params.top_p <= REJECTION_MAX_DROP:
            weights = shifted if params.top_k == 0 else jnp.where(kept == NEG_INF, 0.0, shifted)
            token = _nucleus_by_rejection(kept, weights, keys, params.top_p, rounds)
        else:
            token, _ = sample(top_p_mask(kept, params.top_p), keys, params)
    if forced is not None:
        token = jnp.where(forced >= 0, forced, token).astype(jnp.int32)
    chosen = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
    return token, chosen - top[:, 0] - jnp.log(total)


def _nucleus_by_rejection(
    logits: jax.Array, weights: jax.Array, keys: jax.Array, top_p: float, rounds: int
) -> jax.Array:
    """A draw from the top-p nucleus of logits [N, V] -> [N] int32; weights [N, V] are their
    unnormalised softmax, exp(logits - max) (no pass to normalise them).

    Round r draws with uniform(fold_in(key, r)); rows still undrawn after `rounds` rounds
    draw from the exact mask with uniform(fold_in(key, rounds))."""
    n = logits.shape[0]
    order = _sortable_key(logits)  # HF's sort order: ascending logit, then id
    blocks, block_cdf = cdf_blocks(weights)  # once: every round draws from the same weights
    drop = (1.0 - top_p) * block_cdf[:, -1]  # 1 - top_p of the total weight

    def uniforms(r):
        return jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, r), ()))(keys)

    def pending(carry):
        r, _, done = carry
        return (r < rounds) & ~jnp.all(done)

    def round_(carry):
        r, token, done = carry
        x = _inverse_cdf_from_blocks(blocks, block_cdf, uniforms(r))
        kx = jnp.take_along_axis(order, x[:, None], axis=1)
        iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)  # here: fused, not stored
        before = (order < kx) | ((order == kx) & (iota < x[:, None]))
        mass_before = jnp.sum(jnp.where(before, weights, 0.0), axis=-1)
        wx = jnp.take_along_axis(weights, x[:, None], axis=1)[:, 0]
        # HF drops a token iff its cumulative mass in that order is <= 1 - top_p.
        accept = mass_before + wx > drop
        return r + 1, jnp.where(done, token, x), done | accept

    start = (jnp.int32(0), jnp.zeros((n,), jnp.int32), jnp.zeros((n,), bool))
    _, token, done = jax.lax.while_loop(pending, round_, start)

    def exact(_):
        nucleus = jnp.exp(top_p_mask(logits, top_p) - jnp.max(logits, axis=-1, keepdims=True))
        return jnp.where(done, token, _inverse_cdf(nucleus, uniforms(rounds)))

    return jax.lax.cond(jnp.all(done), lambda _: token, exact, None)
