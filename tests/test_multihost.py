"""Two processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo collectives) train like one
process with 8 devices: same losses step for step, through a checkpoint save and a restore."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
from config_files import train_config
from tolerances import fp32_reduction_tol

from metastone_jax.train.loop import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["train", "--config=configs/train.py:tiny-sft", "--config.train.progress=False",
         "--config.train.save_every=3"]  # fmt: skip


def _env(devices: int, **extra) -> dict:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k.endswith("CACHE_DIR")
    }
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.update(extra)
    return env


def _run(args, env):
    cmd = [sys.executable, "-m", "metastone_jax.main", *args]
    pipe = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.Popen(cmd, cwd=REPO, env=env, **pipe)


def _wait(procs, timeout=300):
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append(out)
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outs


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(args):
    port = _free_port()
    procs = [
        _run(
            args,
            _env(
                4,
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
            ),
        )  # fmt: skip
        for i in range(2)
    ]
    return _wait(procs)


def test_two_processes_match_one_process_through_save_and_restore(tmp_path):
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    # One process, 8 devices (this one's: tests/conftest.py): 6 steps (it also trains the
    # tokenizer both runs share).
    train(train_config("tiny-sft", train={"save_every": 3, "steps": 6}), single)
    tokenizer = f"--config.tokenizer.path={os.path.join(single, 'tokenizer')}"
    # Two processes, 4 devices each: 3 steps and a checkpoint, then a restart that restores it.
    _two_processes([*TRAIN, f"--workdir={multi}", tokenizer, "--config.train.steps=3"])
    outs = _two_processes([*TRAIN, f"--workdir={multi}", tokenizer, "--config.train.steps=6"])
    assert "export skipped" in outs[0]  # multi-process: the checkpoint holds the params
    want, got = _losses(single), _losses(multi)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    # Both runs execute one SPMD program per device on the same 8-device mesh; what differs is
    # the order in which gloo (across processes) or one process adds the 8 devices' partial
    # losses and gradients: 2 sums of 8 terms per step, and step s's loss carries s steps of
    # them (an update passes its gradient's relative change on with gain ~1; Adam entries whose
    # gradient is at rounding level move the loss only to second order).
    for s in range(1, 7):
        rtol = fp32_reduction_tol(2 * 8 * s, 1.0)  # one-signed means: relative to the loss
        np.testing.assert_allclose(got[s], want[s], rtol=rtol, err_msg=f"step {s}")
    steps = sorted(int(d) for d in os.listdir(os.path.join(multi, "checkpoints")) if d.isdigit())
    assert steps[-1] == 6 and 3 in steps
