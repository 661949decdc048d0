"""`metastone-jax train`: runs a training run, or resumes it (re-run the same command).

  metastone-jax train --config=tiny-sft --workdir=runs/tiny
  metastone-jax train --config=grpo-1.5b-v5e-8 --workdir=gs://BUCKET/grpo \\
      --config.data.source=FILE --config.init_ckpt=CKPT

The presets are configs/train.py's (the recipes) and configs/meshes.py's (the 1.5B recipe laid
out on Cloud TPU slices). The config is checked (and, with config.train.tpu, its memory plan)
before anything is allocated.
"""

from __future__ import annotations

import sys

from metastone_jax.cli_common import (
    Parser,
    add_config_flags,
    add_mesh_flag,
    add_workdir_flag,
    apply_mesh,
    load_config,
    parse,
)
from metastone_jax.train.loop import Preempted, train
from metastone_jax.train.validate import check_workdir, validate_train_config

PROG = "metastone-jax train"
CONFIG_FILES = ("train.py", "meshes.py")


def parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__)
    add_workdir_flag(p, "checkpoints, metrics and logs (required; a gs:// path works)")
    add_config_flags(p, CONFIG_FILES, default="tiny-sft")
    add_mesh_flag(p, "the training mesh (sets config.mesh)")
    return p


def main(argv: list[str]) -> None:
    args = parse(parser(), argv)
    if not args.workdir:
        raise SystemExit(f"{PROG}: --workdir=DIR is required (re-run it to resume)")
    config = load_config(PROG, args.config, args.overrides, CONFIG_FILES)
    apply_mesh(PROG, config, args.mesh, args.overrides)
    workdir = args.workdir
    try:
        # typed once, as built from the flags (train() checks a TrainConfig again)
        config = validate_train_config(config)
        check_workdir(workdir)
        metrics = train(config, workdir)
    except Preempted as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return
    except (ValueError, FloatingPointError) as e:
        raise SystemExit(f"{PROG}: {e}") from None
    shown = {k: round(v, 4) for k, v in metrics.items() if k in ("loss", "reward_mean")}
    print(f"{PROG}: done, {workdir} (last step: {shown})")
