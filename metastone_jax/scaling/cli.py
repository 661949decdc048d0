"""`metastone-jax sweep`: a scaling sweep (model size x k x thinking budget).

  metastone-jax sweep --workdir=DIR [--config=cpu | --config=FILE.py] [--print_commands]

Runs (or resumes) the sweep in DIR and writes DIR/table.md, scaling.png and fit.json;
--print_commands prints one launch command per point instead (config.tpu.command); --only runs
one point.
"""

from __future__ import annotations

import os

from metastone_jax.cli_common import Parser, add_config_flags, add_workdir_flag, load_config, parse
from metastone_jax.scaling.sweep import run_sweep

PROG = "metastone-jax sweep"
CONFIG_FILES = ("sweeps/cpu.py", "sweeps/tpu_example.py")
DEFAULT_CONFIG_ARG = "configs/sweeps/cpu.py"  # what the printed commands name when none is given


def parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__)
    add_workdir_flag(p, "the sweep's directory (required; re-run to resume)")
    p.add_argument(
        "--print_commands",
        action="store_true",
        help="print one launch command per point instead of running",
    )
    p.add_argument("--only", default=None, metavar="POINT_ID", help="run this point only")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_config_flags(p, CONFIG_FILES, default="cpu")
    return p


def main(argv: list[str]) -> None:
    args = parse(parser(), argv)
    if not args.workdir:
        raise SystemExit(f"{PROG}: --workdir=DIR is required (re-run it to resume)")
    config = load_config(PROG, args.config, args.overrides, CONFIG_FILES)
    given = any(arg.split("=", 1)[0] == "--config" for arg in argv)
    config_arg = args.config if given else DEFAULT_CONFIG_ARG
    workdir, overrides = args.workdir, args.overrides
    print_commands, progress, only = args.print_commands, not args.no_progress, args.only
    result = run_sweep(
        config, workdir, print_commands=print_commands, progress=progress, only=only,
        config_arg=config_arg, overrides=overrides,
    )  # fmt: skip
    if print_commands:
        return
    fit = result.fit
    law = fit.equation() if fit else "no fit (needs points at 2 or more compute values)"
    print(f"metastone-jax sweep: {len(result.points)} points in {workdir}; {law}")
    print(f"  {os.path.join(workdir, 'table.md')}, scaling.png, fit.json")
