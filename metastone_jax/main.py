"""Command line: `metastone-jax <command> --config=configs/model.py:<preset> [--config.a.b=v]`.

Commands: info (parameter counts and per-device memory, on this config file); train (configs/
train.py); convert (HF <-> JAX checkpoints), sample (test-time scaling), evaluate (a benchmark
file), sweep (scaling sweeps), plan (a training run's memory on a TPU slice: `metastone-jax plan
--preset=grpo-1.5b-v5e-8`) and demo (the end-to-end demo, configs/demo.py), which take their
own options (`metastone-jax demo -h`).
"""

from __future__ import annotations

import math
import os
import sys

COMMANDS = ("info", "demo", "convert", "sample", "train", "sweep", "evaluate", "plan")
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
REPO_CONFIG = os.path.join(CONFIGS, "model.py")
TRAIN_CONFIG = os.path.join(CONFIGS, "train.py")


def _usage() -> str:
    return (
        "usage: metastone-jax {" + "|".join(COMMANDS) + "} [--config=configs/model.py:PRESET] "
        "[--config.model.FIELD=VALUE] [--config.mesh.AXIS=N]"
    )


def _parse(argv: list[str], default_preset: str, config_file: str = REPO_CONFIG):
    """Parses absl flags (ml_collections config file with preset and overrides).

    Errors (unknown preset, unknown override key, bad value) exit with one line naming the
    flag and, for keys, the valid choices.
    """
    from absl import flags
    from ml_collections import config_flags

    def parse(args):
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file(
            "config",
            f"{config_file}:{default_preset}",
            "config file:preset",
            flag_values=fv,
            sys_argv=args,
        )
        try:
            fv(args)
        except flags.Error as e:
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            # config_flags embeds the config file's traceback; its last line is the reason.
            reason = lines[-1] if "Traceback" in str(e) else str(e)
            head = lines[0] if reason != lines[0] else ""
            raise SystemExit(
                f"metastone-jax: {head} {reason}".replace("  ", " ") + f"\n{_usage()}"
            ) from None
        return fv.config

    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    base = parse([a for a in argv if a not in overrides])
    for arg in overrides:
        key = arg[len("--config.") :].split("=", 1)[0]
        node, path = base, []
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                valid = sorted(node.keys()) if hasattr(node, "keys") else []
                where = ".".join(["config", *path])
                raise SystemExit(
                    f"metastone-jax: {arg}: {where} has no key {part!r}; valid keys: {valid}"
                )
            node, path = node[part], [*path, part]
    return parse(argv)


def _model_and_mesh(config, *, planning: bool = False):
    """The ModelConfig and resolved mesh shape. Planning (info) accepts a mesh for a pod that is
    not this machine: with no -1 axis, its product is taken as the device count."""
    import jax

    from metastone_jax.config import model_config_from_dict
    from metastone_jax.sharding import resolve_mesh_shape

    cfg = model_config_from_dict(config.model)
    mesh = dict(config.mesh)
    n_devices = jax.device_count()
    if planning and -1 not in mesh.values():
        n_devices = math.prod(mesh.get(axis, 1) for axis in ("data", "fsdp", "tensor"))
    mesh_shape = resolve_mesh_shape(mesh, n_devices)
    return cfg, mesh_shape


def param_counts(model) -> dict[str, int]:
    """Parameter counts by part of an (abstract) model: nothing is allocated."""
    import jax
    from flax import nnx

    def count(node):
        if node is None:
            return 0
        leaves = jax.tree.leaves(nnx.state(node, nnx.Param))
        return sum(math.prod(x.shape) for x in leaves)

    lm_head = count(model.lm_head)
    sprm = count(model.sprm)
    total = count(model)
    return {
        "total": total,
        "backbone": total - lm_head - sprm,
        "lm_head": lm_head,
        "sprm_head": sprm,
    }


def cmd_info(config) -> None:
    from flax import nnx

    from metastone_jax.model import abstract_model
    from metastone_jax.sharding import bytes_per_device

    cfg, mesh_shape = _model_and_mesh(config, planning=True)
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
    mesh = " x ".join(f"{a}={n}" for a, n in mesh_shape.items())
    print(
        f"per-device parameter memory on mesh {mesh} ({cfg.param_dtype}; SPRM head fp32): "
        f"{per_device / 2**20:,.1f} MiB"
    )


def cmd_train(argv: list[str]) -> None:
    """`train --config=configs/train.py:PRESET --workdir=DIR`: runs or resumes a training run."""
    rest, workdir = [], None
    for arg in argv[2:]:
        if arg.startswith("--workdir="):
            workdir = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if not workdir:
        raise SystemExit("metastone-jax train: --workdir=DIR is required (re-run it to resume)")
    config = _parse([argv[0], *rest], default_preset="tiny-sft", config_file=TRAIN_CONFIG)
    from metastone_jax.train.loop import Preempted, train
    from metastone_jax.train.setup import files_dir
    from metastone_jax.train.validate import check_workdir, validate_train_config

    try:
        validate_train_config(config)  # as built from the flags (train() checks it again)
        check_workdir(workdir, files_dir(workdir, config.train.local_dir))
        metrics = train(config, workdir)
    except Preempted as e:
        print(f"metastone-jax train: {e}", file=sys.stderr)
        return
    except (ValueError, FloatingPointError) as e:
        raise SystemExit(f"metastone-jax train: {e}") from None
    shown = {k: round(v, 4) for k, v in metrics.items() if k in ("loss", "reward_mean")}
    print(f"metastone-jax train: done, {workdir} (last step: {shown})")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(_usage())
        raise SystemExit(0 if len(argv) >= 2 else 2)
    command = argv[1]
    if command not in COMMANDS:
        raise SystemExit(
            f"metastone-jax: unknown command {command!r}; expected one of {COMMANDS}\n{_usage()}"
        )
    if command in ("convert", "sample", "sweep", "evaluate", "demo", "plan"):  # own options
        import importlib

        package = {"sweep": "scaling", "plan": "planning"}.get(command, command)
        cli = importlib.import_module(f"metastone_jax.{package}.cli")
        try:
            return cli.main(argv[2:])
        except ValueError as e:
            raise SystemExit(f"metastone-jax {command}: {e}") from None
    if command == "train":
        return cmd_train(argv)
    config = _parse([argv[0], *argv[2:]], default_preset="demo")
    try:
        cmd_info(config)
    except ValueError as e:
        raise SystemExit(f"metastone-jax {command}: {e}") from None


if __name__ == "__main__":
    main()
