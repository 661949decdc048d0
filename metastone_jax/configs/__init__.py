"""The config files: ml_collections files whose `get_config(PRESET)` returns a ConfigDict.

  model.py    a model and its mesh (`metastone-jax info`)
  train.py    a training run (`metastone-jax train`, `plan`)
  meshes.py   train.py's released recipe laid out on Cloud TPU slices (`train`, `plan`)
  demo.py     the end-to-end demo (`metastone-jax demo`)
  sweeps/     scaling sweeps, one file each (`metastone-jax sweep`)

They ship inside the package (the repository's top-level configs/ is a link to this directory),
so an installed metastone-jax finds them wherever it runs. A command line names one as
--config=PRESET (looked up in the command's files here) or as a path, --config=FILE.py[:PRESET]
(e.g. configs/train.py:tiny-sft from the repository root, or a copy of one). The functions below
are the one place that locates them.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence

DIR = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
    """The packaged config file `name`, e.g. 'train.py' or 'sweeps/cpu.py'."""
    return os.path.join(DIR, *name.split("/"))


def _module(name: str):
    return importlib.import_module(f"{__name__}.{name.removesuffix('.py').replace('/', '.')}")


def presets(name: str) -> tuple[str, ...]:
    """The presets of packaged config file `name` (its PRESETS; () for a file without presets)."""
    return tuple(getattr(_module(name), "PRESETS", ()))


def load(name: str, preset: str | None = None):
    """The ConfigDict of packaged file `name` at `preset`, locked as `--config=` loads it."""
    config = _module(name).get_config(preset)
    config.lock()
    return config


def choices(names: Sequence[str]) -> dict[str, tuple[str, str | None]]:
    """What --config=NAME may name among packaged files `names`: NAME -> (file, preset). Each
    preset names itself; a file without presets answers to its own name ('cpu': sweeps/cpu.py)."""
    out: dict[str, tuple[str, str | None]] = {}
    for name in names:
        found = presets(name)
        for preset in found:
            out.setdefault(preset, (name, preset))
        if not found:
            out.setdefault(os.path.basename(name).removesuffix(".py"), (name, None))
    return out


def resolve(arg: str, names: Sequence[str], *, flag: str = "--config") -> str:
    """The value of `--config=arg` as ml_collections loads it, FILE[:PRESET]. A path (it names a
    .py file) stays as given and must exist; a bare NAME is looked up by `choices(names)`. Either
    failure is a ValueError of one line that names `flag` and lists the presets."""
    file = arg.split(":", 1)[0]
    valid = choices(names)
    if file.endswith(".py") or os.sep in file or "/" in file:
        if not os.path.isfile(file):
            raise ValueError(
                f"{flag}={arg}: no such file {file!r} (or name a packaged preset: "
                f"--config=PRESET, one of {sorted(valid)})"
            )
        return arg
    if arg not in valid:
        files = ", ".join(f"configs/{n}" for n in names)
        raise ValueError(
            f"{flag}={arg}: unknown preset {arg!r}; expected one of {sorted(valid)} ({files}) "
            "or a file, --config=FILE.py[:PRESET]"
        )
    name, preset = valid[arg]
    return path(name) + (f":{preset}" if preset is not None else "")
