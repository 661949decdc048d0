"""Params-only checkpoints: an orbax tree of parameters plus the ModelConfig, in one directory.

    CKPT/model_config.json   the ModelConfig (and where the weights came from)
    CKPT/params/             orbax checkpoint of the parameter tree (pure dict of arrays)
    CKPT/hf/                 files carried through from an HF checkpoint (tokenizer, generation
                             config, the original config.json), so export and sampling keep working

A checkpoint is written to a temporary directory and published at the end (files.staged_dir:
renamed into place, or uploaded with model_config.json last to gs://), so a failure never
leaves a half-written CKPT. Restoring places each array straight into its sharding. A
missing, damaged or mismatched checkpoint is one ValueError line naming the path and what is
wrong (a missing file, a tensor's shape, tensorstore's reason), without orbax's noise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from metastone_jax import files
from metastone_jax.config import ModelConfig, model_config_from_dict
from metastone_jax.data.tokenizer import load_tokenizer
from metastone_jax.model import abstract_model
from metastone_jax.sharding import placement, sharded_abstract
from metastone_jax.sprm.steps import StepTokens

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
HF_FILES_DIR = "hf"
OCDBT_ROOT = "manifest.ocdbt"  # the root of orbax's OCDBT store, in PARAMS_DIR


def check_output_free(out: str, overwrite: bool) -> None:
    if epath.Path(out).exists() and not overwrite:
        raise ValueError(f"{out}: already exists (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_dir(out: str, *, overwrite: bool = False):
    """Yields a local temporary directory that becomes `out` (local or gs://) only if the block
    succeeds; on any failure it is removed, so `out` is either the old content or the complete
    new one (files.staged_dir: on an object store, CONFIG_FILE, the mark of a checkpoint, is
    uploaded last)."""
    check_output_free(out, overwrite)
    with files.staged_dir(out, last=(CONFIG_FILE,)) as tmp:
        yield tmp


FINGERPRINT_VALUES = 64  # per array, spread evenly over it


def params_fingerprint(module: nnx.Module) -> str:
    """A short hex digest of `module`'s parameters: each array's path, shape, dtype and
    FINGERPRINT_VALUES of its values at evenly spread positions. Exact values, no reduction, so
    the same weights give the same digest on any mesh. It reads a few values per array, not the
    weights: it tells checkpoints apart (any training moves them), it is not a hash of every
    weight."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(module, nnx.Param)))
    for path, x in leaves[0]:
        x = x[None] if x.ndim == 0 else x
        # A gather of the chosen elements: no reshaped copy of a sharded array.
        at = np.unique(np.linspace(0, x.size - 1, FINGERPRINT_VALUES).astype(np.int64))
        values = np.asarray(jax.device_get(x[np.unravel_index(at, x.shape)]))
        digest.update(f"{jax.tree_util.keystr(path)}{tuple(x.shape)}{x.dtype}".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()[:16]


def config_to_json(cfg: ModelConfig) -> dict[str, Any]:
    values = dataclasses.asdict(cfg)
    if isinstance(values.get("eos_token_id"), tuple):
        values["eos_token_id"] = list(values["eos_token_id"])
    return values


def _concurrent_gb(tree, budget_gb: float) -> float:
    """Orbax's in-flight byte limit: `budget_gb`, raised to fit the largest array (orbax refuses
    an array larger than the limit). Lower limits mean less host memory beyond the params."""
    largest = max((math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)), default=0)
    return max(budget_gb, 1.01 * largest / 1e9)


def write_params_checkpoint(
    tmp_dir: str, state: nnx.State, cfg: ModelConfig, meta: dict[str, Any] | None = None
) -> None:
    """Writes params + config into the (temporary) directory `tmp_dir`."""
    # Synchronous and with bounded concurrency: the async checkpointer first copies every array
    # to host memory, which doubles peak host memory when converting on CPU.
    tree = nnx.to_pure_dict(state)
    handler = ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=_concurrent_gb(tree, 0.25), use_compression=False
    )
    with ocp.Checkpointer(handler) as ckptr:
        path = os.path.abspath(os.path.join(tmp_dir, PARAMS_DIR))
        ckptr.save(path, args=ocp.args.PyTreeSave(tree))
    with open(os.path.join(tmp_dir, CONFIG_FILE), "w") as f:
        json.dump({"model": config_to_json(cfg), **(meta or {})}, f, indent=2)


