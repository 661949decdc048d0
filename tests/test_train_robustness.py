"""`metastone-jax train` on a bad workdir or config, through the CLI entry point: a damaged newest
checkpoint is set aside and the run resumes from the newest intact one; a changed model is
named before any array is read; out-of-range settings and a file as --workdir are refused at
load; a second run on a workdir is refused while the first holds its lock. Every refusal is one
line without a traceback."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
from config_files import config_module

from metastone_jax.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "configs", "train.py")
ARGS = [
    f"--config={TRAIN}:tiny-sft",
    "--config.train.save_every=2",
    "--config.train.progress=False",
    "--config.train.export=False",
]
SAVED = (2, 4)  # the trained fixture's checkpoints (4 steps, one every 2)


def _train(workdir, *extra):
    main(["metastone-jax", "train", f"--workdir={workdir}", *ARGS, *extra])


def _refusal(workdir, *extra) -> str:
    """The one-line SystemExit message of a refused run."""
    with pytest.raises(SystemExit) as info:
        _train(workdir, *extra)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _files(directory):
    return sorted(
        os.path.relpath(os.path.join(d, f), directory)
        for d, _, names in os.walk(directory)
        for f in names
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 SFT steps, checkpoints at steps 2 and 4; the pristine copy each test starts from."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    _train(workdir, "--config.train.steps=4")
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    return workdir


@pytest.fixture
def run(trained, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    return workdir


# --- item 3: a damaged newest checkpoint -------------------------------------------------------


def _remove(*patterns):
    """Deletes the step directory's files matching any regex (paths relative to the step)."""

    def damage(step_dir):
        gone = [f for f in _files(step_dir) if any(re.fullmatch(p, f) for p in patterns)]
        assert gone, (patterns, _files(step_dir))
        for f in gone:
            os.remove(os.path.join(step_dir, f))
        return gone

    return damage


def _zero_values(step_dir):
    """Overwrites the array bytes (same length) so that only a restore can tell."""
    files = [f for f in _files(step_dir) if re.fullmatch(r"state/ocdbt\.process_\d+/d/\w+", f)]
    for f in files:
        path = os.path.join(step_dir, f)
        size = os.path.getsize(path)
        with open(path, "wb") as out:
            out.write(b"\0" * size)
    return []


