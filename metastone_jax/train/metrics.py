"""Training metrics: one JSON line per step, TensorBoard scalars and a tqdm bar.

Files under ``workdir``: ``metrics.jsonl`` ({"step": s, "name": value, ...} per line, flushed
per line so a killed run keeps everything it logged) and ``tensorboard/`` (tensorboardX event
files). JSON has no NaN/inf: non-finite values are written as ``null`` (TensorBoard gets the
raw value). Only process 0 writes by default; a disabled writer creates nothing.

A gs:// workdir: an object store cannot append, and tensorboardX cannot write there. The JSONL
is a files.AppendLog (the object rewritten at most every ``flush_secs``), and the event files
are written to a local staging directory and copied up to WORKDIR/tensorboard as often, and on
flush() and close(). A killed run then loses at most its last ``flush_secs`` of metrics.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tqdm
from etils import epath

from metastone_jax import files, optional

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"
# Metrics shown on the progress bar when present (in this order); otherwise the first few.
POSTFIX_KEYS = ("loss", "reward", "spr_loss", "score_gap", "kl")
POSTFIX_MAX = 4


def _lines_and_records(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for every line of a metrics.jsonl. An unparsable *last* line (a write cut
    short by a kill) is skipped; a bad line elsewhere raises."""
    lines = [ln for ln in epath.Path(path).read_text().splitlines() if ln.strip()]
    out = []
    for i, ln in enumerate(lines):
        try:
            out.append((ln, json.loads(ln)))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return out


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (a torn last line skipped)."""
    return [rec for _, rec in _lines_and_records(path)]


def _truncate(path: str, start_step: int) -> None:
    """Drop records with step >= start_step (and a torn last line), atomically."""
    if not epath.Path(path).exists():
        return
    keep = [ln for ln, rec in _lines_and_records(path) if rec.get("step", -1) < start_step]
    files.write_text(path, "".join(ln + "\n" for ln in keep))


def _to_float(v: Any) -> float:
    """Python float from a Python/numpy/jax scalar (a jax array is fetched to host here)."""
    a = np.asarray(v)
    if a.size != 1:
        raise ValueError(f"metric value must be a scalar, got shape {a.shape}")
    return float(a.reshape(()))


def _fmt(v: float) -> str:
    return "nan" if not math.isfinite(v) else f"{v:.4g}"


class MetricsWriter:
    """Per-step metrics to JSONL + TensorBoard + tqdm.

    ``start_step > 0`` (a resumed run) first drops records with step >= start_step from an
    existing metrics.jsonl, since a killed run may have logged steps after its last checkpoint
    that will be recomputed; TensorBoard is told the same through ``purge_step``.
    ``enabled=None`` means ``jax.process_index() == 0``.
    """

    def __init__(
        self,
        workdir: str,
        *,
        enabled: bool | None = None,
        total_steps: int | None = None,
        start_step: int = 0,
        progress: bool = True,
        desc: str = "train",
        flush_secs: int = 30,
    ):
        if enabled is None:
            enabled = jax.process_index() == 0
        self.enabled = bool(enabled)
        self.path = os.path.join(workdir, METRICS_FILE)
        self.tb_dir = os.path.join(workdir, TB_DIR)
        self.remote = files.is_remote(workdir)
        self._file = self._tb = self._bar = None
        if not self.enabled:
            return
        self.flush_secs = flush_secs
        if not self.remote:
            os.makedirs(workdir, exist_ok=True)
        if start_step > 0:
            _truncate(self.path, start_step)
        self._file = files.AppendLog(self.path, flush_secs=flush_secs)
        # Remote: tensorboardX writes locally, and _sync_tb copies its files up.
        self._tb_stage = tempfile.mkdtemp(prefix="metastone-tb-") if self.remote else None
        self._tb_sizes: dict[str, int] = {}  # remote: event file -> the size copied up
        self._tb_synced = time.monotonic()
        self._tb = optional.tensorboardx().SummaryWriter(  # heavy-ish import: only where we write
            self._tb_stage or self.tb_dir,
            purge_step=start_step if start_step > 0 else None,
            flush_secs=flush_secs,
            # Remote: a unique name, so that a run restarted within the second (the name's
            # timestamp) does not overwrite the earlier run's uploaded file.
            filename_suffix=f".{uuid.uuid4().hex[:8]}" if self.remote else "",
        )
        self._bar = tqdm.tqdm(
            total=total_steps, initial=start_step, desc=desc, disable=not progress, leave=True
        )

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log scalar ``metrics`` for ``step`` (values: Python/numpy/jax scalars)."""
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("MetricsWriter is closed")
        if "step" in metrics:
            raise ValueError("'step' is reserved in metrics")
        step = int(step)
        values = {str(k): _to_float(v) for k, v in metrics.items()}
        rec = {"step": step, **{k: v if math.isfinite(v) else None for k, v in values.items()}}
        self._file.append(json.dumps(rec, allow_nan=False) + "\n")
        for k, v in values.items():
            self._tb.add_scalar(k, v, step)
        if self.remote and time.monotonic() - self._tb_synced >= self.flush_secs:
            self._tb.flush()
            self._sync_tb()
        self._update_bar(step, values)

    def _sync_tb(self) -> None:
        """Remote workdir: the staged event files that grew, copied up (each a whole object)."""
        for name in sorted(os.listdir(self._tb_stage)):
            local = os.path.join(self._tb_stage, name)
            if not os.path.isfile(local):
                continue
            size = os.path.getsize(local)
            if self._tb_sizes.get(name) != size:
                with open(local, "rb") as f:
                    files.write_bytes(os.path.join(self.tb_dir, name), f.read())
                self._tb_sizes[name] = size
        self._tb_synced = time.monotonic()

    def _update_bar(self, step: int, values: dict[str, float]) -> None:
        keys = [k for k in POSTFIX_KEYS if k in values] or list(values)
        post = {k: _fmt(values[k]) for k in keys[:POSTFIX_MAX]}
        self._bar.set_postfix(post, refresh=False)
        # position = step (the bar counts steps done, so a resumed run starts at start_step).
        self._bar.update(step - self._bar.n)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            self._tb.flush()
            if self.remote:
                self._sync_tb()

    def close(self) -> None:
        if not self.enabled or self._file is None:
            return
        self._file.close()
        self._tb.close()
        if self.remote:
            self._sync_tb()
            shutil.rmtree(self._tb_stage, ignore_errors=True)
        self._bar.close()
        self._file = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
