"""Cloud TPU VMs for metastone-jax: create, install, run on all workers, logs, delete.

    python launch/tpu.py ACTION --name=NAME --zone=ZONE [--project=P] [--dry_run] [...]

Actions (each prints every command, one per line, before running it; --dry_run only prints):
  create   --accelerator_type=v5e-8 [--runtime_version=V] [--spot | --preemptible] [--queued]
           [-- EXTRA GCLOUD FLAGS]  a TPU VM (`tpu-vm create`), or with --queued a queued
           resource whose node is NAME; flags after -- go to gcloud as they are
  install  [--git_url=URL [--git_ref=REF]]  the repository on every worker (a `git archive` of
           HEAD copied over, or a clone of URL), then launch/remote.sh install: Python 3.11 venv
           in ~/metastone-jax/.venv with `pip install -e '.[tpu]'`, `metastone-jax` on the PATH
  run      [--job=metastone] -- COMMAND [ARGS...]  the same command on every worker, detached in
           tmux (a dropped SSH connection does not stop it); log ~/metastone-logs/JOB/worker-K.log
  ssh      -- SHELL COMMAND LINE  on every worker, in the foreground (words joined by spaces,
           parsed by the worker's shell, as with ssh: quote `&&` and pipes)
  tail     [--job=metastone] [--lines=20]  whether the job runs, and its last log lines per worker
  stop     [--job=metastone]  SIGTERM to the job on every worker (training saves, then exits)
  logs     [--job=metastone] [--dest=logs]  copies every worker's log to DEST/NAME/JOB/
  mount    --bucket=B [--mount_dir=/mnt/B]  gcsfuse-mounts gs://B on every worker (a file
           system all workers share, e.g. the sweep's --workdir)
  status   [--queued]  describes the TPU VM (or queued resource)
  delete   [--queued]  deletes it (billing stops)
  cost     --accelerator_type=v5e-8 --hours=H [--price_per_chip_hour=P] [--num_slices=S]
           chip-hours (and dollars at the price you give; see launch/README.md)

The `run` COMMAND is passed on word for word (no shell on the worker: use `bash -c '...'` for
pipes or &&) and runs in ~/metastone-jax with the venv active. Multi-host slices need nothing
more: every worker runs the same command, and launch/remote.sh sets JAX_COORDINATOR_ADDRESS
(worker 0) so that `metastone_jax.sharding.maybe_initialize_distributed` calls
`jax.distributed.initialize()`.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys

if not __package__:  # run as a script: python launch/tpu.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch.common import (  # noqa: E402
    execute,
    parse,
    parse_with_command,
    skeleton,
    zone_project,
)

PROG = "launch/tpu.py"
TPU = ["gcloud", "compute", "tpus"]
REMOTE = "bash ~/metastone-jax/launch/remote.sh"
DEFAULT_JOB = "metastone"
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # GCE resource names
JOB_RE = re.compile(r"^[A-Za-z0-9_-]+$")  # tmux session and directory names


def _ssh(a, command: str) -> list[str]:
    return [
        *TPU,
        "tpu-vm",
        "ssh",
        a.name,
        *zone_project(a.zone, a.project),
        "--worker=all",
        "--command",
        command,
    ]


def create(a) -> list[list[str]]:
    acc = parse(a.accelerator_type)
    version = a.runtime_version or acc.runtime_version
    where = zone_project(a.zone, a.project)
    if a.queued:
        # Queued resources take --spot (there is no --preemptible); the node id is NAME too, so
        # every other action works on it unchanged once it is ACTIVE.
        if a.preemptible:
            sys.exit(f"{PROG}: --queued takes --spot, not --preemptible")
        return [
            [
                *TPU,
                "queued-resources",
                "create",
                a.name,
                f"--node-id={a.name}",
                *where,
                f"--accelerator-type={acc.gcloud}",
                f"--runtime-version={version}",
                *(["--spot"] if a.spot else []),
                *a.command,
            ]
        ]
    return [
        [
            *TPU,
            "tpu-vm",
            "create",
            a.name,
            *where,
            f"--accelerator-type={acc.gcloud}",
            f"--version={version}",
            *(["--spot"] if a.spot else []),
            *(["--preemptible"] if a.preemptible else []),
            *a.command,
        ]
    ]


def install(a) -> list[list[str]]:
    if a.git_url:
        url, ref = shlex.quote(a.git_url), shlex.quote(a.git_ref or "main")
        fetch = (
            f"(test -d ~/metastone-jax/.git || git clone -q {url} ~/metastone-jax) && "
            f"cd ~/metastone-jax && git fetch -q origin {ref} && "
            f"git checkout -q --detach FETCH_HEAD && {REMOTE} install"
        )
        return [_ssh(a, fetch)]
    tarball = f"/tmp/metastone-jax-{a.name}.tar.gz"
    unpack = (
        "mkdir -p ~/metastone-jax && tar -xzf ~/metastone-jax.tar.gz -C ~/metastone-jax && "
        f"{REMOTE} install"
    )
    return [
        ["git", "archive", "--format=tar.gz", f"--output={tarball}", a.git_ref or "HEAD"],
        [
            *TPU,
            "tpu-vm",
            "scp",
            tarball,
            f"{a.name}:metastone-jax.tar.gz",
            *zone_project(a.zone, a.project),
            "--worker=all",
        ],
        _ssh(a, unpack),
    ]


def run(a) -> list[list[str]]:
    return [_ssh(a, f"{REMOTE} run {a.job} {shlex.join(_command(a))}")]


def ssh(a) -> list[list[str]]:
    # Like ssh: the words are joined with spaces and the worker's shell parses the line.
    return [_ssh(a, " ".join(_command(a)))]


def tail(a) -> list[list[str]]:
    return [_ssh(a, f"{REMOTE} tail {a.job} {a.lines}")]


def stop(a) -> list[list[str]]:
    return [_ssh(a, f"{REMOTE} stop {a.job}")]


def mount(a) -> list[list[str]]:
    bucket = a.bucket.removeprefix("gs://").rstrip("/")
    mount_dir = a.mount_dir or f"/mnt/{bucket}"
    return [_ssh(a, f"{REMOTE} mount {shlex.quote(bucket)} {shlex.quote(mount_dir)}")]


def logs(a) -> list[list[str]]:
    dest = os.path.join(a.dest, a.name)
    # Every worker writes its own worker-K.log into metastone-logs/JOB, so the copies from all
    # workers land side by side in DEST/NAME/JOB.
    return [
        ["mkdir", "-p", dest],
        [
            *TPU,
            "tpu-vm",
            "scp",
            "--recurse",
            f"{a.name}:metastone-logs/{a.job}",
            dest,
            *zone_project(a.zone, a.project),
            "--worker=all",
        ],
    ]


def status(a) -> list[list[str]]:
    kind = "queued-resources" if a.queued else "tpu-vm"
    return [[*TPU, kind, "describe", a.name, *zone_project(a.zone, a.project)]]


def delete(a) -> list[list[str]]:
    if a.queued:  # --force deletes the node first
        return [
            [
                *TPU,
                "queued-resources",
                "delete",
                a.name,
                *zone_project(a.zone, a.project),
                "--force",
                "--quiet",
            ]
        ]
    return [[*TPU, "tpu-vm", "delete", a.name, *zone_project(a.zone, a.project), "--quiet"]]


def cost(a) -> None:
    acc = parse(a.accelerator_type)
    chips = acc.chips * a.num_slices
    chip_hours = chips * a.hours
    slices = f" x {a.num_slices} slices" if a.num_slices > 1 else ""
    line = (
        f"{acc.name}{slices} (gcloud {acc.gcloud}): {chips} chips x {a.hours:g} h = "
        f"{chip_hours:g} chip-hours"
    )
    if a.price_per_chip_hour is not None:
        line += (
            f" x ${a.price_per_chip_hour:g}/chip-hour = ${chip_hours * a.price_per_chip_hour:,.2f}"
        )
    else:
        line += " (x the price per chip-hour: https://cloud.google.com/tpu/pricing)"
    print(line)


ACTIONS = {
    "create": create,
    "install": install,
    "run": run,
    "ssh": ssh,
    "tail": tail,
    "stop": stop,
    "logs": logs,
    "mount": mount,
    "status": status,
    "delete": delete,
}


def _command(a) -> list[str]:
    if not a.command:
        sys.exit(f"{PROG} {a.action}: give the command after --, e.g. -- metastone-jax train ...")
    return a.command


def build_parser() -> argparse.ArgumentParser:
    p, sub, common = skeleton(
        PROG, __doc__, "name", "TPU VM (and queued resource) name", "us-west4-a"
    )
    job = argparse.ArgumentParser(add_help=False)
    job.add_argument("--job", default=DEFAULT_JOB, help="tmux session and log directory name")
    accel = argparse.ArgumentParser(add_help=False)
    accel.add_argument("--accelerator_type", required=True, help="v4-8, v5e-8, v5p-64, v6e-8...")
    queued = argparse.ArgumentParser(add_help=False)
    queued.add_argument("--queued", action="store_true", help="a queued resource, not a TPU VM")

    s = sub.add_parser("create", parents=[common, accel, queued], help="create the TPU")
    s.add_argument("--runtime_version", help="default: the generation's JAX runtime")
    kind = s.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="Spot VM: cheaper, can be preempted")
    kind.add_argument("--preemptible", action="store_true", help="preemptible TPU (the older kind)")
    s = sub.add_parser("install", parents=[common], help="install on every worker")
    s.add_argument("--git_url", help="clone this on the workers instead of copying HEAD")
    s.add_argument("--git_ref", help="commit/branch to archive or fetch (default HEAD / main)")
    sub.add_parser("run", parents=[common, job], help="start a detached job on every worker")
    sub.add_parser("ssh", parents=[common], help="run a command on every worker (foreground)")
    s = sub.add_parser("tail", parents=[common, job], help="last log lines of every worker")
    s.add_argument("--lines", type=int, default=20)
    sub.add_parser("stop", parents=[common, job], help="SIGTERM the job on every worker")
    s = sub.add_parser("logs", parents=[common, job], help="copy every worker's log here")
    s.add_argument("--dest", default="logs", help="local directory (default: logs)")
    s = sub.add_parser("mount", parents=[common], help="mount a bucket on every worker")
    s.add_argument("--bucket", required=True, help="gs://BUCKET or BUCKET")
    s.add_argument("--mount_dir", help="default: /mnt/BUCKET")
    sub.add_parser("status", parents=[common, queued], help="describe the TPU")
    sub.add_parser("delete", parents=[common, queued], help="delete the TPU")
    s = sub.add_parser("cost", parents=[accel], help="chip-hours and dollars of a run")
    s.add_argument("--hours", type=float, required=True)
    s.add_argument("--price_per_chip_hour", type=float, help="USD, from the pricing page")
    s.add_argument("--num_slices", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> None:
    a = parse_with_command(build_parser(), argv)
    command = a.command
    if command and a.action not in ("create", "run", "ssh"):
        sys.exit(f"{PROG} {a.action}: takes nothing after --")
    try:
        if a.action == "cost":
            if a.hours < 0 or a.num_slices < 1:
                sys.exit(f"{PROG} cost: --hours must be >= 0 and --num_slices >= 1")
            return cost(a)
        if not NAME_RE.match(a.name):
            sys.exit(
                f"{PROG}: --name={a.name!r}: use lowercase letters, digits and hyphens, "
                "starting with a letter"
            )
        if not JOB_RE.match(getattr(a, "job", DEFAULT_JOB)):
            sys.exit(f"{PROG}: --job={a.job!r}: use letters, digits, '-' and '_'")
        commands = ACTIONS[a.action](a)
    except ValueError as e:  # a bad accelerator type: one line naming the valid ones
        sys.exit(f"{PROG}: {e}")
    execute(commands, dry_run=a.dry_run, prog=PROG)


if __name__ == "__main__":
    main()
