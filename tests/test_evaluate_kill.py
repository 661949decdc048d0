"""`metastone-jax evaluate` killed with SIGKILL mid-run, then resumed: the pool file equals an
uninterrupted run's byte for byte (a real process kill, not a simulated torn line)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_evaluate import STEP_IDS  # ids standing in for ".\n\n": random text has scored steps
from test_sample_cli import ckpt  # noqa: F401  (fixture: tiny Qwen2 checkpoint + BPE tokenizer)
from test_tokenizer import bpe_dir  # noqa: F401

# Sizes: fewer slots than samples, so the engine finishes questions one after another (each
# after ~2 x MAX_NEW decode steps) and their lines reach the pool file spread over the run:
# measured here ~60 ms apart, ~3 s from the first line to the last once programs are cached
# (the CLI's start, ~7 s, is not in that window). The run is killed at KILL_AT lines, with
# ~2 s of lines still to come.
N_QUESTIONS = 48
SAMPLES = 4
SLOTS = 2
MAX_NEW = 96
KILL_AT = N_QUESTIONS // 4
RUN_TIMEOUT_S = 240  # one CLI run; a hang fails the test instead of blocking it


def cli_command(ckpt, bench, out):  # noqa: F811
    step = ",".join(map(str, STEP_IDS))
    return [sys.executable, "-m", "metastone_jax.main", "evaluate", f"--ckpt={ckpt}",
            f"--benchmark={bench}", f"--out={out}", "--modes=low", f"--samples={SAMPLES}",
            f"--max_new_tokens={MAX_NEW}", f"--step_ids={step}", "--temperature=1.0",
            f"--slots={SLOTS}", "--page_size=8", "--seed=3", "--no_progress",
            "--json"]  # fmt: skip


def cli_env():
    """The tests' environment (conftest: 8 CPU devices, JAX_PLATFORMS=cpu) plus their persistent
    compile cache, so that the second and third runs load the first one's programs."""
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR",
                   os.environ.get("JAX_CACHE_DIR", "/tmp/metastone-jax-cache"))  # fmt: skip
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    return env


def run_to_end(cmd, log):
    t = time.monotonic()
    with open(log, "wb") as f:
        res = subprocess.run(cmd, env=cli_env(), stdout=f, stderr=subprocess.STDOUT,
                             timeout=RUN_TIMEOUT_S)  # fmt: skip
    assert res.returncode == 0, f"evaluate failed (rc {res.returncode}):\n{log.read_text()}"
    return time.monotonic() - t


def complete_lines(path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_evaluate_killed_mid_run_resumes_to_the_same_pool(ckpt, tmp_path):  # noqa: F811
    bench = tmp_path / "bench.jsonl"
    with open(bench, "w") as f:
        for i in range(N_QUESTIONS):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"What is {i} + {2 * i}?",
                                "answer": str(3 * i)}) + "\n")  # fmt: skip
    times = {}

    # Uninterrupted: the reference.
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    times["uninterrupted"] = run_to_end(cli_command(ckpt, bench, ref_dir), tmp_path / "ref.log")
    reference = (ref_dir / "candidates.jsonl").read_bytes()
    assert reference.count(b"\n") == N_QUESTIONS

    # The same command, killed with SIGKILL once KILL_AT lines are written (some, not all).
    pool = cut_dir / "candidates.jsonl"
    log = tmp_path / "cut.log"
    t = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cli_command(ckpt, bench, cut_dir), env=cli_env(), stdout=f,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        while proc.poll() is None and time.monotonic() - t < RUN_TIMEOUT_S:
            if complete_lines(pool) >= KILL_AT:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        else:
            pytest.fail(
                f"evaluate exited (rc {proc.returncode}) or timed out before it could be killed "
                f"mid-run: raise N_QUESTIONS\n{log.read_text()}"
            )
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    times["killed"] = time.monotonic() - t
    assert rc == -signal.SIGKILL
    kept = complete_lines(pool)
    assert 1 <= kept < N_QUESTIONS, f"killed after {kept} of {N_QUESTIONS} lines: not mid-run"
    cut = pool.read_bytes()
    assert reference.startswith(cut[: cut.rindex(b"\n") + 1])  # what was written is the prefix

    # Resumed: the same command again, to completion.
    times["resumed"] = run_to_end(cli_command(ckpt, bench, cut_dir), tmp_path / "resume.log")
    assert pool.read_bytes() == reference
    meta = "candidates.meta.json"
    assert (cut_dir / meta).read_bytes() == (ref_dir / meta).read_bytes()
    ids = [json.loads(line)["id"] for line in reference.splitlines()]
    assert ids == [f"q{i}" for i in range(N_QUESTIONS)]  # unique, in question order
    # metrics.json holds no time or out dir (ckpt and benchmark paths are the same): all equal.
    ref_metrics = json.loads((ref_dir / "metrics.json").read_text())
    assert json.loads((cut_dir / "metrics.json").read_text()) == ref_metrics
    torn = len(cut) - cut.rindex(b"\n") - 1
    print(f"\nkilled after {kept}/{N_QUESTIONS} lines (+{torn} torn bytes); wall s: "
          + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))  # fmt: skip
