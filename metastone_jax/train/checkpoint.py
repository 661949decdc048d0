"""Train checkpoints: an orbax CheckpointManager over WORKDIR/checkpoints/<step>/.

Each step holds three items: `state` (the whole TrainState: params, optimizer, reference policy,
RNG), `data` (the data iterator's position, JSON) and `meta` (the run's config, JSON). Saves are
asynchronous (the train loop goes on while arrays are written); keep-last-N plus the best one by
a chosen metric. Orbax writes each step to a temporary directory and renames it when complete, so
a run killed mid-save leaves the previous steps restorable. `gs://` workdirs go straight to orbax.
Every process takes part in saving and restoring. A damaged step (train/checkpoint_integrity.py)
is set aside by renaming it to `<step>.damaged-<UTC time>`, a name orbax does not take for a step.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as managers

from metastone_jax.checkpoint import shapes_by_name
from metastone_jax.train.state import TrainState

CHECKPOINTS_DIR = "checkpoints"


def _as_tree(state: TrainState) -> dict[str, Any]:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def tensor_shapes(state: TrainState) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a (possibly abstract) TrainState, named as orbax saves it."""
    return shapes_by_name(_as_tree(state))


class TrainCheckpointer:
    """Save/restore (TrainState, data iterator state, meta) by step."""

    def __init__(
        self,
        workdir: str,
        *,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "min",
        asynchronous: bool = True,
    ):
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode {best_mode!r}; expected 'min' or 'max'")
        self.best_metric = best_metric
        policies: list[managers.PreservationPolicy] = [managers.LatestN(keep)]
        if best_metric:
            policies.append(
                managers.BestN(
                    get_metric_fn=lambda m: m[best_metric],
                    # BestN keeps the tail of the sorted order: ascending keeps the largest.
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=asynchronous,
            cleanup_tmp_directories=True,
        )
        path = workdir.rstrip("/") + "/" + CHECKPOINTS_DIR
        if not path.startswith("gs://"):
            path = os.path.abspath(path)
        self.directory = path
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }  # registered up front, so that one item's metadata can be read before a restore
        self.manager = ocp.CheckpointManager(path, item_handlers=handlers, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def step_dir(self, step: int) -> str:
        return f"{self.directory}/{step}"

    def read_meta(self, step: int) -> dict:
        """The run config saved with `step` (the `meta` item alone; no arrays are read)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def stored_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """{tensor name: shape} of the TrainState saved with `step`, from its tree metadata."""
        return shapes_by_name(self.manager.item_metadata(step)["state"])

    def set_aside(self, step: int) -> str:
        """Renames the step's directory to `<step>.damaged-<UTC time>` (nothing is deleted) and
        forgets the step; returns the new path. Call it on one process only."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        source = epath.Path(self.step_dir(step))
        target = source.parent / f"{step}.damaged-{stamp}"
        suffix = 1
        while target.exists():
            target, suffix = source.parent / f"{step}.damaged-{stamp}-{suffix}", suffix + 1
        source.rename(target)
        self.manager.reload()
        return target.as_posix()

    def reload(self) -> None:
        """Re-reads the step list (after another process set a step aside)."""
        self.manager.reload()

    def save(
        self,
        step: int,
        state: TrainState,
        data_state: dict,
        meta: dict,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Starts an asynchronous save of `step` (waits for the previous one first)."""
        if self.best_metric:
            value = (metrics or {}).get(self.best_metric)
            # Orbax ranks by this value; a missing or non-finite one is not a candidate for best.
            ok = value is not None and math.isfinite(value)
            metrics = {self.best_metric: float(value)} if ok else None
        else:
            metrics = None
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_as_tree(state)),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            metrics=metrics,
            force=True,
        )

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict, dict]:
        """Restores `step` into `target`: an abstract TrainState of ShapeDtypeStructs carrying
        the shardings of the *current* mesh (a different mesh than at save time is fine)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_as_tree(target)),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return TrainState(**restored["state"]), restored["data"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
