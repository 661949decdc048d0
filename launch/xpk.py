"""metastone-jax on GKE with xpk (https://github.com/AI-Hypercomputer/xpk): cluster, workload.

    python launch/xpk.py ACTION --cluster=NAME --zone=ZONE [--project=P] [--dry_run] [...]

Actions (each prints every command, one per line, before running it; --dry_run only prints):
  cluster          --accelerator_type=v5p-64 [--num_slices=N] [--spot | --reservation=R]
                   `xpk cluster create` (on-demand capacity unless --spot or --reservation)
  workload         --accelerator_type=v5p-64 [--num_slices=N] [--workload=metastone]
                   [--docker_image=IMAGE] [--max_restarts=R] -- COMMAND [ARGS...]
                   `xpk workload create`: without --docker_image, a `git archive` of HEAD is
                   layered into python:3.11 (xpk's --base-docker-image/--script-dir flow) and
                   `pip install -e '.[tpu]'` runs before COMMAND; with it, COMMAND runs in IMAGE
  list             `xpk workload list`
  delete-workload  [--workload=metastone]  `xpk workload delete`
  delete-cluster   `xpk cluster delete` (billing for the node pools stops)

Multi-slice (--num_slices > 1): xpk gives every pod MEGASCALE_COORDINATOR_ADDRESS,
MEGASCALE_NUM_SLICES and MEGASCALE_SLICE_ID; COMMAND then starts with an export of
JAX_COORDINATOR_ADDRESS (the MEGASCALE coordinator, JAX's TPU port 8482) so that
`maybe_initialize_distributed` initialises, and the mesh puts its data axis across slices.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys

if not __package__:  # run as a script: python launch/xpk.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch.common import (  # noqa: E402
    execute,
    parse,
    parse_with_command,
    skeleton,
    zone_project,
)

PROG = "launch/xpk.py"
BASE_IMAGE = "python:3.11"  # metastone-jax needs Python 3.11+
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MULTISLICE_ENV = (
    '[ -z "$MEGASCALE_COORDINATOR_ADDRESS" ] || '
    'export JAX_COORDINATOR_ADDRESS="${MEGASCALE_COORDINATOR_ADDRESS%%:*}:8482"; '
)


def cluster(a) -> list[list[str]]:
    acc = parse(a.accelerator_type)
    capacity = ["--spot"] if a.spot else [f"--reservation={a.reservation}"] if a.reservation else []
    return [
        [
            "xpk",
            "cluster",
            "create",
            f"--cluster={a.cluster}",
            f"--tpu-type={acc.gcloud}",
            f"--num-slices={a.num_slices}",
            *zone_project(a.zone, a.project),
            *(capacity or ["--on-demand"]),
        ]
    ]


def workload(a) -> list[list[str]]:
    acc = parse(a.accelerator_type)
    if not a.command:
        sys.exit(f"{PROG} workload: give the command after --, e.g. -- metastone-jax train ...")
    command = shlex.join(a.command)
    if a.num_slices > 1:
        command = MULTISLICE_ENV + command
    create = [
        "xpk",
        "workload",
        "create",
        f"--cluster={a.cluster}",
        f"--workload={a.workload}",
        f"--tpu-type={acc.gcloud}",
        f"--num-slices={a.num_slices}",
        *zone_project(a.zone, a.project),
        *([f"--max-restarts={a.max_restarts}"] if a.max_restarts else []),
    ]
    if a.docker_image:
        return [[*create, f"--docker-image={a.docker_image}", "--command", command]]
    # xpk copies --script-dir into the image (WORKDIR /app): a clean export of HEAD, not the
    # working tree with its .venv.
    src = f"/tmp/metastone-jax-xpk-{a.workload}"
    return [
        ["git", "archive", "--format=tar.gz", f"--output={src}.tar.gz", "HEAD"],
        ["mkdir", "-p", src],
        ["tar", "-xzf", f"{src}.tar.gz", "-C", src],
        [
            *create,
            f"--base-docker-image={BASE_IMAGE}",
            f"--script-dir={src}",
            "--command",
            f'pip install -q -e ".[tpu]" && {command}',
        ],
    ]


def list_workloads(a) -> list[list[str]]:
    return [["xpk", "workload", "list", f"--cluster={a.cluster}", *zone_project(a.zone, a.project)]]


def delete_workload(a) -> list[list[str]]:
    where = zone_project(a.zone, a.project)
    return [
        ["xpk", "workload", "delete", f"--cluster={a.cluster}", f"--workload={a.workload}", *where]
    ]


def delete_cluster(a) -> list[list[str]]:
    return [
        ["xpk", "cluster", "delete", f"--cluster={a.cluster}", *zone_project(a.zone, a.project)]
    ]


ACTIONS = {
    "cluster": cluster,
    "workload": workload,
    "list": list_workloads,
    "delete-workload": delete_workload,
    "delete-cluster": delete_cluster,
}


def build_parser() -> argparse.ArgumentParser:
    p, sub, common = skeleton(PROG, __doc__, "cluster", "GKE cluster name", "us-east5-a")
    slices = argparse.ArgumentParser(add_help=False)
    slices.add_argument("--accelerator_type", required=True, help="v5e-8, v5p-64, v6e-256...")
    slices.add_argument("--num_slices", type=int, default=1, help="slices (DCN data parallel)")
    name = argparse.ArgumentParser(add_help=False)
    name.add_argument("--workload", default="metastone", help="workload (JobSet) name")

    s = sub.add_parser("cluster", parents=[common, slices], help="create the GKE cluster")
    capacity = s.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="Spot capacity (preemptible)")
    capacity.add_argument("--reservation", help="a reservation id")
    s = sub.add_parser("workload", parents=[common, slices, name], help="submit a job")
    s.add_argument("--docker_image", help="run in this image instead of python:3.11 + HEAD")
    s.add_argument("--max_restarts", type=int, default=0, help="restarts after a failure")
    sub.add_parser("list", parents=[common], help="list the workloads")
    sub.add_parser("delete-workload", parents=[common, name], help="delete a workload")
    sub.add_parser("delete-cluster", parents=[common], help="delete the cluster")
    return p


def main(argv: list[str] | None = None) -> None:
    a = parse_with_command(build_parser(), argv)
    for flag in ("cluster", "workload"):
        value = getattr(a, flag, None)
        if value is not None and not NAME_RE.match(value):
            sys.exit(f"{PROG}: --{flag}={value!r}: use lowercase letters, digits and hyphens, "
                     "starting with a letter")  # fmt: skip
    if getattr(a, "num_slices", 1) < 1:
        sys.exit(f"{PROG}: --num_slices must be at least 1")
    try:
        commands = ACTIONS[a.action](a)
    except ValueError as e:  # a bad accelerator type: one line naming the valid ones
        sys.exit(f"{PROG}: {e}")
    execute(commands, dry_run=a.dry_run, prog=PROG)


if __name__ == "__main__":
    main()
