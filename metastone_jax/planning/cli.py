"""`metastone-jax plan`: per-device memory of a training run on a Cloud TPU slice.

  metastone-jax plan --config=configs/train.py:grpo-1.5b --mesh=data:1,fsdp:8,tensor:1 --tpu=v5e-8
  metastone-jax plan --preset=grpo-1.5b-v5e-8          (a mesh preset of configs/meshes.py)

Options: --config=FILE:PRESET (a train config; default configs/train.py:grpo-1.5b) with
--config.a.b=v overrides, or --preset=NAME; --mesh=data:N,fsdp:N,tensor:N (default the config's
mesh); --tpu=TYPE (default config.train.tpu); --sample_batch=N / --sample_len=S (rollouts per
step and the longest sequence, prompt + new tokens; default the config's); --json. The rollout
engine's slots and pool come from --config.rl.slots / rl.pages (0: the planner chooses them for
the chip). Exits 1 when the plan does not fit.
"""

from __future__ import annotations

import json
import os

from metastone_jax.sharding import MESH_AXES

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")
TRAIN_CONFIG = os.path.join(CONFIGS, "train.py")
MESH_PRESETS = os.path.join(CONFIGS, "meshes.py")
DEFAULT_PRESET = "grpo-1.5b-v5e-8"  # any valid one: --preset=NAME replaces it
USAGE = (
    "usage: metastone-jax plan [--preset=NAME | --config=FILE:PRESET [--config.a.b=V]] "
    "[--mesh=data:N,fsdp:N,tensor:N] [--tpu=TYPE] [--sample_batch=N] [--sample_len=S] [--json]"
)


def parse_mesh(text: str) -> dict[str, int]:
    """'data:1,fsdp:8,tensor:1' -> {'data': 1, 'fsdp': 8, 'tensor': 1} (missing axes are 1)."""
    mesh = {}
    for part in text.split(","):
        axis, sep, size = part.strip().partition(":")
        if not sep or axis not in MESH_AXES:
            raise ValueError(
                f"--mesh={text}: expected AXIS:SIZE pairs with AXIS in {MESH_AXES}, "
                "e.g. data:1,fsdp:8,tensor:1"
            )
        try:
            mesh[axis] = int(size)
        except ValueError:
            raise ValueError(f"--mesh={text}: size of {axis!r} is not an integer") from None
    return {a: mesh.get(a, 1) for a in MESH_AXES}


def _int_flag(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--{name}={value}: expected an integer") from None


def main(argv: list[str]) -> None:
    from metastone_jax.main import _parse
    from metastone_jax.planning.from_config import plan_config
    from metastone_jax.planning.report import format_table, to_json

    opts: dict[str, str] = {}
    rest: list[str] = []
    as_json = False
    for arg in argv:
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if arg in ("-h", "--help"):
            print(__doc__.strip() + "\n\n" + USAGE)
            return
        if arg == "--json":
            as_json = True
        elif name in ("preset", "mesh", "tpu", "sample_batch", "sample_len") and "=" in arg:
            opts[name] = arg.split("=", 1)[1]
        elif arg.startswith("--config"):
            rest.append(arg)
        else:
            raise ValueError(f"unknown option {arg!r}\n{USAGE}")
    if "preset" in opts:
        if any(a.startswith("--config=") for a in rest):
            raise ValueError("--preset and --config=... are alternatives: give one")
        preset = f"--config={MESH_PRESETS}:{opts['preset']}"
        config = _parse(["plan", preset, *rest], DEFAULT_PRESET, config_file=MESH_PRESETS)
    else:
        config = _parse(["plan", *rest], "grpo-1.5b", config_file=TRAIN_CONFIG)
    plan = plan_config(
        config,
        tpu=opts.get("tpu"),
        mesh=parse_mesh(opts["mesh"]) if "mesh" in opts else None,
        sample_rows=_int_flag("sample_batch", opts["sample_batch"])
        if "sample_batch" in opts else None,
        sample_len=_int_flag("sample_len", opts["sample_len"]) if "sample_len" in opts else None,
    )  # fmt: skip
    print(json.dumps(to_json(plan), indent=2) if as_json else format_table(plan))
    if not plan.fits:
        raise SystemExit(1)
