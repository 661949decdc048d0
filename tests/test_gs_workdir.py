"""A run whose --workdir is gs:// keeps all of itself there: checkpoints, the tokenizer it trains,
metrics, TensorBoard events and the export (tests/fake_gcs.py maps gs://bucket onto a local
directory for epath and for orbax's tensorstore). The same run on local disk is the reference."""

from __future__ import annotations

import os
import struct

import jax
import numpy as np
import pytest
from config_files import train_config
from tensorboardX.proto import event_pb2

from metastone_jax.checkpoint import load_params_numpy
from metastone_jax.train.loop import train
from metastone_jax.train.metrics import read_metrics
from metastone_jax.train.workdir_lock import WorkdirLock, WorkdirLocked

TIMINGS = ("step_time_s", "tokens_per_s")


def _scalars(tb_dir: str) -> dict[tuple[str, int], float]:
    """(tag, step) -> value of every scalar in the TFRecord event files under `tb_dir`."""
    out = {}
    for name in sorted(os.listdir(tb_dir)):
        data = open(os.path.join(tb_dir, name), "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4  # length, its crc, the record, its crc
            for value in event.summary.value:
                out[(value.tag, event.step)] = value.simple_value
    return out


def test_a_gs_workdir_holds_the_whole_run(fake_gcs, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(fake_gcs / "cache"))  # the dataset cache
    config = train_config("tiny-sft", train={"steps": 2, "save_every": 1})
    local = str(fake_gcs / "local")
    train(config, local)
    train(config, "gs://bucket/runs/sft")

    run = fake_gcs / "bucket" / "runs" / "sft"
    assert {"checkpoints", "metrics.jsonl", "tensorboard", "export", "tokenizer"} <= set(
        os.listdir(run)
    )
    assert not (run / "train.lock").exists()  # released at the end
    assert sorted(os.listdir(fake_gcs)) == ["bucket", "cache", "local"]  # nothing elsewhere

    remote_metrics = read_metrics(str(run / "metrics.jsonl"))
    local_metrics = read_metrics(os.path.join(local, "metrics.jsonl"))
    assert [m["step"] for m in remote_metrics] == [1, 2]

    # the same computation on the same machine: every logged value but the timings agrees
    def untimed(records):
        return [{k: v for k, v in m.items() if k not in TIMINGS} for m in records]

    assert untimed(remote_metrics) == untimed(local_metrics)
    events = _scalars(str(run / "tensorboard"))
    for m in remote_metrics:
        assert np.float32(events[("loss", m["step"])]) == np.float32(m["loss"])

    _, remote_params, _ = load_params_numpy(str(run / "export"))
    _, local_params, _ = load_params_numpy(os.path.join(local, "export"))
    assert jax.tree.structure(remote_params) == jax.tree.structure(local_params)
    jax.tree.map(np.testing.assert_array_equal, remote_params, local_params)
    assert os.path.isfile(run / "export" / "hf" / "tokenizer.model")

    # Resuming reads the checkpoint, the tokenizer and the metrics back from the bucket.
    more = train_config("tiny-sft", train={"steps": 3, "save_every": 1})
    train(more, "gs://bucket/runs/sft")
    assert [m["step"] for m in read_metrics(str(run / "metrics.jsonl"))] == [1, 2, 3]
    assert ("loss", 3) in _scalars(str(run / "tensorboard"))


def test_a_gs_workdir_lock_refuses_a_second_run_and_takes_over_a_dead_ones(fake_gcs):
    lock = fake_gcs / "bucket" / "w" / "train.lock"
    with WorkdirLock("gs://bucket/w"):
        assert lock.is_file()
        with pytest.raises(WorkdirLocked, match="in use by a running train"):
            WorkdirLock("gs://bucket/w").acquire()
    assert not lock.exists()
    dead = WorkdirLock("gs://bucket/w")
    dead.acquire()  # a run killed outright: its lock stays, naming a pid that is gone
    lock.write_text(lock.read_text().replace(f'"pid": {os.getpid()}', '"pid": 999999999'))
    with WorkdirLock("gs://bucket/w") as taken:
        assert taken.held and f'"pid": {os.getpid()}' in lock.read_text()
