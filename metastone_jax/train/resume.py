"""Resuming a run: the newest intact checkpoint, checked against this run before any array is read.

`restore_newest` walks the saved steps newest first. A damaged step (a file missing, truncated
or unreadable: train/checkpoint_integrity.py, or a restore that fails reading the step's files)
is reported in one line naming the step and the file, set aside (renamed, never deleted) and
the next older step is tried; when none is left, the run stops naming the workdir. Before the
arrays are restored, the step's saved model config and tensor shapes are compared with this
run's, so a changed setting is named rather than surfacing as an orbax shape error.

Several processes: process 0 checks the files and sets steps aside, the others take its answer.
A restore that fails after the file check stops a multi-process run (naming the step) instead
of falling back, since the processes could not agree on the failure without risking a hang.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from metastone_jax.checkpoint import first_line
from metastone_jax.train.checkpoint import TrainCheckpointer, tensor_shapes
from metastone_jax.train.checkpoint_integrity import step_damage
from metastone_jax.train.setup import RUNTIME_FIELDS
from metastone_jax.train.state import TrainState

_NONE_LEFT, _FAILED = -2, -3  # process 0's answers: every step damaged; could not set aside


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(f"metastone-jax train: {message}", file=sys.stderr, flush=True)


def restore_newest(
    ckpt: TrainCheckpointer,
    target: TrainState,
    model_cfg_json: dict,
    run_config: dict[str, Any],
    *,
    workdir: str,
) -> tuple[TrainState, dict] | None:
    """(state, data iterator state) of the newest intact step, or None when nothing was saved.

    `target` is the abstract TrainState (shapes and shardings of this run's mesh);
    `model_cfg_json` / `run_config` this run's model config and whole config (as saved in meta).
    Raises ValueError naming the setting or tensor that differs, or the workdir when every
    saved step is damaged."""
    set_aside: list[str] = []
    while True:
        step = _newest_intact(ckpt, set_aside)
        if step is None:
            if set_aside:
                raise ValueError(
                    f"no intact checkpoint to resume from in {workdir} (set aside: "
                    f"{', '.join(set_aside)}); re-running starts from step 0, or use a new "
                    "--workdir"
                )
            return None
        where = f"step {step} in {ckpt.directory}"
        try:
            saved_meta, stored = ckpt.read_meta(step), ckpt.stored_shapes(step)
        except Exception as e:
            set_aside.append(_unreadable(ckpt, step, e))
            continue
        check_compatible(saved_meta, stored, model_cfg_json, run_config, target, where=where)
        try:
            state, data_state, _ = ckpt.restore(step, target)
        except Exception as e:
            set_aside.append(_unreadable(ckpt, step, e))
            continue
        return state, data_state


def _unreadable(ckpt: TrainCheckpointer, step: int, error: Exception) -> str:
    """Sets aside a step that passed the file check but failed to read; an error that is not
    about the step's files (or any error with several processes) stops the run instead."""
    reason = first_line(_root_cause(error))
    if jax.process_count() > 1 or not _reads_step_files(error, ckpt.step_dir(step)):
        raise ValueError(f"cannot restore step {step} in {ckpt.directory}: {reason}") from None
    return _set_aside(ckpt, step, reason)


def _causes(error: BaseException) -> list[BaseException]:
    chain = [error]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) and nxt not in chain:
        chain.append(nxt)
    return chain


def _root_cause(error: BaseException) -> BaseException:
    """The innermost error (orbax wraps tensorstore's, which names the tensor and the file)."""
    return _causes(error)[-1]


def _reads_step_files(error: Exception, step_dir: str) -> bool:
    """A failure to read the step's own files (as opposed to, e.g., running out of memory)."""
    where = step_dir.rstrip("/") + "/"
    return any(isinstance(e, OSError) or where in str(e) for e in _causes(error))


def _set_aside(ckpt: TrainCheckpointer, step: int, reason: str) -> str:
    try:
        moved = ckpt.set_aside(step)
    except Exception as e:  # e.g. a gs:// directory the filesystem layer cannot rename
        raise ValueError(
            f"step {step} in {ckpt.directory} is damaged ({reason}) and could not be set aside "
            f"({first_line(e)}); move {ckpt.step_dir(step)} away by hand and re-run"
        ) from None
    _say(f"step {step} in {ckpt.directory} is damaged: {reason}; set aside as {moved}")
    return f"step {step} -> {moved}"


