"""`metastone-jax plan`: per-device memory of a training run on a Cloud TPU slice.

  metastone-jax plan --config=grpo-1.5b-v5e-8          (a preset of configs/meshes.py)
  metastone-jax plan --config=grpo-1.5b --mesh=data:1,fsdp:8,tensor:1 --tpu=v5e-8

--config is a train config (a preset of configs/train.py or configs/meshes.py, or a file; default
grpo-1.5b) with --config.a.b=v overrides; --mesh and --tpu default to the config's mesh and
config.train.tpu; --sample_batch / --sample_len size the rollouts (default the config's). The
rollout engine's slots and pool come from --config.rl.slots / rl.pages (0: the planner chooses
them for the chip). Exits 1 when the plan does not fit.
"""

from __future__ import annotations

import json

from metastone_jax.cli_common import Parser, add_config_flags, add_mesh_flag, load_config, parse
from metastone_jax.planning.report import format_table, to_json
from metastone_jax.sharding import parse_mesh
from metastone_jax.train.plan import plan_config

PROG = "metastone-jax plan"
CONFIG_FILES = ("train.py", "meshes.py")


def parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__)
    p.add_argument(
        "--preset",
        default=None,
        metavar="NAME",
        help="a mesh preset of configs/meshes.py (the same as --config=NAME)",
    )
    add_mesh_flag(p, "the mesh to plan for (default: the config's)")
    p.add_argument(
        "--tpu", default=None, metavar="TYPE", help="e.g. v5e-8 (default: config.train.tpu)"
    )
    p.add_argument(
        "--sample_batch",
        type=int,
        default=None,
        metavar="N",
        help="rollouts per step (default: the config's)",
    )
    p.add_argument(
        "--sample_len",
        type=int,
        default=None,
        metavar="S",
        help="the longest sequence, prompt + new tokens (default: the config's)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_config_flags(p, CONFIG_FILES, default="grpo-1.5b")
    return p


def main(argv: list[str]) -> None:
    p = parser()
    args = parse(p, argv)
    flag, names = "--config", CONFIG_FILES
    if args.preset is not None:
        if any(arg.split("=", 1)[0] == "--config" for arg in argv):
            p.error("--preset and --config=... are alternatives: give one")
        args.config, flag, names = args.preset, "--preset", ("meshes.py",)
    mesh = parse_mesh(args.mesh) if args.mesh is not None else None
    config = load_config(PROG, args.config, args.overrides, names, flag=flag)
    plan = plan_config(config, tpu=args.tpu, mesh=mesh, sample_rows=args.sample_batch,
                       sample_len=args.sample_len)  # fmt: skip
    print(json.dumps(to_json(plan), indent=2) if args.json else format_table(plan))
    if not plan.fits:
        raise SystemExit(1)
