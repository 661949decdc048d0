"""Pure train steps: `step(state, batch) -> (state, metrics)`, jitted with shardings + donation.

Three kinds share one skeleton (gradient accumulation by `lax.scan` over micro-batches, then one
optax update):

- sft:  masked next-token loss on response tokens;
- grpo: clipped policy loss + low-variance KL to the frozen reference - entropy bonus, plus the
        SPR loss on penultimate features at step positions (backbone gradient scaled by 1e-4);
- spr:  the SPR loss alone (train the head on saved rollouts; with a frozen backbone).

Batch arrays carry a leading micro-batch axis: [A, b, ...] (A accumulation steps of b rows).
Loss at position t means "predict tokens[t] from tokens[:t]", so masks over tokens are applied
to the [.., T-1] log-prob arrays as mask[:, 1:].

SPR class weights are computed over each micro-batch across all devices (the whole batch when
A = 1); the filter needs the current logits, so global weights over several micro-batches would
cost a second forward pass. `spr_scope="rank"` normalises as the released actor instead: per
data-parallel rank within each micro-batch, counts summed over the ranks (+1 per rank), ranks'
losses averaged (`sprm.loss.spr_loss(ranks=R)`). The A micro-batches' gradients are averaged,
as verl does (each micro-batch's loss x its rows / the rank's mini-batch rows, here 1/A).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from metastone_jax import lm_loss, rl
from metastone_jax.sprm import loss as spr_loss
from metastone_jax.sprm.steps import StepTokens, shift_for_scoring, step_mask
from metastone_jax.train.state import TrainState

KINDS = ("sft", "grpo", "spr")
SPR_FORMS = ("filtered", "paper", "bce")
SPR_SCOPES = ("batch", "rank")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static loss settings (hashable: part of the compiled step's identity)."""

    kind: str = "sft"
    temperature: float = 1.0  # log-probs of rollouts use the sampling temperature (as verl)
    # > 0 / < 1: log-probs (ratio, KL, entropy) of the truncated distribution the rollouts were
    # drawn from (rl.support_logits); 0 / 1: of the whole softmax, as verl.
    support_top_k: int = 0
    support_top_p: float = 1.0
    clip_eps: float = 0.2
    kl_coef: float = 0.001
    entropy_coef: float = 0.001
    spr_coef: float = 1.0  # 0 turns the SPR loss off in grpo
    spr_form: str = "filtered"
    # "batch": SPR class counts and one normalisation over each micro-batch (all devices);
    # "rank": the released per-rank normalisation over spr_ranks ranks (0: the mesh's
    # data x fsdp size, read when the step is traced).
    spr_scope: str = "batch"
    spr_ranks: int = 0
    spr_grad_scale: float = 1e-4
    sprm_dropout: bool = True
    step: StepTokens | None = None  # needed by grpo (with spr_coef > 0) and spr
    # > 0: apply the LM head to this many positions at a time (metastone_jax/lm_loss.py), so the
    # [b, T, V] logits are never held; 0: full logits.
    logits_chunk: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"step kind {self.kind!r}; expected one of {KINDS}")
        if self.spr_form not in SPR_FORMS:
            raise ValueError(f"spr_form {self.spr_form!r}; expected one of {SPR_FORMS}")
        if self.spr_scope not in SPR_SCOPES:
            raise ValueError(f"spr.scope={self.spr_scope!r}; expected one of {SPR_SCOPES}")
        if not (isinstance(self.spr_ranks, int) and self.spr_ranks >= 0):
            raise ValueError(
                f"spr.ranks={self.spr_ranks!r}; expected an integer >= 0 (0: the mesh's "
                "data x fsdp size)"
            )
        if not (isinstance(self.logits_chunk, int) and self.logits_chunk >= 0):
            raise ValueError(f"logits_chunk must be an integer >= 0, got {self.logits_chunk!r}")
        if self.uses_spr and self.step is None:
            raise ValueError(f"{self.kind} with the SPR loss needs the step tokens (step=...)")

    @property
    def uses_spr(self) -> bool:
        return self.kind == "spr" or (self.kind == "grpo" and self.spr_coef > 0)