def _empty(step_dir):
    gone = _files(step_dir)
    for name in os.listdir(step_dir):
        path = os.path.join(step_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return gone


DAMAGE = {
    "state/_METADATA": (_remove(r"state/_METADATA"), r"state/_METADATA is missing"),
    "data/metadata": (_remove(r"data/metadata"), r"data/metadata is missing"),
    "manifest.ocdbt": (_remove(r"state/manifest\.ocdbt"), r"state/manifest\.ocdbt is missing"),
    "a file under d/": (_remove(r"state/d/\w+"), r"state/d/\w+ is missing"),
    "the array files": (
        _remove(r"state/ocdbt\.process_\d+/d/\w+"),
        r"state/ocdbt\.process_\d+/d/\w+ is missing",
    ),
    "emptied": (_empty, r"the step directory is empty"),
    "zeroed array bytes": (_zero_values, r"\w+: Error reading .* in OCDBT database"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_newest_step_is_set_aside_and_the_run_resumes(trained, run, case, capfd):
    damage, reason = DAMAGE[case]
    checkpoints = os.path.join(run, "checkpoints")
    before = _files(os.path.join(checkpoints, "4"))
    gone = damage(os.path.join(checkpoints, "4"))
    capfd.readouterr()
    # steps=2: the resumed step is the last, so nothing is trained (no compile) after restoring.
    _train(run, "--config.train.steps=2")
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "is damaged" in ln]
    assert len(lines) == 1, err
    assert re.search(rf"step 4 in {re.escape(checkpoints)} is damaged: {reason}", lines[0]), err
    aside = [d for d in os.listdir(checkpoints) if d != "2"]
    assert len(aside) == 1 and re.fullmatch(r"4\.damaged-\d{8}T\d{6}Z", aside[0]), aside
    assert aside[0] in lines[0]
    # Set aside, not deleted: every file that was not removed is still there.
    assert _files(os.path.join(checkpoints, aside[0])) == [f for f in before if f not in gone]
    # Resumed from step 2 (nothing retrained): the log keeps steps 1-2 of the original run.
    assert _metrics(run) == _metrics(trained)[:2]


def test_resumed_run_after_a_damaged_step_reproduces_the_original(trained, run):
    os.remove(os.path.join(run, "checkpoints", "4", "state", "_METADATA"))
    _train(run, "--config.train.steps=4")
    got, want = _metrics(run), _metrics(trained)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for g, w in zip(got[2:], want[2:], strict=True):
        # Same program, data and state on the same devices: equal but for the recompile's
        # reduction order, which XLA keeps fixed on CPU (test_train_resume.py uses the same bound).
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-6), (g["step"], g["loss"], w["loss"])
    assert sorted(os.listdir(os.path.join(run, "checkpoints")))[:2] == ["2", "4"]


def test_no_intact_step_fails_naming_the_workdir(run):
    checkpoints = os.path.join(run, "checkpoints")
    os.remove(os.path.join(checkpoints, "4", "state", "manifest.ocdbt"))
    os.remove(os.path.join(checkpoints, "2", "meta", "metadata"))
    message = _refusal(run, "--config.train.steps=4")
    assert f"no intact checkpoint to resume from in {run} " in message
    names = sorted(os.listdir(checkpoints))
    assert [n.split(".")[0] for n in names] == ["2", "4"], names
    assert all(".damaged-" in n for n in names)
    assert not os.path.exists(os.path.join(run, "train.lock"))


def test_step_damage_names_a_truncated_array_file(trained, tmp_path):
    from metastone_jax.train.checkpoint_integrity import step_damage

    step = str(tmp_path / "4")
    shutil.copytree(os.path.join(trained, "checkpoints", "4"), step)
    assert step_damage(step) is None
    arrays = [f for f in _files(step) if re.fullmatch(r"state/ocdbt\.process_\d+/d/\w+", f)]
    biggest = max(arrays, key=lambda f: os.path.getsize(os.path.join(step, f)))
    os.truncate(os.path.join(step, biggest), 10)
    assert re.fullmatch(rf"{re.escape(biggest)} is truncated \(10 bytes; .*\)", step_damage(step))


# --- item 4: resuming with another model ------------------------------------------------------


def test_another_model_shape_is_named_before_restoring(run):
    message = _refusal(run, "--config.train.steps=4", "--config.model.d_model=32")
    assert message.startswith("metastone-jax train: config.model.d_model: step 4 in ")
    assert "trained with 64, this run has 32" in message
    assert "strict" not in message  # not orbax's shape error
    # A config mismatch is not damage: nothing is set aside.
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["2", "4"]


def test_another_train_state_names_the_tensor_and_the_setting(run):
    message = _refusal(run, "--config.train.steps=4", "--config.kind=grpo")
    assert "tensors the checkpoint lacks (first: ref_params." in message  # GRPO's KL reference
    assert "config.kind: 'sft' -> 'grpo'" in message


def test_runtime_fields_may_change_on_resume(trained, run):
    _train(run, "--config.train.steps=4", "--config.model.remat=full")
    assert _metrics(run) == _metrics(trained)  # resumed at step 4: nothing retrained


# --- item 5: settings checked when the config is built ----------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.save_every=0", "config.train.save_every=0: expected an int >= 1"),
        ("--config.data.grad_accum=0", "config.data.grad_accum=0: expected an int >= 1"),
        (
            "--config.data.grad_accum=3",
            "config.data.grad_accum=3: expected a divisor of config.data.batch_size=8",
        ),  # fmt: skip
        ("--config.train.keep=0", "config.train.keep=0: expected an int >= 1"),
        ("--config.rl.temperature=0", "config.rl.temperature=0.0: expected a finite number > 0"),
        ("--config.rl.top_p=1.5", "config.rl.top_p=1.5: expected a finite number in (0, 1]"),
        ("--config.optim.b2=1", "config.optim.b2=1.0: expected a finite number in [0, 1)"),
        ("--config.optim.lr=-1e-3", "config.optim.lr=-0.001: expected a finite number >= 0"),
        ("--config.spr.form=bogus", "config.spr.form='bogus': expected one of ("),
    ],
)
def test_out_of_range_settings_are_refused_at_load(tmp_path, override, message):
    workdir = tmp_path / "run"
    got = _refusal(str(workdir), override)
    assert got.startswith(f"metastone-jax train: {message}"), got
    assert not workdir.exists()  # refused before anything was built


def test_a_file_as_workdir_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    assert _refusal(str(path)) == (
        f"metastone-jax train: --workdir {path} is a file; expected a directory"
    )
    below = path / "run"
    assert _refusal(str(below)) == (
        f"metastone-jax train: --workdir {below}: {path} is a file; expected a directory"
    )


def _preset(name):
    module = config_module("train")
    return module.get_config(name), module.PRESETS


def test_every_rule_names_a_key_of_every_preset_and_the_presets_pass():
    from metastone_jax.train.validate import RULES, lookup, validate_train_config

    _, presets = _preset("tiny-sft")
    for name in presets:
        config, _ = _preset(name)
        missing = [key for key in RULES if not lookup(config, key)[0]]
        assert not missing, (name, missing)
        validate_train_config(config)


