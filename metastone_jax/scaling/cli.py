"""`metastone-jax sweep --config=configs/sweeps/cpu.py --workdir=DIR [--print_commands]
[--only=POINT_ID] [--no_progress] [--config.KEY=VALUE ...]`.

Runs (or resumes) the sweep in DIR and writes DIR/table.md, scaling.png and fit.json;
--print_commands prints one launch command per point instead (config.tpu.command); --only runs
one point.
"""

from __future__ import annotations

import os

from metastone_jax.main import CONFIGS

DEFAULT_CONFIG = os.path.join(CONFIGS, "sweeps", "cpu.py")
USAGE = (
    "usage: metastone-jax sweep --config=configs/sweeps/cpu.py --workdir=DIR [--print_commands] "
    "[--only=POINT_ID] [--no_progress] [--config.KEY=VALUE]"
)


def main(argv: list[str]) -> None:
    workdir = only = None
    print_commands, progress = False, True
    config_arg, overrides = None, []
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__.strip() + "\n" + USAGE)
            return
        if arg.startswith("--workdir="):
            workdir = arg.split("=", 1)[1]
        elif arg.startswith("--only="):
            only = arg.split("=", 1)[1]
        elif arg == "--print_commands":
            print_commands = True
        elif arg == "--no_progress":
            progress = False
        elif arg.startswith("--config="):
            config_arg = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            overrides.append(arg)
        else:
            raise SystemExit(f"metastone-jax sweep: unknown argument {arg!r}\n{USAGE}")
    if not workdir:
        raise SystemExit(
            "metastone-jax sweep: --workdir=DIR is required (re-run it to resume)\n" + USAGE
        )
    if config_arg and not os.path.isfile(config_arg.split(":", 1)[0]):
        raise SystemExit(f"metastone-jax sweep: --config={config_arg}: no such file\n{USAGE}")
    from metastone_jax.main import _parse

    args = ["metastone-jax sweep", *([f"--config={config_arg}"] if config_arg else []), *overrides]
    try:
        config = _parse(args, default_preset="", config_file=DEFAULT_CONFIG)
    except SystemExit as e:  # one line from _parse, with the sweep's usage instead of main's
        raise SystemExit(str(e.code).splitlines()[0].replace("metastone-jax:", "metastone-jax "
                         "sweep:") + "\n" + USAGE) from None  # fmt: skip
    from metastone_jax.scaling.sweep import run_sweep

    result = run_sweep(
        config, workdir, print_commands=print_commands, progress=progress, only=only,
        config_arg=config_arg or "configs/sweeps/cpu.py", overrides=overrides,
    )  # fmt: skip
    if print_commands:
        return
    fit = result.fit
    law = fit.equation() if fit else "no fit (needs points at 2 or more compute values)"
    print(f"metastone-jax sweep: {len(result.points)} points in {workdir}; {law}")
    print(f"  {os.path.join(workdir, 'table.md')}, scaling.png, fit.json")
