"""A fake gs:// filesystem for tests: `epath.Path("gs://bucket/x")` and orbax's tensorstore writes
to gs:// paths land in ROOT/bucket/x on the local disk (no network, no gcsfs).

    def test_x(fake_gcs):           # the fixture (tests/conftest.py): ROOT is tmp_path
        files.write_text("gs://bucket/run/a.txt", "hi")
        assert (fake_gcs / "bucket" / "run" / "a.txt").read_text() == "hi"

How: etils.epath sends gs:// paths to its fsspec backend, which asks `fsspec.filesystem("gcs")`;
a `DirFileSystem` over the local disk rooted at ROOT is registered for "gs" and "gcs" (fsspec
then strips "gs://" and returns paths as "bucket/x", as gcsfs does). Orbax writes array data
through tensorstore, not epath: `gcs_utils.get_kvstore_for_gcs` (which tensorstore_utils calls to
build the kvstore spec) is patched to a `file` kvstore under ROOT, and orbax's hierarchical-
namespace probe (google-cloud-storage, not installed) answers False. Orbax still takes its gs://
code paths (a commit_success.txt file instead of a temporary-directory rename).

Unlike real GCS the fake has real directories (an empty one exists), and a rename is atomic.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import fsspec
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import _registry as fsspec_registry  # no unregister in fsspec's API

PROTOCOLS = ("gs", "gcs")


def _filesystem_class(root: Path) -> type:
    class FakeGCSFileSystem(DirFileSystem):
        protocol = PROTOCOLS
        cachable = False

        def __init__(self, *args, **storage_options):
            # gcsfs options (epath passes finalize_on_close=True) mean nothing here.
            super().__init__(path=str(root), fs=LocalFileSystem(auto_mkdir=True))

    return FakeGCSFileSystem


def _clear_caches() -> None:
    epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()


@contextlib.contextmanager
def fake_gcs_at(root: Path, monkeypatch):
    """The fake over `root` (created) while the block runs; everything is undone after it."""
    from orbax.checkpoint._src.path import gcs_utils  # heavy import: only for tests that use it

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    before = {p: fsspec_registry.get(p) for p in PROTOCOLS}
    cls = _filesystem_class(root)
    for p in PROTOCOLS:
        fsspec.register_implementation(p, cls, clobber=True)
    _clear_caches()

    def kvstore(path: str) -> dict:
        bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": os.path.join(str(root), bucket, key)}

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    try:
        yield root
    finally:
        for p, old in before.items():
            if old is None:
                fsspec_registry.pop(p, None)
            else:
                fsspec_registry[p] = old
        _clear_caches()
