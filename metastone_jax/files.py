"""Every file a run writes goes through here: written atomically, on any etils.epath path (local
or an object store such as gs://), so a reader, a resumed run or a kill never meets half a file.

Local disk: the bytes go to a temporary name in the target's directory, are fsynced, and are
renamed over the target (a rename within a directory is atomic). An object store has no rename,
but one object upload is all-or-nothing, so objects are written directly. Two cases need more:
a directory that a third-party library writes (SentencePiece, an export) is staged locally and
then published (`staged_dir`), and an append-only log, which an object store cannot append to,
is an `AppendLog`. Orbax checkpoints do not come here: orbax handles gs:// itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from etils import epath

PathLike = str | os.PathLike
_CHUNK = 1 << 22  # bytes per read when uploading a file


def is_remote(path: PathLike) -> bool:
    """Whether `path` is in an object store (gs://, s3://, ...): no rename and no append there."""
    return "://" in os.fspath(path)


def _temp_name(path: str) -> str:
    """A fresh hidden name beside `path`, ending in its suffix (np.savez and savefig go by it).
    Hidden, so that a glob for the real files (step_*.npz) never picks it up."""
    head, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    return os.path.join(head, f".{stem}.tmp-{uuid.uuid4().hex[:8]}{ext}")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _upload(local: str, dst: epath.Path) -> None:
    """One object write from a local file (streamed: exports can be large)."""
    with open(local, "rb") as src, dst.open("wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)


@contextlib.contextmanager
def staged_file(path: PathLike) -> Iterator[str]:
    """Yields a local temporary file name (with `path`'s suffix) for a writer that wants a file
    name (np.savez, savefig); it becomes `path` only if the block succeeds."""
    target = os.fspath(path)
    stage = None
    if is_remote(target):
        stage = tempfile.mkdtemp(prefix="metastone-stage-")
        tmp = _temp_name(os.path.join(stage, os.path.basename(target)))
    else:
        target = os.path.abspath(target)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = _temp_name(target)
    try:
        yield tmp
        if stage is None:
            _fsync(tmp)
            os.replace(tmp, target)
        else:
            _upload(tmp, epath.Path(target))
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: PathLike, data: bytes) -> None:
    """`data` at `path`, atomically (parent directories created)."""
    if is_remote(path):
        epath.Path(path).write_bytes(data)  # one upload: the old object or the new one
        return
    with staged_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: PathLike, text: str) -> None:
    """`text` (UTF-8) at `path`, atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any, **dumps_kwargs) -> None:
    """`json.dumps(obj, **dumps_kwargs)` and a newline at `path`, atomically."""
    write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")


def _tree(root: epath.Path) -> list[str]:
    """The files under `root`, as sorted '/'-separated relative names (no directories: an
    object store has none)."""
    base = os.fspath(root).rstrip("/")
    out = []
    for top, _, names in root.walk():
        top = os.fspath(top).rstrip("/")
        if not is_remote(top) and is_remote(base):  # fsspec lists without the scheme
            top = base.split("://", 1)[0] + "://" + top
        rel = top[len(base) :].lstrip("/")
        out.extend(f"{rel}/{n}" if rel else n for n in names)
    return sorted(out)


def _replace_dir(tmp: str, out: str) -> None:
    """Renames the finished `tmp` to `out`; an existing `out` is moved aside only at the very
    end (and then removed), so `out` is the old tree, for an instant nothing, or the new one:
    never a mix."""
    old = None
    if os.path.lexists(out):
        old = f"{tmp}.old"
        os.rename(out, old)
    os.rename(tmp, out)
    if old:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)


def _publish(tmp: str, out: epath.Path, last: Sequence[str]) -> None:
    """Uploads the tree `tmp` to `out`, replacing what is there. No rename on an object store:
    the `last` files (what a reader checks for a complete tree) are removed from the old tree
    first and uploaded after everything else, and old files the new tree lacks are removed
    before them, so a tree with its `last` files is always the whole new one."""
    names = _tree(epath.Path(tmp))
    old = set(_tree(out)) if out.exists() else set()
    final = [n for n in names if n in set(last)]
    for name in final:
        if name in old:
            (out / name).unlink()
    for name in names:
        if name not in final:
            _upload(os.path.join(tmp, name), out / name)
    for name in sorted(old - set(names)):
        (out / name).unlink()
    for name in final:
        _upload(os.path.join(tmp, name), out / name)


@contextlib.contextmanager
def staged_dir(path: PathLike, *, last: Sequence[str] = ()) -> Iterator[str]:
    """Yields a local temporary directory for a writer of a whole directory (SentencePiece, an
    export); only if the block succeeds does it become `path`, replacing what is there. On an
    exception nothing is published and the temporary directory is removed.

    Local: a sibling directory renamed into place (atomic). Remote: the files are uploaded one
    by one, the `last` ones (relative names, e.g. the file a reader checks for completeness)
    after all others; see `_publish`."""
    target = os.fspath(path)
    remote = is_remote(target)
    if remote:
        tmp = tempfile.mkdtemp(prefix="metastone-stage-")
    else:
        target = os.path.abspath(target)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = _temp_name(target)
        os.makedirs(tmp)  # not mkdtemp: the published directory keeps the usual permissions
    try:
        yield tmp
        if remote:
            _publish(tmp, epath.Path(target), last)
        else:
            _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class AppendLog:
    """A log of whole lines (metrics.jsonl, a candidate pool) that a kill cuts at a line: its
    readers drop a torn last line. Nothing is created before the first append.

    Local: each append is written and flushed at once (with `fsync`, also synced), so a killed
    run keeps every line. An object store cannot append, and rewriting the object per line
    would upload the whole log each time: a remote log keeps its content in memory and rewrites
    the object (one all-or-nothing upload) at most every `flush_secs` and on flush()/close(),
    so a kill loses at most the last `flush_secs` of lines and never tears one. (A local file
    copied up would cost the same upload; the memory is the log's size, a few MB.)"""

    def __init__(self, path: PathLike, *, flush_secs: float = 30.0, fsync: bool = False):
        self.path = os.fspath(path)
        self.remote = is_remote(self.path)
        self.flush_secs = float(flush_secs)
        self.fsync = fsync
        self._file = None
        self._data: bytearray | None = None  # remote: the object's content
        self._dirty = False
        self._flushed = time.monotonic()

    def append(self, text: str) -> None:
        """`text`: one or more whole lines, each ending in a newline."""
        data = text.encode("utf-8")
        if self.remote:
            if self._data is None:
                p = epath.Path(self.path)
                self._data = bytearray(p.read_bytes() if p.exists() else b"")
            self._data += data
            self._dirty = True
            if time.monotonic() - self._flushed >= self.flush_secs:
                self.flush()
            return
        if self._file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, "ab")
        self._file.write(data)
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def flush(self) -> None:
        if self.remote:
            if self._dirty:
                write_bytes(self.path, bytes(self._data))
                self._dirty = False
            self._flushed = time.monotonic()
        elif self._file is not None:
            self._file.flush()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> AppendLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_LOCAL_COPIES: dict[str, str] = {}


def local_copy(path: PathLike) -> str:
    """A local directory holding `path`'s files, for readers that take local paths only (a
    tokenizer, an HF config): `path` itself when local; a remote directory is downloaded once
    per process into a temporary directory."""
    source = os.fspath(path)
    if not is_remote(source):
        return source
    if source not in _LOCAL_COPIES:
        root = epath.Path(source)
        if not root.is_dir():
            raise FileNotFoundError(f"{source}: no such directory")
        local = tempfile.mkdtemp(prefix="metastone-copy-")
        for name in _tree(root):
            dst = os.path.join(local, *name.split("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with (root / name).open("rb") as src, open(dst, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
        _LOCAL_COPIES[source] = local
    return _LOCAL_COPIES[source]
