"""MetricsWriter: JSONL records, resume truncation, disabled writer, TensorBoard scalars."""

import glob
import json
import math
import os
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from metastone_jax.train.metrics import MetricsWriter, read_metrics


def read_events(logdir):
    """(tag, step, value) of every scalar in the event files under ``logdir``.

    Neither tensorboardX nor an installed tensorboard offers a reader here, so parse the TFRecord
    framing directly: u64 length, u32 length crc, payload (an Event proto), u32 payload crc.
    """
    out = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            payload = data[pos + 12 : pos + 12 + length]
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            for v in event.summary.value:
                out.append((v.tag, event.step, v.simple_value))
    return out


def test_jsonl_and_tensorboard(tmp_path):
    wd = str(tmp_path / "run")
    with MetricsWriter(wd, enabled=True, total_steps=3, progress=False) as w:
        w.write(1, {"loss": 0.5, "reward": np.float32(0.25)})
        w.write(2, {"loss": float("nan"), "reward": 1, "kl": np.array(float("inf"))})
        # flushed per line: readable before close
        assert [r["step"] for r in read_metrics(os.path.join(wd, "metrics.jsonl"))] == [1, 2]
    lines = open(os.path.join(wd, "metrics.jsonl")).read().splitlines()
    assert json.loads(lines[0]) == {"step": 1, "loss": 0.5, "reward": 0.25}
    assert json.loads(lines[1]) == {"step": 2, "loss": None, "reward": 1.0, "kl": None}
    assert "NaN" not in lines[1] and "Infinity" not in lines[1]  # strict JSON

    events = read_events(os.path.join(wd, "tensorboard"))
    assert ("loss", 1, 0.5) in events and ("reward", 1, 0.25) in events
    assert ("reward", 2, 1.0) in events
    nan_loss = [v for t, s, v in events if t == "loss" and s == 2]
    assert len(nan_loss) == 1 and math.isnan(nan_loss[0])


def test_resume_drops_steps_from_start_step(tmp_path):
    wd = str(tmp_path)
    with MetricsWriter(wd, enabled=True, progress=False) as w:
        for step in range(1, 6):
            w.write(step, {"loss": step / 10})
    # a kill mid-write leaves a torn last line
    with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
        f.write('{"step": 6, "lo')
    with MetricsWriter(wd, enabled=True, start_step=3, progress=False) as w:
        assert [r["step"] for r in read_metrics(w.path)] == [1, 2]
        w.write(3, {"loss": 3.0})
    recs = read_metrics(os.path.join(wd, "metrics.jsonl"))
    assert recs == [{"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2}, {"step": 3, "loss": 3.0}]
    assert not [p for p in os.listdir(wd) if p.endswith(".tmp")]


def test_resume_without_existing_file(tmp_path):
    with MetricsWriter(str(tmp_path), enabled=True, start_step=10, progress=False) as w:
        w.write(10, {"loss": 1.0})
    assert read_metrics(os.path.join(tmp_path, "metrics.jsonl")) == [{"step": 10, "loss": 1.0}]


def test_disabled_writer_writes_nothing(tmp_path):
    wd = tmp_path / "off"
    w = MetricsWriter(str(wd), enabled=False, start_step=5)
    w.write(1, {"loss": 1.0})
    w.close()
    assert not wd.exists()


def test_default_enabled_is_process_zero(tmp_path):
    with MetricsWriter(str(tmp_path), progress=False) as w:
        assert w.enabled  # single process: index 0


def test_rejects_non_scalar_and_step_key(tmp_path):
    with MetricsWriter(str(tmp_path), enabled=True, progress=False) as w:
        with pytest.raises(ValueError):
            w.write(1, {"loss": np.ones(2)})
        with pytest.raises(ValueError):
            w.write(1, {"step": 1.0})


def test_progress_bar_position(tmp_path, capsys):
    with MetricsWriter(str(tmp_path), enabled=True, total_steps=10, start_step=2) as w:
        w.write(4, {"loss": 0.123456, "reward": 0.5, "other": 1.0})
        assert w._bar.n == 4
        assert w._bar.postfix is not None and "loss=0.1235" in w._bar.postfix
