"""Is a saved train step complete? A cheap check of every file its restore will read.

A step directory written by TrainCheckpointer (orbax 0.12, OCDBT format) holds:
  state/_METADATA               the TrainState's tree structure (JSON)
  state/manifest.ocdbt          the array database's manifest; its B-tree nodes and the array
                                bytes live in state/d/ and state/ocdbt.process_<i>/d/
  data/metadata, meta/metadata  the data iterator's position and the run's config (JSON)
The check parses the JSON files and walks the database's B-tree (its nodes only, never the
array bytes), verifying that every file a node points to exists and is long enough. A file
whose bytes are damaged in place still shows only when restored (see train/resume.py).
"""

from __future__ import annotations

import json

import tensorstore as ts
from etils import epath
from orbax.checkpoint._src.path import gcs_utils  # the GCS kvstore spec orbax itself uses

from metastone_jax.checkpoint import first_line

STATE_ITEM = "state"
JSON_FILES = ("state/_METADATA", "data/metadata", "meta/metadata")
MANIFEST = "state/manifest.ocdbt"


def step_damage(step_dir: str) -> str | None:
    """None when the step directory looks restorable, else why not, naming the file (its path
    relative to `step_dir`): e.g. "state/_METADATA is missing"."""
    root = epath.Path(step_dir)
    if not root.is_dir():
        return "the step directory is missing"
    if not any(root.iterdir()):
        return "the step directory is empty"
    for name in JSON_FILES:
        problem = _json_problem(root / name)
        if problem:
            return f"{name} {problem}"
    if not (root / MANIFEST).exists():
        return f"{MANIFEST} is missing"
    return _database_damage(root / STATE_ITEM)


def _json_problem(path: epath.Path) -> str | None:
    if not path.exists():
        return "is missing"
    try:
        json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"is unreadable ({first_line(e)})"
    return None


def _database_damage(state_dir: epath.Path) -> str | None:
    """Walks the OCDBT B-tree of the `state` item from its newest version's root."""
    try:
        base = ts.KvStore.open(_kvstore_spec(state_dir)).result()
        manifest = ts.ocdbt.dump(base).result()
    except Exception as e:  # tensorstore raises ValueError with a status text
        return f"{MANIFEST} is unreadable ({first_line(e)})"
    versions = manifest.get("versions") or []
    root = versions[-1].get("root", {}).get("location") if versions else None
    if not root:
        return f"{MANIFEST} lists no arrays"
    sizes: dict[str, int] = {}
    pending = [root]
    while pending:
        location = pending.pop()
        relative, end = _file_range(location)
        problem = _short_file(state_dir, relative, end, sizes)
        if problem:
            return problem
        if not location.startswith("btreenode:"):
            continue
        try:
            node = ts.ocdbt.dump(base, location).result()
        except Exception as e:
            return f"{STATE_ITEM}/{relative} is unreadable ({first_line(e)})"
        for entry in node.get("entries", []):
            for value in entry.values():
                if isinstance(value, str) and value.startswith(("btreenode:", "value:")):
                    pending.append(value)
    return None


def _kvstore_spec(path: epath.Path) -> dict:
    """The kvstore of an item directory as orbax opens it: orbax's own GCS spec for gs:// (its
    driver choice, TENSORSTORE_GCS_BACKEND, included), else a file kvstore."""
    text = path.as_posix()
    if text.startswith("gs://"):
        spec = gcs_utils.get_kvstore_for_gcs(text)
    else:
        spec = {"driver": "file", "path": text}
    return {**spec, "path": spec["path"].rstrip("/") + "/"}


def _file_range(location: str) -> tuple[str, int]:
    """'<kind>:<base path>:<file id>:<offset>:<length>' -> (file relative to the item, end)."""
    _, rest = location.split(":", 1)
    head, offset, length = rest.rsplit(":", 2)
    base_path, file_id = head.split(":", 1)
    return base_path + file_id, int(offset) + int(length)


def _short_file(state_dir: epath.Path, relative: str, end: int, sizes: dict[str, int]):
    if relative not in sizes:
        path = state_dir / relative
        sizes[relative] = path.stat().length if path.exists() else -1
    size = sizes[relative]
    if size < 0:
        return f"{STATE_ITEM}/{relative} is missing"
    if size < end:
        return f"{STATE_ITEM}/{relative} is truncated ({size} bytes; the index reads to {end})"
    return None