def check_checkpoint_dir(ckpt: str, *, tokenizer: bool = False) -> None:
    """Cheap checks that `ckpt` looks like a params checkpoint, before anything is read: the
    directory, model_config.json, params/ (and hf/ with `tokenizer`). ValueError naming what is
    missing; damage inside params/ is found (and named) by the restore itself."""
    if not os.path.exists(ckpt):
        raise ValueError(f"{ckpt}: no such checkpoint directory")
    if not os.path.isdir(ckpt):
        raise ValueError(f"{ckpt}: not a directory (expected a params checkpoint)")
    if not os.listdir(ckpt):
        raise ValueError(
            f"{ckpt}: empty directory, not a params checkpoint (expected {CONFIG_FILE}, "
            f"{PARAMS_DIR}/ and {HF_FILES_DIR}/)"
        )
    if not os.path.isfile(os.path.join(ckpt, CONFIG_FILE)):
        raise ValueError(f"{ckpt}: not a params checkpoint (missing {CONFIG_FILE})")
    if not os.path.isdir(os.path.join(ckpt, PARAMS_DIR)):
        raise ValueError(
            f"{ckpt}: parameters do not match {CONFIG_FILE}: no {PARAMS_DIR}/ directory"
        )
    if tokenizer and not os.path.isdir(os.path.join(ckpt, HF_FILES_DIR)):
        raise ValueError(
            f"{ckpt}: not a params checkpoint (no {HF_FILES_DIR}/ tokenizer directory)"
        )


def read_checkpoint_meta(ckpt: str) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, the rest of model_config.json) of checkpoint `ckpt`."""
    check_checkpoint_dir(ckpt)
    path = os.path.join(ckpt, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed, not JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise ValueError(f'{path}: malformed, expected an object with a "model" object')
    try:
        cfg = model_config_from_dict(meta.pop("model"), where=f"{path}: model")
    except TypeError as e:  # a missing or misspelt field of ModelConfig or rope_scaling
        raise ValueError(f"{path}: model: {e}") from None
    return cfg, meta


def _reason(error: BaseException) -> str:
    """The innermost cause's first line, without tensorstore's driver chain and spec dump."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = re.split(r" \[tensorstore_spec", str(error))[0].strip()
    text = re.sub(r'Error opening "\w+" driver: ', "", text)
    return text.splitlines()[0] if text else type(error).__name__


def _abandoned_read_report(info) -> bool:
    """Whether an unraisable exception reports a read that a failed restore abandoned: orbax
    closes its event loop at the first error while tensorstore completes the other reads, each
    then hitting "RuntimeError: Event loop is closed"; and orbax's coroutines of those reads,
    once collected, raise their own error again."""
    value, code = info.exc_value, getattr(info.object, "cr_code", None)
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        return True
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


class _AbandonedTaskFilter(logging.Filter):
    """Drops asyncio's "Task/Future exception was never retrieved" for the reads a failed
    restore abandoned: orbax's tasks and tensorstore's futures on the OCDBT store."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        # Any case: a gathered future's message names only "TensorStore" and "'ocdbt'".
        ours = any(name in message.lower() for name in ("orbax", "ocdbt", "tensorstore"))
        return not ("exception was never retrieved" in message and ours)


_ABANDONED_TASKS = _AbandonedTaskFilter()


@contextlib.contextmanager
def quiet_abandoned_reads():
    """Drops the reports of `_abandoned_read_report` (tracebacks on stderr after the real
    error) during an orbax read and, after it failed, for the rest of the process. The failed
    read's leftovers are collected at once, "coroutine ... was never awaited" muted, and
    asyncio's "exception was never retrieved" for orbax's reads is dropped from then on (a read
    still running may end later, at exit). Anything else reaches the previous hook."""
    previous = sys.unraisablehook

    def hook(info):
        if not _abandoned_read_report(info):
            previous(info)

    sys.unraisablehook = hook
    try:
        yield
    except BaseException:
        logging.getLogger("asyncio").addFilter(_ABANDONED_TASKS)  # once: filters are a set
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
            gc.collect()
        raise  # the hook and the filter stay: abandoned reads may still finish
    if sys.unraisablehook is hook:
        sys.unraisablehook = previous


def tensor_name(path) -> str:
    """A tree path as orbax names the stored array: keys, indices, attributes joined by '.'."""
    return ".".join(
        str(next((getattr(k, a) for a in ("key", "idx", "name") if hasattr(k, a)), k)) for k in path
    )


def shapes_by_name(tree) -> dict[str, tuple[int, ...]]:
    """{tensor name (as orbax stores it): shape} of a tree of arrays or shape structs."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tensor_name(path): tuple(leaf.shape) for path, leaf in flat}


def first_line(error: BaseException, limit: int = 300) -> str:
    """An error's first line (its type when it has no text), for a one-line message."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:limit].rstrip("; ")


def _first(names: list[str], n: int = 5) -> str:
    """The first `n` names, and how many more."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _check_stored_shapes(ckpt: str, target) -> None:
    """Compares the stored arrays' names and shapes (orbax's metadata) with `target`'s, so that
    a mismatch names the tensor. Without readable metadata the restore alone decides (given a
    target it needs none)."""
    try:
        with quiet_abandoned_reads():  # it reads the store, which may be damaged
            stored = ocp.PyTreeCheckpointHandler().metadata(
                epath.Path(os.path.abspath(os.path.join(ckpt, PARAMS_DIR)))
            )
    except Exception:  # noqa: BLE001  (optional; real damage is reported by the restore)
        return
    stored = getattr(stored, "tree", stored)  # the tree of ArrayMetadata
    flat = jax.tree_util.tree_flatten_with_path
    have = {tensor_name(p): getattr(x, "shape", None) for p, x in flat(stored)[0]}
    want = shapes_by_name(target)
    where = f"{ckpt}: parameters do not match {CONFIG_FILE}"
    if missing := sorted(set(want) - set(have)):
        raise ValueError(f"{where}: {PARAMS_DIR}/ lacks {_first(missing)}")
    if extra := sorted(set(have) - set(want)):
        raise ValueError(f"{where}: {PARAMS_DIR}/ holds unexpected {_first(extra)}")
    for name, shape in sorted(want.items()):
        if have[name] is not None and tuple(have[name]) != shape:
            raise ValueError(
                f"{where}: {name} has shape {list(have[name])} in {PARAMS_DIR}/, "
                f"{CONFIG_FILE} implies {list(shape)}"
            )


def _restore(ckpt: str, target, restore_args, concurrent_gb: float):
    """The parameter tree of `ckpt` restored into `target`'s shapes. ValueError naming the
    checkpoint and what is wrong: a tensor of another shape, a damaged or missing file."""
    handler = ocp.PyTreeCheckpointHandler(
        restore_concurrent_gb=_concurrent_gb(target, concurrent_gb)
    )
    args = ocp.args.PyTreeRestore(target, restore_args=restore_args)
    _check_stored_shapes(ckpt, target)
    try:
        with quiet_abandoned_reads(), ocp.Checkpointer(handler) as ckptr:
            return ckptr.restore(os.path.abspath(os.path.join(ckpt, PARAMS_DIR)), args=args)
    except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise bare Exception too)
        reason = _reason(e)
        if "OCDBT" in reason and not os.path.exists(os.path.join(ckpt, PARAMS_DIR, OCDBT_ROOT)):
            reason = f"{PARAMS_DIR}/{OCDBT_ROOT} is missing ({reason})"
        raise ValueError(
            f"{ckpt}: cannot read {PARAMS_DIR}/ (damaged or incomplete checkpoint): {reason}"
        ) from None