def _model(graphdef, params):
    return nnx.merge(graphdef, params)


def _forward(model, batch, *, with_logits: bool):
    """The model over a batch's rows; packed rows (data/packing.py) carry "segment_ids"."""
    return model(batch["tokens"], valid=batch["valid"], with_logits=with_logits,
                 segment_ids=batch.get("segment_ids"))  # fmt: skip


def _target_mask(batch, key: str):
    """[b, T-1]: positions t whose target tokens[t + 1] counts under batch[key] [b, T]; in
    packed rows a target must be in t's own sequence."""
    mask = batch[key][:, 1:] & batch["valid"][:, 1:]
    if "segment_ids" in batch:
        mask = mask & (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1])
    return mask


def sft_loss(params, batch, key, *, graphdef, cfg: StepConfig):
    """Mean next-token NLL over batch['loss_mask'] positions. tokens/valid/loss_mask [b, T]."""
    del key
    model = _model(graphdef, params)
    tokens = batch["tokens"]
    mask = _target_mask(batch, "loss_mask")
    chunked = cfg.logits_chunk > 0
    out = _forward(model, batch, with_logits=not chunked)
    if chunked:
        # Position t predicts tokens[t + 1]: targets rolled left, the last position weighs 0.
        weights = jnp.pad(mask, ((0, 0), (0, 1))) / jnp.maximum(jnp.sum(mask), 1)
        targets = jnp.roll(tokens, -1, axis=1)
        loss = lm_loss.fused_nll(
            out.hidden, model.head_kernel(), targets, weights, chunk=cfg.logits_chunk
        )
    else:
        loss = -rl.masked_mean(rl.token_logprobs(out.logits[:, :-1], tokens[:, 1:]), mask)
    return loss, {"loss": loss, "tokens": jnp.sum(mask).astype(jnp.float32)}


def _logprobs_entropy(model, out, tokens, *, temperature, chunk, top_k, top_p, with_entropy):
    """(log p(tokens[t + 1]) [b, T-1], entropy [b, T-1] or None) at `temperature` (within the
    top_k / top_p support, if set), from the full logits (chunk 0) or `chunk` positions at a
    time."""
    if chunk > 0:
        logp, entropy = lm_loss.chunked_logprobs(
            out.hidden, model.head_kernel(), jnp.roll(tokens, -1, axis=1), chunk=chunk,
            temperature=temperature, top_k=top_k, top_p=top_p, with_entropy=with_entropy,
        )  # fmt: skip
        return logp[:, :-1], (entropy[:, :-1] if with_entropy else None)
    targets = tokens[:, 1:]
    # One cut (a no-op without top_k / top_p), shared by the log-probs and the entropy.
    z = out.logits[:, :-1].astype(jnp.float32) / temperature
    z = rl.support_logits(z, targets, top_k, top_p)
    return rl.token_logprobs(z, targets), (rl.entropy_from_logits(z) if with_entropy else None)


def _spr_terms(model, features, batch, key, cfg: StepConfig):
    """SPR loss + metrics from penultimate features [b, T, D] at the training step mask; the
    backbone sees the loss's gradient scaled by cfg.spr_grad_scale."""
    tokens, valid = batch["tokens"], batch["valid"]
    if "spr_mask" in batch:  # packed rows: computed per sequence before packing
        feat_mask = batch["spr_mask"]
    else:
        mask = step_mask(
            tokens, cfg.step, mode="train", valid=valid, response_start=batch["response_start"]
        )
        feat_mask = shift_for_scoring(mask)
    feats = spr_loss.scale_gradient(features, cfg.spr_grad_scale)
    drop = key if cfg.sprm_dropout else None
    logits = model.sprm_logits(feats, dropout_rng=drop)
    labels, include = batch["labels"], batch["include"]
    ranks = _spr_ranks(cfg, rows=tokens.shape[0])
    if ranks > 1 and "segment_ids" in batch:
        raise ValueError(
            "spr.scope='rank' normalises per rank's rollouts, which packed rows mix; use "
            "spr.scope='batch' with data.pack_tokens, or data.pack_tokens=0"
        )
    loss, metrics = spr_loss.spr_loss(
        logits, feat_mask, labels, include, form=cfg.spr_form, ranks=ranks
    )
    clean = model.sprm_logits(jax.lax.stop_gradient(features))
    gap = spr_loss.score_gap(clean, feat_mask, labels, include, batch.get("segment_ids"))
    metrics = {**metrics, **gap}
    return loss, metrics


