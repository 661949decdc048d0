"""One train run per workdir: WORKDIR/train.lock, created atomically, names the run holding it.

The lock file (JSON: host, pid, start time) is created with O_CREAT | O_EXCL, so of two runs
starting at once exactly one gets it; the other refuses, naming the holder. The holder removes
it when it ends (normally, by an exception or after SIGTERM's save). A run killed outright
leaves it behind: a lock whose host is this machine and whose pid is no longer running is
stale and is taken over with a warning. A lock held on another host cannot be checked from
here and is refused with the command that clears it. A reused pid makes a stale lock look held
(refused, never taken over wrongly).

A gs:// workdir has no exclusive create: the lock object is written when absent and read back,
and the run holds it only if the record read is its own. Two runs starting within the same
instant could both see it absent; the later write wins and the earlier run, reading back the
other's record, refuses. (Object stores' generation preconditions would close that window;
epath does not expose them.)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time

from etils import epath

from metastone_jax import files

LOCK_FILE = "train.lock"


class WorkdirLocked(ValueError):
    """Another run holds the workdir."""


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read(path: str) -> dict | None:
    """The holder recorded in a lock file; {} when unreadable (being written, or garbage);
    None when the file is gone."""
    try:
        holder = json.loads(epath.Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = f", started {started}" if started else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{when}"


class WorkdirLock:
    """`with WorkdirLock(directory):` holds DIRECTORY/train.lock for the block."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_FILE)
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self.held = False
        self.remote = files.is_remote(directory)

    def acquire(self) -> None:
        if not self.remote:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for attempt in range(20):  # a retry follows another run's move (creating, releasing)
            if self._create():
                return
            holder = _read(self.path)
            if holder is None:
                continue  # released meanwhile
            if not holder and attempt < 19:
                time.sleep(0.05)  # created but not yet written
                continue
            if not self._stale(holder):
                raise WorkdirLocked(self._refusal(holder))
            if self._take_over(holder):
                print(
                    f"metastone-jax train: warning: taking over the stale lock {self.path} "
                    f"of {_describe(holder)} (no longer running)",
                    file=sys.stderr,
                    flush=True,
                )
        raise WorkdirLocked(f"could not take {self.path}: other runs keep changing it")

    def _create(self) -> bool:
        record = {**self.me, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        if self.remote:
            if epath.Path(self.path).exists():
                return False
            files.write_json(self.path, record)
            self.held = _read(self.path) == record  # read back: another run may have written
            return self.held
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
        except BaseException:
            os.unlink(self.path)
            raise
        self.held = True
        return True

    def _stale(self, holder: dict) -> bool:
        pid = holder.get("pid")
        same_host = holder.get("host") == self.me["host"]
        return same_host and isinstance(pid, int) and pid > 0 and not _pid_running(pid)

    def _take_over(self, stale: dict) -> bool:
        """Moves the stale lock out of the way; only one of several runs doing so at once
        succeeds, and a live lock moved by mistake (another run took over first) is put back."""
        if self.remote:  # no rename: remove it; of two runs taking over, the read-back decides
            with contextlib.suppress(FileNotFoundError):
                epath.Path(self.path).unlink()
            return True
        moved = f"{self.path}.stale-{self.me['pid']}"
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return False
        if _read(moved) != stale:  # another run's fresh lock: restore it unless a newer exists
            with contextlib.suppress(FileExistsError):
                os.link(moved, self.path)
            os.unlink(moved)
            return False
        os.unlink(moved)
        return True

    def _refusal(self, holder: dict) -> str:
        if not holder:
            return f"{self.path} exists but is unreadable; if no run uses this workdir, remove it"
        if holder.get("host") != self.me["host"]:
            return (
                f"the workdir is locked by {_describe(holder)} ({self.path}); if that run is "
                f"gone, remove the lock: rm {self.path}"
            )
        return f"the workdir is in use by a running train: {_describe(holder)} ({self.path})"

    def release(self) -> None:
        """Removes the lock if it is still this run's."""
        if self.held:
            self.held = False
            holder = _read(self.path) or {}
            if holder.get("host") == self.me["host"] and holder.get("pid") == self.me["pid"]:
                with contextlib.suppress(FileNotFoundError):
                    epath.Path(self.path).unlink()

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