def test_range_bounds():
    from metastone_jax.train.validate import Range, above, at_least, fraction

    assert at_least(1).accepts(1) and not at_least(1).accepts(0)
    assert not at_least(1).accepts(2.0) and not at_least(1).accepts(True)  # ints only
    assert at_least(0.0).accepts(0) and not at_least(0.0).accepts(float("nan"))
    assert above(0.0).accepts(1e-30) and not above(0.0).accepts(0.0)
    assert fraction(lo_open=True).accepts(1.0) and not fraction(lo_open=True).accepts(0.0)
    assert fraction(hi_open=True).accepts(0.0) and not fraction(hi_open=True).accepts(1.0)
    assert not Range().accepts(float("inf")) and not Range().accepts("1")


def test_rollouts_must_split_into_mini_batches_and_micro_batches():
    from metastone_jax.train.validate import validate_train_config

    config, _ = _preset("tiny-grpo")  # 8 prompts x k=4 = 32 rollouts per step
    config.rl.mini_batches = 3
    with pytest.raises(ValueError, match=r"config.rl.mini_batches=3: expected a divisor of the 32"):
        validate_train_config(config)
    config.rl.mini_batches, config.data.grad_accum = 4, 16  # 8 rollouts per update
    with pytest.raises(ValueError, match=r"config.data.grad_accum=16: expected a divisor of the 8"):
        validate_train_config(config)
    config.data.grad_accum = 8
    validate_train_config(config)


def test_packing_settings_are_checked():
    from metastone_jax.train.validate import validate_train_config

    config, _ = _preset("tiny-grpo")  # prompts of 48 + 48 new tokens
    config.data.pack_tokens = 64
    longest = r"config.data.max_prompt_len \+ config.rl.max_new_tokens = 96"
    with pytest.raises(ValueError, match=r"pack_tokens=64: expected at least the longest "
                       r"sequence, " + longest):  # fmt: skip
        validate_train_config(config)
    config.data.pack_tokens, config.mesh.tensor = 193, 2
    with pytest.raises(ValueError, match=r"pack_tokens=193: expected a multiple of "
                       r"config.mesh.tensor=2"):  # fmt: skip
        validate_train_config(config)
    config.data.pack_tokens, config.spr.scope = 192, "rank"
    with pytest.raises(ValueError, match=r"spr.scope='rank': packed rows mix"):
        validate_train_config(config)
    config.spr.scope = "batch"
    validate_train_config(config)


def test_loop_and_validation_agree_on_the_logprob_supports():
    from metastone_jax.train.loop import LOGPROB_SUPPORTS
    from metastone_jax.train.validate import RULES

    assert RULES["rl.logprob_support"].choices == LOGPROB_SUPPORTS


# --- item 6: one run per workdir --------------------------------------------------------------


def _lock(workdir):
    with open(os.path.join(workdir, "train.lock")) as f:
        return json.load(f)


def _write_lock(workdir, host, pid):
    with open(os.path.join(workdir, "train.lock"), "w") as f:
        json.dump({"host": host, "pid": pid}, f)


def test_a_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(run, capfd):
    env = dict(os.environ, XLA_FLAGS="")  # one CPU device: the first run as a user starts it
    first = subprocess.Popen(
        [sys.executable, "-m", "metastone_jax.main", "train", f"--workdir={run}", *ARGS,
         "--config.train.steps=1000"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(run, "train.lock")):
            assert first.poll() is None and time.time() < deadline, "the first run never locked"
            time.sleep(0.05)
        time.sleep(0.2)  # the holder's record is written right after the file is created
        assert _lock(run)["pid"] == first.pid
        message = _refusal(run, "--config.train.steps=4")
        host = socket.gethostname()
        assert f"in use by a running train: pid {first.pid} on host {host}" in message
    finally:
        first.kill()
        first.wait()
    assert _lock(run)["pid"] == first.pid  # SIGKILL: the lock stays behind, stale
    capfd.readouterr()
    _train(run, "--config.train.steps=4")  # resumes at step 4: nothing to train
    err = capfd.readouterr().err
    assert re.search(rf"warning: taking over the stale lock .* of pid {first.pid} on host", err)
    assert not os.path.exists(os.path.join(run, "train.lock"))  # released at the end


def test_a_lock_from_another_host_is_refused_with_how_to_clear_it(run):
    _write_lock(run, "some-other-host", 12345)
    message = _refusal(run, "--config.train.steps=4")
    lock = os.path.join(run, "train.lock")
    assert f"locked by pid 12345 on host some-other-host ({lock})" in message
    assert f"rm {lock}" in message
    assert _lock(run) == {"host": "some-other-host", "pid": 12345}  # left alone


def test_the_lock_is_released_when_the_run_fails(run):
    _refusal(run, "--config.train.steps=4", "--config.model.d_model=32")  # fails after locking
    assert not os.path.exists(os.path.join(run, "train.lock"))
