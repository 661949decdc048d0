"""Shared by launch/tpu.py and launch/xpk.py: accelerator types and the command runner.

Accelerator types: friendly names -> gcloud names, chips, default runtime versions.

Runtime (software) versions for JAX, from https://cloud.google.com/tpu/docs/runtimes
("PyTorch and JAX" table): v6e (Trillium) v2-alpha-tpuv6e, v5p v2-alpha-tpuv5,
v5e v2-alpha-tpuv5-lite, v4 and older tpu-ubuntu2204-base.

Sizes: the number after the dash counts TensorCores for v4 and v5p (two per chip) and chips for
v5e and v6e (one TensorCore per chip); see https://cloud.google.com/tpu/docs/v5e,
https://cloud.google.com/tpu/docs/v5p and https://cloud.google.com/tpu/docs/v6e. v5e is called
`v5litepod` by gcloud and xpk (`v5e-8` here is `v5litepod-8` there).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from typing import NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Accelerator(NamedTuple):
    name: str  # as given, normalised: v5e-8
    gcloud: str  # gcloud / xpk accelerator type: v5litepod-8
    generation: str  # v4 | v5e | v5p | v6e
    chips: int
    runtime_version: str


RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# Slice sizes gcloud offers for the 2D-torus generations (chips).
V5E_V6E_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)
# Largest 3D-torus slices (TensorCores): v4 pod 4,096 chips; v5p 6,144 chips in one slice.
MAX_CORES = {"v4": 8192, "v5p": 12288}

VALID = (
    "v4-N (N TensorCores, a multiple of 8 up to 8192), "
    "v5e-N or v5litepod-N (N chips in 1,4,8,16,32,64,128,256), "
    "v5p-N (N TensorCores, a multiple of 8 up to 12288), "
    "v6e-N (N chips in 1,4,8,16,32,64,128,256)"
)


def parse(accelerator_type: str) -> Accelerator:
    """`v5e-8` / `v5litepod-8` / `v5p-64` / `v6e-8` / `v4-8` -> Accelerator; ValueError (one line
    naming the valid forms) otherwise."""
    text = accelerator_type.strip().lower()
    gen, _, size = text.rpartition("-")
    if gen == "v5litepod":
        gen = "v5e"
    n = int(size) if size.isdigit() else 0
    if gen in ("v5e", "v6e") and n in V5E_V6E_SIZES:
        chips = n
    elif gen in MAX_CORES and n % 8 == 0 and 8 <= n <= MAX_CORES[gen]:
        chips = n // 2
    else:
        raise ValueError(f"unknown accelerator type {accelerator_type!r}; valid: {VALID}")
    gcloud = f"v5litepod-{n}" if gen == "v5e" else f"{gen}-{n}"
    return Accelerator(f"{gen}-{n}", gcloud, gen, chips, RUNTIME_VERSIONS[gen])


def zone_project(zone: str | None, project: str | None) -> list[str]:
    """gcloud/xpk flags for an explicit zone and project (omitted: the gcloud config's)."""
    return ([f"--zone={zone}"] if zone else []) + ([f"--project={project}"] if project else [])


def execute(commands: Sequence[Sequence[str]], *, dry_run: bool, prog: str) -> None:
    """Prints each command (shlex-quoted, one per line); unless `dry_run`, runs it right after
    printing it, stopping at the first failure with a one-line error. `git` commands run in the
    repository root, the others in the current directory."""
    for cmd in commands:
        print(shlex.join(cmd), flush=True)
        if dry_run:
            continue
        try:
            subprocess.run(list(cmd), check=True, cwd=REPO if cmd[0] == "git" else None)
        except FileNotFoundError:
            sys.exit(f"{prog}: {cmd[0]} not found: install it (see launch/README.md)")
        except subprocess.CalledProcessError as e:
            sys.exit(f"{prog}: exit status {e.returncode} from: {shlex.join(cmd)}")


def skeleton(prog: str, doc: str, target: str, target_help: str, zone_example: str):
    """(parser, subparsers, common parent) shared by the launch CLIs: `--TARGET` (the resource
    every action names), --zone, --project and --dry_run."""
    p = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(f"--{target}", required=True, help=target_help)
    common.add_argument("--zone", help=f"e.g. {zone_example} (default: gcloud config compute/zone)")
    common.add_argument("--project", help="default: gcloud config core/project")
    common.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    return p, sub, common


def parse_with_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None):
    """Parsed flags, with everything after `--` (the command to run remotely, untouched) as
    `.command` (a list, empty without `--`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1 :]
    args = parser.parse_args(argv)
    args.command = command
    return args
