"""Train checkpoints: an orbax CheckpointManager over WORKDIR/checkpoints/<step>/.

Each step holds three items: `state` (the whole TrainState: params, optimizer, reference policy,
RNG), `data` (the data iterator's position, JSON) and `meta` (the run's config, JSON). Saves are
asynchronous (the train loop goes on while arrays are written); keep-last-N plus the best one by
a chosen metric. Orbax writes each step to a temporary directory and renames it when complete, so
a run killed mid-save leaves the previous steps restorable. `gs://` workdirs go straight to orbax.
Every process takes part in saving and restoring.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as managers

from metastone_jax.train.state import TrainState

CHECKPOINTS_DIR = "checkpoints"


def _as_tree(state: TrainState) -> dict[str, Any]:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


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
        self.manager = ocp.CheckpointManager(
            path, item_names=("state", "data", "meta"), options=options
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

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
