"""Exact per-device bytes of a train state, with no devices and no allocation.

The abstract model's parameters, the run's own optimizer (`train.state.make_optimizer`) and
`init_train_state` are traced with `jax.eval_shape`; the shardings are the ones training uses
(`sharding.placement` + `train.state.state_shardings`) on an `AbstractMesh` of the planned shape,
so a 64-chip plan runs on a laptop. Each leaf counts its shard shape times its dtype's size.
"""

from __future__ import annotations

import functools
import math
from functools import partial

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh

from metastone_jax.config import ModelConfig
from metastone_jax.model import abstract_model
from metastone_jax.planning.memory import StateBytes
from metastone_jax.sharding import MESH_AXES, placement
from metastone_jax.train.state import init_train_state, make_optimizer, pure_params, state_shardings


def _shard_bytes(tree, shardings) -> int:
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        total += math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    return total


def state_bytes(cfg: ModelConfig, mesh_shape: dict, optim, *, with_ref: bool) -> StateBytes:
    """optim: a train.state.OptimConfig; with_ref: GRPO's frozen reference copy is kept."""
    mesh = tuple(int(mesh_shape[a]) for a in MESH_AXES)
    return _state_bytes(cfg, mesh, optim, with_ref)


@functools.lru_cache(maxsize=16)
def _state_bytes(cfg: ModelConfig, mesh_sizes: tuple[int, ...], optim, with_ref: bool):
    mesh = AbstractMesh(mesh_sizes, MESH_AXES)
    model = abstract_model(cfg)
    params = pure_params(model)
    param_shardings = placement(nnx.state(model), mesh)
    init = partial(init_train_state, tx=make_optimizer(optim), seed=0, with_ref=with_ref)
    abstract = jax.eval_shape(init, params)
    shardings = state_shardings(abstract, param_shardings, mesh)
    sprm = 0
    if "sprm" in abstract.params:
        sprm = _shard_bytes(abstract.params["sprm"], shardings.params["sprm"])
    reference = 0
    if abstract.ref_params is not None:
        reference = _shard_bytes(abstract.ref_params, shardings.ref_params)
    return StateBytes(
        params=_shard_bytes(abstract.params, shardings.params),
        sprm_params=sprm,
        reference=reference,
        optimizer=_shard_bytes(abstract.opt_state, shardings.opt_state),
        param_dtype=cfg.param_dtype,
    )