def _spr_ranks(cfg: StepConfig, rows: int) -> int:
    """Data-parallel ranks the SPR loss normalises over (1 for the "batch" scope); checked
    against the micro-batch's rows at trace time."""
    if cfg.spr_scope == "batch":
        return 1
    ranks = cfg.spr_ranks
    if ranks == 0:
        mesh = jax.sharding.get_abstract_mesh()
        shape = {} if mesh.empty else dict(mesh.shape)
        ranks = shape.get("data", 1) * shape.get("fsdp", 1)
    if rows % ranks:
        raise ValueError(
            f"spr.scope='rank': a micro-batch of {rows} rows cannot be split over {ranks} "
            "data-parallel ranks (spr.ranks, 0 = the mesh's data x fsdp); change spr.ranks, "
            "data.grad_accum or the batch"
        )
    return ranks


def grpo_loss(params, batch, key, *, graphdef, cfg: StepConfig):
    """Policy loss (+KL, -entropy) + spr_coef * SPR loss over rollouts [b, T]."""
    model = _model(graphdef, params)
    out = _forward(model, batch, with_logits=cfg.logits_chunk == 0)
    logp, entropy = _logprobs_entropy(
        model, out, batch["tokens"], temperature=cfg.temperature, chunk=cfg.logits_chunk,
        top_k=cfg.support_top_k, top_p=cfg.support_top_p, with_entropy=True,
    )  # fmt: skip
    mask = _target_mask(batch, "response_mask")
    ref = batch.get("ref_logp") if cfg.kl_coef > 0 else None
    advantages = batch["advantages"]
    if advantages.ndim == 2:  # packed rows: per token, the target's sequence's
        advantages = advantages[:, 1:]
    loss, metrics = rl.grpo_loss(
        logp, batch["old_logp"], ref, entropy, advantages, mask,
        clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef, entropy_coef=cfg.entropy_coef,
    )  # fmt: skip
    metrics = {**metrics, "tokens": jnp.sum(mask).astype(jnp.float32)}
    if cfg.uses_spr:
        spr, spr_metrics = _spr_terms(model, out.features, batch, key, cfg)
        loss = loss + cfg.spr_coef * spr
        metrics = {**metrics, **spr_metrics}
    return loss, {**metrics, "loss": loss}


def spr_only_loss(params, batch, key, *, graphdef, cfg: StepConfig):
    """The SPR loss alone (backbone gradient scaled by spr_grad_scale, as in grpo)."""
    model = _model(graphdef, params)
    out = _forward(model, batch, with_logits=False)
    loss, metrics = _spr_terms(model, out.features, batch, key, cfg)
    tokens = jnp.sum(batch["valid"]).astype(jnp.float32)
    return loss, {**metrics, "loss": loss, "tokens": tokens}


LOSSES = {"sft": sft_loss, "grpo": grpo_loss, "spr": spr_only_loss}


def _norms(grads: dict) -> dict[str, jax.Array]:
    policy = {k: v for k, v in grads.items() if k != "sprm"}
    out = {"grad_norm": optax.tree.norm(policy)}
    if "sprm" in grads:
        out["sprm_grad_norm"] = optax.tree.norm(grads["sprm"])
    return out


