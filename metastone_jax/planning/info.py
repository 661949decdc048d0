"""`metastone-jax info`: parameter counts and per-device parameter memory of a model config.

  metastone-jax info --config=metastone-s1-1.5b --mesh=data:1,fsdp:8,tensor:1

Nothing is allocated (abstract shapes). The mesh may be a pod's that is not this machine: with no
-1 axis its product is taken as the device count.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from metastone_jax.cli_common import (
    Parser,
    add_config_flags,
    add_mesh_flag,
    apply_mesh,
    load_config,
    parse,
)
from metastone_jax.config import model_config_from_dict
from metastone_jax.model import abstract_model, param_counts
from metastone_jax.sharding import MESH_AXES, bytes_per_device, resolve_mesh_shape

PROG = "metastone-jax info"
CONFIG_FILES = ("model.py",)


def parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__)
    add_config_flags(p, CONFIG_FILES, default="demo")
    add_mesh_flag(p, "the mesh whose per-device memory is shown (sets config.mesh)")
    return p


def main(argv: list[str]) -> None:
    args = parse(parser(), argv)
    config = load_config(PROG, args.config, args.overrides, CONFIG_FILES)
    apply_mesh(PROG, config, args.mesh, args.overrides)
    report(config)


def report(config) -> None:
    cfg = model_config_from_dict(config.model)
    mesh = dict(config.mesh)
    n_devices = jax.device_count()
    if -1 not in mesh.values():
        n_devices = math.prod(mesh.get(axis, 1) for axis in MESH_AXES)
    mesh_shape = resolve_mesh_shape(mesh, n_devices)
    model = abstract_model(cfg)
    counts = param_counts(model)
    per_device = bytes_per_device(nnx.state(model), mesh_shape)
    print(
        f"preset: {config.preset}  arch: {cfg.arch}  layers: {cfg.n_layers}  d_model: {cfg.d_model}"
    )
    print(
        f"  heads: {cfg.n_heads} (kv {cfg.n_kv_heads}, head_dim {cfg.head_dim})  "
        f"d_ff: {cfg.d_ff}  vocab: {cfg.vocab_size}"
    )
    print("parameters:")
    print(f"  total      {counts['total']:>16,}")
    print(f"  backbone   {counts['backbone']:>16,}  (embedding, blocks, final norm)")
    tied = "  (tied to the embedding)" if cfg.tie_embeddings else ""
    print(f"  lm_head    {counts['lm_head']:>16,}{tied}")
    print(f"  sprm_head  {counts['sprm_head']:>16,}  (2d^2+4d+1 = {cfg.sprm_param_count:,})")
    mesh = ",".join(f"{a}:{n}" for a, n in mesh_shape.items())
    print(
        f"per-device parameter memory on mesh {mesh} ({cfg.param_dtype}; SPRM head fp32): "
        f"{per_device / 2**20:,.1f} MiB"
    )