def _newest_intact(ckpt: TrainCheckpointer, set_aside: list[str]) -> int | None:
    """The newest step whose files are all there, setting damaged ones aside (process 0)."""
    if jax.process_count() == 1:
        return _check_steps(ckpt, set_aside)
    step, failure = None, None
    if jax.process_index() == 0:
        try:
            step = _check_steps(ckpt, set_aside)
        except ValueError as e:  # raised after the others have the answer: no one waits forever
            failure = e
    answer = -1 if step is None else step
    if failure is not None:
        answer = _FAILED
    elif step is None and set_aside:
        answer = _NONE_LEFT
    answer = int(multihost_utils.broadcast_one_to_all(np.int64(answer)))
    if failure is not None:
        raise failure
    if answer == _FAILED:
        raise ValueError(f"process 0 could not set a damaged step aside in {ckpt.directory}")
    ckpt.reload()  # process 0 may have renamed steps
    if answer == _NONE_LEFT and not set_aside:
        set_aside.append("see process 0's log")
    return answer if answer >= 0 else None


def _check_steps(ckpt: TrainCheckpointer, set_aside: list[str]) -> int | None:
    for step in sorted(ckpt.all_steps(), reverse=True):
        damage = step_damage(ckpt.step_dir(step))
        if damage is None:
            return step
        set_aside.append(_set_aside(ckpt, step, damage))
    return None


def check_compatible(
    saved_meta: dict,
    stored: dict[str, tuple[int, ...]],
    model_cfg_json: dict,
    run_config: dict[str, Any],
    target: TrainState,
    *,
    where: str,
) -> None:
    """Raises ValueError naming the first model setting, else tensor, in which the checkpoint
    differs from this run. Runtime fields (setup.RUNTIME_FIELDS: remat, scan, dtypes) may
    change: they leave the saved arrays' shapes alone (a dtype is cast on restore)."""
    saved = saved_meta.get("model", {})
    keys = sorted(set(saved) | set(model_cfg_json))
    diff = [k for k in keys if k not in RUNTIME_FIELDS and saved.get(k) != model_cfg_json.get(k)]
    if diff:
        first = diff[0]
        more = f" (also {', '.join(diff[1:])})" if len(diff) > 1 else ""
        raise ValueError(
            f"config.model.{first}: {where} was trained with {saved.get(first)!r}, this run has "
            f"{model_cfg_json.get(first)!r}{more}; resume with the same model or use a new "
            "--workdir"
        )
    expected = tensor_shapes(target)
    problem = _tree_difference(stored, expected)
    if problem:
        changed = _changed_settings(saved_meta.get("config", {}), run_config)
        hint = f"; settings changed since: {changed}" if changed else ""
        raise ValueError(
            f"{where} does not fit this run's train state: {problem}{hint}; resume with the "
            "same config or use a new --workdir"
        )


def _tree_difference(stored: dict, expected: dict) -> str | None:
    only_saved = sorted(set(stored) - set(expected))
    only_run = sorted(set(expected) - set(stored))
    if only_saved:
        return f"{len(only_saved)} saved tensors this run does not have (first: {only_saved[0]})"
    if only_run:
        return f"{len(only_run)} tensors the checkpoint lacks (first: {only_run[0]})"
    for name in sorted(expected):
        if tuple(stored[name]) != tuple(expected[name]):
            return f"{name} has shape {stored[name]} saved, {expected[name]} in this run"
    return None


def _flatten(tree: Any, prefix: str = "config") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}"))
    return out


def _changed_settings(saved: dict, current: dict, limit: int = 4) -> str:
    """The config keys whose value differs from the saved run's ('config.kind: 'sft' -> ...')."""
    a, b = _flatten(saved), _flatten(current)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    keys = [k for k in keys if not k.startswith("config.train.")]  # never shape the state
    shown = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:limit]]
    return ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