def train_step(
    state: TrainState, batch: Mapping[str, jax.Array], *, graphdef, cfg: StepConfig, tx
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update from micro-batches batch[name] [A, b, ...]; metrics are means over
    the A micro-batches (grad norms of the averaged gradient, before clipping)."""
    loss_fn = partial(LOSSES[cfg.kind], graphdef=graphdef, cfg=cfg)
    key, next_key = jax.random.split(jax.random.wrap_key_data(state.rng))
    n_micro = jax.tree.leaves(batch)[0].shape[0]

    def micro(acc, xs):
        i, mb = xs
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, mb, jax.random.fold_in(key, i)
        )
        return jax.tree.map(jnp.add, acc, grads), metrics

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, metrics = jax.lax.scan(micro, zeros, (jnp.arange(n_micro), dict(batch)))
    grads = jax.tree.map(lambda g: g / n_micro, grads)
    metrics = jax.tree.map(jnp.mean, metrics)
    metrics["tokens"] = metrics["tokens"] * n_micro  # a sum, not a mean
    metrics.update(_norms(grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        rng=jax.random.key_data(next_key),
    )
    return new, metrics


def _kind_step(kind: str):
    def step(state, batch, *, graphdef, tx, cfg: StepConfig | None = None):
        cfg = cfg or StepConfig(kind=kind)
        if cfg.kind != kind:
            raise ValueError(f"{kind}_step given a StepConfig of kind {cfg.kind!r}")
        return train_step(state, batch, graphdef=graphdef, cfg=cfg, tx=tx)

    step.__name__ = step.__qualname__ = f"{kind}_step"
    step.__doc__ = f"`train_step` with the {kind} loss (see LOSSES['{kind}'])."
    return step


sft_step, grpo_step, spr_step = _kind_step("sft"), _kind_step("grpo"), _kind_step("spr")


def batch_sharding(mesh, ndim: int) -> NamedSharding:
    """[A, b, ...] batch arrays: rows b over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), *([None] * (ndim - 2))))


def _constrain_batch(batch: Mapping[str, jax.Array], mesh) -> dict[str, jax.Array]:
    return {
        k: jax.lax.with_sharding_constraint(v, batch_sharding(mesh, v.ndim))
        for k, v in batch.items()
    }


def compile_step(graphdef, cfg: StepConfig, tx, mesh, shardings: TrainState):
    """`step(state, batch) -> (state, metrics)` jitted on `mesh`; the state is donated."""
    fn = partial(train_step, graphdef=graphdef, cfg=cfg, tx=tx)
    replicated = NamedSharding(mesh, PartitionSpec())

    @partial(jax.jit, donate_argnums=0, out_shardings=(shardings, replicated))
    def jitted(state, batch):
        return fn(state, _constrain_batch(batch, mesh))

    def step(state, batch):
        with jax.set_mesh(mesh):
            return jitted(state, global_batch(batch, mesh))

    step.jitted = jitted  # to lower and compile ahead (memory analysis: planning, benches)
    return step


def global_batch(batch: Mapping[str, np.ndarray], mesh) -> dict:
    """Host arrays -> global arrays. One process: unchanged (jit places them). Several: each
    process holds its own rows [A, b/P, ...], which become one [A, b, ...] array sharded over
    ('data', 'fsdp') without any process seeing the others' rows."""
    if jax.process_count() == 1:
        return dict(batch)
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in batch.items()
    }


def rollout_logprobs_fn(
    graphdef, mesh, *, temperature: float, logits_chunk: int = 0, top_k: int = 0,
    top_p: float = 1.0,
):  # fmt: skip
    """Jitted (params, ref_params | None, batch [A, b, T]) -> (old_logp, ref_logp | None), each
    [A, b, T-1]: the log-probs the policy and the frozen reference gave the sampled tokens,
    computed once before the updates (the PPO ratio's denominator and the KL's reference)."""

    def logp(params, mb):
        model = _model(graphdef, params)
        out = _forward(model, mb, with_logits=logits_chunk == 0)
        return _logprobs_entropy(
            model, out, mb["tokens"], temperature=temperature, chunk=logits_chunk,
            top_k=top_k, top_p=top_p, with_entropy=False,
        )[0]  # fmt: skip

    @jax.jit
    def jitted(params, ref_params, batch):
        batch = _constrain_batch(batch, mesh)
        old = jax.lax.map(partial(logp, params), batch)
        ref = None if ref_params is None else jax.lax.map(partial(logp, ref_params), batch)
        return old, ref

    def run(params, ref_params, batch):
        with jax.set_mesh(mesh):
            return jitted(params, ref_params, global_batch(batch, mesh))

    return run