def load_params_numpy(ckpt: str, *, concurrent_gb: float = 0.05):
    """(ModelConfig, params as a pure dict of host numpy arrays, meta): for export, no devices."""
    cfg, meta = read_checkpoint_meta(ckpt)
    target = nnx.to_pure_dict(nnx.state(abstract_model(cfg)))
    restore_args = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray), target)
    return cfg, _restore(ckpt, target, restore_args, concurrent_gb), meta


def load_params_checkpoint(
    ckpt: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    concurrent_gb: float = 0.05,
    **config_overrides,
) -> tuple[Any, dict[str, Any]]:
    """Restores (model, meta) with every parameter placed in its sharding on `mesh`
    (one device without a mesh). `config_overrides` may change non-shape fields (dtypes, scan,
    remat); shape fields must match the checkpoint. At most `concurrent_gb` is read at once,
    which bounds host memory beyond the restored parameters."""
    cfg, meta = read_checkpoint_meta(ckpt)
    cfg = cfg.replace(**config_overrides) if config_overrides else cfg
    abstract = abstract_model(cfg)
    graphdef, state = nnx.split(abstract)
    target = sharded_abstract(nnx.to_pure_dict(state), placement(state, mesh))
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    restored = _restore(ckpt, target, restore_args, concurrent_gb)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state), meta


def write_policy(
    out: str,
    state: nnx.State,
    cfg: ModelConfig,
    *,
    tokenizer_dir: str,
    meta: dict[str, Any] | None = None,
    extra_json: dict[str, dict] | None = None,
) -> str:
    """A params checkpoint with its tokenizer in `out` (atomically, replacing what is there):
    what `sample`, `evaluate` and `load_policy` read. `extra_json`: file name -> content."""
    with atomic_dir(out, overwrite=True) as tmp:
        write_params_checkpoint(tmp, state, cfg, meta)
        if os.path.isdir(tokenizer_dir):
            shutil.copytree(tokenizer_dir, os.path.join(tmp, HF_FILES_DIR))
        for name, content in (extra_json or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(content, f)
    return out


def load_policy(ckpt: str, *, mesh: jax.sharding.Mesh | None = None, step_ids=None):
    """(model, tokenizer, step tokens) of a params checkpoint with its tokenizer in CKPT/hf.
    `step_ids`: the step token ids (default: the id(s) of ".\\n\\n" in the tokenizer)."""
    check_checkpoint_dir(ckpt, tokenizer=True)
    tokenizer = load_tokenizer(os.path.join(ckpt, HF_FILES_DIR))
    model, _ = load_params_checkpoint(ckpt, mesh=mesh)
    if step_ids:
        step = StepTokens.from_tokenizer(tokenizer, step_text=[int(i) for i in step_ids])
    else:
        step = StepTokens.from_tokenizer(tokenizer)
    return model, tokenizer, step
