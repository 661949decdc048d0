"""Params-only checkpoints: an orbax tree of parameters plus the ModelConfig, in one directory.

    CKPT/model_config.json   the ModelConfig (and where the weights came from)
    CKPT/params/             orbax checkpoint of the parameter tree (pure dict of arrays)
    CKPT/hf/                 files carried through from an HF checkpoint (tokenizer, generation
                             config, the original config.json), so export and sampling keep working

A checkpoint is written to a temporary sibling directory and renamed at the end, so a failure
never leaves a half-written CKPT. Restoring places each array straight into its sharding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from metastone_jax.config import ModelConfig, model_config_from_dict

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
HF_FILES_DIR = "hf"


def temp_sibling(path: str) -> str:
    """A fresh temporary directory next to `path` (same filesystem, so rename is atomic)."""
    path = os.path.abspath(path)
    tmp = os.path.join(
        os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}"
    )
    os.makedirs(tmp)
    return tmp


def check_output_free(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"{out}: already exists (pass --overwrite to replace it)")


def commit_dir(tmp: str, out: str) -> None:
    """Renames the finished `tmp` to `out`, replacing an existing `out` only at the very end."""
    out = os.path.abspath(out)
    old = None
    if os.path.exists(out):
        old = f"{tmp}.old"
        os.rename(out, old)
    os.rename(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: str, *, overwrite: bool = False):
    """Yields a temporary sibling directory that becomes `out` only if the block succeeds; on
    any failure it is removed, so `out` is either the old content or the complete new one."""
    check_output_free(out, overwrite)
    tmp = temp_sibling(out)
    try:
        yield tmp
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


FINGERPRINT_VALUES = 64  # per array, spread evenly over it


def params_fingerprint(module: nnx.Module) -> str:
    """A short hex digest of `module`'s parameters: each array's path, shape, dtype and
    FINGERPRINT_VALUES of its values at evenly spread positions. Exact values, no reduction, so
    the same weights give the same digest on any mesh. It reads a few values per array, not the
    weights: it tells checkpoints apart (any training moves them), it is not a hash of every
    weight."""
    import hashlib

    import numpy as np

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
    import math

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


def read_checkpoint_meta(ckpt: str) -> tuple[ModelConfig, dict[str, Any]]:
    path = os.path.join(ckpt, CONFIG_FILE)
    if not os.path.isdir(ckpt):
        raise ValueError(f"{ckpt}: no such checkpoint directory")
    if not os.path.exists(path):
        raise ValueError(f"{ckpt}: not a metastone-jax checkpoint (missing {CONFIG_FILE})")
    try:
        with open(path) as f:
            meta = json.load(f)
        cfg = model_config_from_dict(meta.pop("model"), where=f"{path}: model")
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path}: malformed ({e!r})") from None
    return cfg, meta


def _restore(ckpt: str, target, restore_args, concurrent_gb: float):
    handler = ocp.PyTreeCheckpointHandler(
        restore_concurrent_gb=_concurrent_gb(target, concurrent_gb)
    )
    args = ocp.args.PyTreeRestore(target, restore_args=restore_args)
    try:
        with ocp.Checkpointer(handler) as ckptr:
            return ckptr.restore(os.path.abspath(os.path.join(ckpt, PARAMS_DIR)), args=args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise ValueError(f"{ckpt}: parameters do not match {CONFIG_FILE}: {e}") from None


def load_params_numpy(ckpt: str, *, concurrent_gb: float = 0.05):
    """(ModelConfig, params as a pure dict of host numpy arrays, meta): for export, no devices."""
    import numpy as np

    from metastone_jax.model import abstract_model

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
    from metastone_jax.model import abstract_model
    from metastone_jax.sharding import placement, sharded_abstract

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
    from metastone_jax.data.tokenizer import load_tokenizer
    from metastone_jax.sprm import StepTokens

    hf_dir = os.path.join(ckpt, HF_FILES_DIR)
    if not os.path.isdir(hf_dir):
        raise ValueError(
            f"{ckpt}: not a params checkpoint (no {HF_FILES_DIR}/ tokenizer directory)"
        )
    tokenizer = load_tokenizer(hf_dir)
    model, _ = load_params_checkpoint(ckpt, mesh=mesh)
    if step_ids:
        step = StepTokens.from_tokenizer(tokenizer, step_text=[int(i) for i in step_ids])
    else:
        step = StepTokens.from_tokenizer(tokenizer)
    return model, tokenizer, step
