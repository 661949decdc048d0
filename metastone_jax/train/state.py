"""Train state and the optimizer: separate optax transforms for the policy and the SPRM head.

docs/method.md section 3: the head has its own AdamW (betas 0.9/0.999, weight decay 0.01,
`optim.sprm_lr` on the run's schedule) and its own gradient clipping at 1.0, so one
`optax.multi_transform` routes the top-level 'sprm' subtree to the head's chain and everything
else (backbone + LM head) to the policy's. Parameters are pure dicts (`nnx.to_pure_dict`
layout), so the state is a plain pytree that orbax saves and restores without knowing about
Flax.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from metastone_jax.train.run_config import TrainConfig

SCHEDULES = ("constant", "warmup_constant", "cosine")


@struct.dataclass
class TrainState:
    """step [] int32; params / ref_params pure dicts; opt_state optax; rng [2] uint32."""

    step: jax.Array
    params: dict
    opt_state: Any
    rng: jax.Array
    ref_params: dict | None = None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Policy (backbone + LM head) and SPRM head optimizer settings."""

    lr: float = 1e-6
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1000
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    sprm_lr: float = 1e-5
    sprm_weight_decay: float = 0.01
    sprm_clip_norm: float = 1.0
    freeze_backbone: bool = False
    train_sprm: bool = True  # False in SFT: no update at all (AdamW would still decay it)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule: {self.schedule!r}; expected one of {SCHEDULES}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError("optim: warmup_steps must be >= 0 and total_steps >= 1")


def optim_config(config: TrainConfig) -> OptimConfig:
    """The OptimConfig of a train config (configs/train.py): its optim section, the run's steps,
    and whether the SPRM head trains (SPR-only, or GRPO with the SPR loss on)."""
    return OptimConfig(
        **dataclasses.asdict(config.optim),
        total_steps=int(config.train.steps),
        train_sprm=config.kind == "spr" or (config.kind == "grpo" and float(config.spr.coef) > 0),
    )


def learning_rate(peak: float, cfg: OptimConfig) -> optax.Schedule:
    if cfg.schedule == "constant":
        return optax.constant_schedule(peak)
    warmup = optax.linear_schedule(0.0, peak, max(cfg.warmup_steps, 1))
    if cfg.schedule == "warmup_constant":
        rest = optax.constant_schedule(peak)
    else:
        rest = optax.cosine_decay_schedule(peak, max(cfg.total_steps - cfg.warmup_steps, 1))
    return optax.join_schedules([warmup, rest], [cfg.warmup_steps])


def param_labels(params: dict) -> dict:
    """'sprm' for the head's subtree, 'policy' for everything else."""
    return {k: jax.tree.map(lambda _, k=k: "sprm" if k == "sprm" else "policy", v)
            for k, v in params.items()}  # fmt: skip


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    def adamw(peak, wd, clip):
        return optax.chain(
            optax.clip_by_global_norm(clip),
            optax.adamw(learning_rate(peak, cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=wd),
        )

    policy = (
        optax.set_to_zero()
        if cfg.freeze_backbone
        else adamw(cfg.lr, cfg.weight_decay, cfg.clip_norm)
    )
    sprm = (
        adamw(cfg.sprm_lr, cfg.sprm_weight_decay, cfg.sprm_clip_norm)
        if cfg.train_sprm
        else optax.set_to_zero()
    )
    return optax.multi_transform({"policy": policy, "sprm": sprm}, param_labels)


def _key_path(path) -> tuple[str, ...]:
    return tuple(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))


def state_shardings(abstract: TrainState, param_shardings: dict, mesh) -> TrainState:
    """Shardings for a whole (abstract) TrainState: every optimizer leaf that mirrors a
    parameter (Adam's mu/nu: same dict path suffix and shape) takes that parameter's sharding;
    counters, the step and the RNG are replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    flat = {_key_path(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
    shapes = {
        _key_path(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(abstract.params)[0]
    }

    def pick(path, leaf):
        keys = _key_path(path)
        for i in range(len(keys)):
            suffix = keys[i:]
            if suffix in flat and shapes[suffix] == getattr(leaf, "shape", None):
                return flat[suffix]
        return replicated

    opt = jax.tree_util.tree_map_with_path(pick, abstract.opt_state)
    return TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=opt,
        rng=replicated,
        ref_params=None if abstract.ref_params is None else param_shardings,
    )


def init_train_state(
    params: dict, tx: optax.GradientTransformation, *, seed: int, with_ref: bool
) -> TrainState:
    """A fresh state around `params` (pure dict); the frozen reference is a copy of them."""
    ref = jax.tree.map(jnp.copy, params) if with_ref else None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        ref_params=ref,
    )


def pure_params(model) -> dict:
    """The model's parameters as a pure dict (arrays keep their shardings)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
