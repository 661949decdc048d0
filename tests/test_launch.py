"""launch/: each script's --dry_run prints exactly the expected gcloud / xpk commands (golden text
below) for a v5e-8 and a v5p-64; bad input fails with one line; launch/remote.sh (what the
workers run) logs a job per worker, sets the JAX coordinator on a multi-worker slice, and stops
the job with SIGTERM. No network, no gcloud: nothing here runs a cloud command."""

import os
import shutil
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from launch import tpu, xpk  # noqa: E402

V5E = {"name": "metastone-v5e-8", "zone": "us-west4-a", "acc": "v5e-8"}
V5P = {"name": "metastone-v5p-64", "zone": "us-east5-a", "acc": "v5p-64"}
TRAIN = ["metastone-jax", "train", "--config=configs/train.py:grpo-1.5b", "--workdir=gs://b/grpo"]


def dry(capsys, module, action, *args):
    """module.main([action, --dry_run, *args]) -> the printed lines."""
    module.main([action, "--dry_run", *args])
    return capsys.readouterr().out.splitlines()


def where(t):
    return ["--name", t["name"], "--zone", t["zone"]]


# ---- launch/tpu.py ----------------------------------------------------------------------------

CREATE = {
    "v5e-8": {
        (): "gcloud compute tpus tpu-vm create metastone-v5e-8 --zone=us-west4-a "
        "--accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite",
        ("--spot",): "gcloud compute tpus tpu-vm create metastone-v5e-8 --zone=us-west4-a "
        "--accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite --spot",
        ("--preemptible",): "gcloud compute tpus tpu-vm create metastone-v5e-8 --zone=us-west4-a "
        "--accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite --preemptible",
        ("--queued",): "gcloud compute tpus queued-resources create metastone-v5e-8 "
        "--node-id=metastone-v5e-8 --zone=us-west4-a --accelerator-type=v5litepod-8 "
        "--runtime-version=v2-alpha-tpuv5-lite",
        ("--queued", "--spot"): "gcloud compute tpus queued-resources create metastone-v5e-8 "
        "--node-id=metastone-v5e-8 --zone=us-west4-a --accelerator-type=v5litepod-8 "
        "--runtime-version=v2-alpha-tpuv5-lite --spot",
    },
    "v5p-64": {
        (): "gcloud compute tpus tpu-vm create metastone-v5p-64 --zone=us-east5-a "
        "--accelerator-type=v5p-64 --version=v2-alpha-tpuv5",
        ("--spot",): "gcloud compute tpus tpu-vm create metastone-v5p-64 --zone=us-east5-a "
        "--accelerator-type=v5p-64 --version=v2-alpha-tpuv5 --spot",
        ("--queued", "--spot"): "gcloud compute tpus queued-resources create metastone-v5p-64 "
        "--node-id=metastone-v5p-64 --zone=us-east5-a --accelerator-type=v5p-64 "
        "--runtime-version=v2-alpha-tpuv5 --spot",
        ("--", "--scopes=cloud-platform", "--labels=team=ml"): "gcloud compute tpus tpu-vm create "
        "metastone-v5p-64 --zone=us-east5-a --accelerator-type=v5p-64 --version=v2-alpha-tpuv5 "
        "--scopes=cloud-platform --labels=team=ml",
        ("--project", "my-proj", "--runtime_version", "v2-alpha-tpuv5-nightly"): "gcloud compute "
        "tpus tpu-vm create metastone-v5p-64 --zone=us-east5-a --project=my-proj "
        "--accelerator-type=v5p-64 --version=v2-alpha-tpuv5-nightly",
    },
}


@pytest.mark.parametrize("t", [V5E, V5P], ids=["v5e-8", "v5p-64"])
def test_create_dry_run_prints_the_gcloud_command(capsys, t):
    for flags, expected in CREATE[t["acc"]].items():
        out = dry(capsys, tpu, "create", *where(t), "--accelerator_type", t["acc"], *flags)
        assert out == [expected], flags


def test_create_takes_friendly_and_gcloud_names_for_every_generation(capsys):
    for acc, gcloud, version in [
        ("v5litepod-8", "v5litepod-8", "v2-alpha-tpuv5-lite"),
        ("v6e-8", "v6e-8", "v2-alpha-tpuv6e"),
        ("v4-8", "v4-8", "tpu-ubuntu2204-base"),
        ("V6E-256", "v6e-256", "v2-alpha-tpuv6e"),
    ]:
        out = dry(capsys, tpu, "create", "--name", "t", "--accelerator_type", acc)
        assert out == [
            f"gcloud compute tpus tpu-vm create t --accelerator-type={gcloud} --version={version}"
        ]


INSTALL = {
    "v5e-8": [
        "git archive --format=tar.gz --output=/tmp/metastone-jax-metastone-v5e-8.tar.gz HEAD",
        "gcloud compute tpus tpu-vm scp /tmp/metastone-jax-metastone-v5e-8.tar.gz "
        "metastone-v5e-8:metastone-jax.tar.gz --zone=us-west4-a --worker=all",
        "gcloud compute tpus tpu-vm ssh metastone-v5e-8 --zone=us-west4-a --worker=all --command "
        "'mkdir -p ~/metastone-jax && tar -xzf ~/metastone-jax.tar.gz -C ~/metastone-jax && "
        "bash ~/metastone-jax/launch/remote.sh install'",
    ],
    "v5p-64": [
        "git archive --format=tar.gz --output=/tmp/metastone-jax-metastone-v5p-64.tar.gz HEAD",
        "gcloud compute tpus tpu-vm scp /tmp/metastone-jax-metastone-v5p-64.tar.gz "
        "metastone-v5p-64:metastone-jax.tar.gz --zone=us-east5-a --worker=all",
        "gcloud compute tpus tpu-vm ssh metastone-v5p-64 --zone=us-east5-a --worker=all --command "
        "'mkdir -p ~/metastone-jax && tar -xzf ~/metastone-jax.tar.gz -C ~/metastone-jax && "
        "bash ~/metastone-jax/launch/remote.sh install'",
    ],
}

JOBS = {
    "v5e-8": {
        "run": "gcloud compute tpus tpu-vm ssh metastone-v5e-8 --zone=us-west4-a --worker=all "
        "--command 'bash ~/metastone-jax/launch/remote.sh run metastone metastone-jax train "
        "--config=configs/train.py:grpo-1.5b --workdir=gs://b/grpo'",
        "tail": "gcloud compute tpus tpu-vm ssh metastone-v5e-8 --zone=us-west4-a --worker=all "
        "--command 'bash ~/metastone-jax/launch/remote.sh tail metastone 20'",
        "stop": "gcloud compute tpus tpu-vm ssh metastone-v5e-8 --zone=us-west4-a --worker=all "
        "--command 'bash ~/metastone-jax/launch/remote.sh stop metastone'",
        "ssh": "gcloud compute tpus tpu-vm ssh metastone-v5e-8 --zone=us-west4-a --worker=all "
        "--command 'nproc && df -h ~'",
    },
    "v5p-64": {
        "run": "gcloud compute tpus tpu-vm ssh metastone-v5p-64 --zone=us-east5-a --worker=all "
        "--command 'bash ~/metastone-jax/launch/remote.sh run metastone metastone-jax train "
        "--config=configs/train.py:grpo-1.5b --workdir=gs://b/grpo'",
        "tail": "gcloud compute tpus tpu-vm ssh metastone-v5p-64 --zone=us-east5-a --worker=all "
        "--command 'bash ~/metastone-jax/launch/remote.sh tail metastone 20'",
        "stop": "gcloud compute tpus tpu-vm ssh metastone-v5p-64 --zone=us-east5-a --worker=all "
        "--command 'bash ~/metastone-jax/launch/remote.sh stop metastone'",
        "ssh": "gcloud compute tpus tpu-vm ssh metastone-v5p-64 --zone=us-east5-a --worker=all "
        "--command 'nproc && df -h ~'",
    },
}

TEARDOWN = {
    "v5e-8": {
        "logs": [
            "mkdir -p logs/metastone-v5e-8",
            "gcloud compute tpus tpu-vm scp --recurse metastone-v5e-8:metastone-logs/metastone "
            "logs/metastone-v5e-8 --zone=us-west4-a --worker=all",
        ],
        "status": ["gcloud compute tpus tpu-vm describe metastone-v5e-8 --zone=us-west4-a"],
        "delete": ["gcloud compute tpus tpu-vm delete metastone-v5e-8 --zone=us-west4-a --quiet"],
    },
    "v5p-64": {
        "logs": [
            "mkdir -p logs/metastone-v5p-64",
            "gcloud compute tpus tpu-vm scp --recurse metastone-v5p-64:metastone-logs/metastone "
            "logs/metastone-v5p-64 --zone=us-east5-a --worker=all",
        ],
        "status": ["gcloud compute tpus tpu-vm describe metastone-v5p-64 --zone=us-east5-a"],
        "delete": ["gcloud compute tpus tpu-vm delete metastone-v5p-64 --zone=us-east5-a --quiet"],
    },
}


@pytest.mark.parametrize("t", [V5E, V5P], ids=["v5e-8", "v5p-64"])
def test_install_run_logs_delete_dry_runs_print_the_gcloud_commands(capsys, t):
    acc, w = t["acc"], where(t)
    assert dry(capsys, tpu, "install", *w) == INSTALL[acc]
    assert dry(capsys, tpu, "run", *w, "--", *TRAIN) == [JOBS[acc]["run"]]
    assert dry(capsys, tpu, "tail", *w) == [JOBS[acc]["tail"]]
    assert dry(capsys, tpu, "stop", *w) == [JOBS[acc]["stop"]]
    assert dry(capsys, tpu, "ssh", *w, "--", "nproc && df -h ~") == [JOBS[acc]["ssh"]]
    for action in ("logs", "status", "delete"):
        assert dry(capsys, tpu, action, *w) == TEARDOWN[acc][action], action


def test_queued_variants_and_options(capsys):
    w = where(V5P)
    assert dry(capsys, tpu, "status", *w, "--queued") == [
        "gcloud compute tpus queued-resources describe metastone-v5p-64 --zone=us-east5-a"
    ]
    assert dry(capsys, tpu, "delete", *w, "--queued") == [
        "gcloud compute tpus queued-resources delete metastone-v5p-64 --zone=us-east5-a "
        "--force --quiet"
    ]
    assert dry(capsys, tpu, "install", *w, "--git_url", "https://github.com/o/metastone-jax") == [
        "gcloud compute tpus tpu-vm ssh metastone-v5p-64 --zone=us-east5-a --worker=all --command "
        "'(test -d ~/metastone-jax/.git || git clone -q https://github.com/o/metastone-jax "
        "~/metastone-jax) && cd ~/metastone-jax && git fetch -q origin main && git checkout -q "
        "--detach FETCH_HEAD && bash ~/metastone-jax/launch/remote.sh install'"
    ]
    # A command with shell syntax reaches the worker quoted, word for word.
    out = dry(capsys, tpu, "run", *w, "--job", "sweep", "--", "bash", "-c", "a && b $X")
    assert out == [
        "gcloud compute tpus tpu-vm ssh metastone-v5p-64 --zone=us-east5-a --worker=all --command "
        "'bash ~/metastone-jax/launch/remote.sh run sweep bash -c '\"'\"'a && b $X'\"'\"''"
    ]
    assert dry(capsys, tpu, "logs", *w, "--job", "sweep", "--dest", "/tmp/l") == [
        "mkdir -p /tmp/l/metastone-v5p-64",
        "gcloud compute tpus tpu-vm scp --recurse metastone-v5p-64:metastone-logs/sweep "
        "/tmp/l/metastone-v5p-64 --zone=us-east5-a --worker=all",
    ]


@pytest.mark.parametrize("t", [V5E, V5P], ids=["v5e-8", "v5p-64"])
def test_mount_dry_run_prints_the_gcsfuse_command(capsys, t):
    assert dry(capsys, tpu, "mount", *where(t), "--bucket", "gs://my-bucket/") == [
        f"gcloud compute tpus tpu-vm ssh {t['name']} --zone={t['zone']} --worker=all --command "
        "'bash ~/metastone-jax/launch/remote.sh mount my-bucket /mnt/my-bucket'"
    ]


def test_without_dry_run_each_command_is_printed_then_run(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f'#!/bin/sh\necho "$*" >> {calls}\ncase "$*" in *delete*) exit 2 ;; esac\n')
    gcloud.chmod(0o755)

    def script(*args, path):
        env = dict(os.environ, PATH=path)
        cmd = [sys.executable, "launch/tpu.py", *args]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)

    path = f"{bin_dir}:{os.environ['PATH']}"
    r = script("status", "--name", "t", "--zone", "z", path=path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "gcloud compute tpus tpu-vm describe t --zone=z\n"
    assert calls.read_text() == "compute tpus tpu-vm describe t --zone=z\n"
    r = script("delete", "--name", "t", "--zone", "z", path=path)
    assert r.returncode == 1 and r.stderr == (
        "launch/tpu.py: exit status 2 from: gcloud compute tpus tpu-vm delete t --zone=z --quiet\n"
    )
    r = script("status", "--name", "t", path=str(tmp_path))  # no gcloud on the PATH
    assert r.returncode == 1
    assert r.stderr == "launch/tpu.py: gcloud not found: install it (see launch/README.md)\n"


def test_cost_is_chips_times_hours_times_the_given_price(capsys):
    tpu.main(["cost", "--accelerator_type", "v5e-8", "--hours", "2"])
    tpu.main(
        ["cost", "--accelerator_type", "v5p-64", "--hours", "1.5", "--price_per_chip_hour", "2"]
    )
    tpu.main(["cost", "--accelerator_type", "v6e-8", "--hours", "3", "--num_slices", "2"])
    assert capsys.readouterr().out.splitlines() == [
        "v5e-8 (gcloud v5litepod-8): 8 chips x 2 h = 16 chip-hours "
        "(x the price per chip-hour: https://cloud.google.com/tpu/pricing)",
        "v5p-64 (gcloud v5p-64): 32 chips x 1.5 h = 48 chip-hours x $2/chip-hour = $96.00",
        "v6e-8 x 2 slices (gcloud v6e-8): 16 chips x 3 h = 48 chip-hours "
        "(x the price per chip-hour: https://cloud.google.com/tpu/pricing)",
    ]


# ---- launch/xpk.py ----------------------------------------------------------------------------

XPK = {
    "v5e-8": [
        "git archive --format=tar.gz --output=/tmp/metastone-jax-xpk-metastone.tar.gz HEAD",
        "mkdir -p /tmp/metastone-jax-xpk-metastone",
        "tar -xzf /tmp/metastone-jax-xpk-metastone.tar.gz -C /tmp/metastone-jax-xpk-metastone",
        "xpk workload create --cluster=metastone-v5e-8 --workload=metastone --tpu-type=v5litepod-8 "
        "--num-slices=1 --zone=us-west4-a --base-docker-image=python:3.11 "
        '--script-dir=/tmp/metastone-jax-xpk-metastone --command \'pip install -q -e ".[tpu]" '
        "&& metastone-jax train --config=configs/train.py:grpo-1.5b --workdir=gs://b/grpo'",
    ],
    "v5p-64": [
        "git archive --format=tar.gz --output=/tmp/metastone-jax-xpk-metastone.tar.gz HEAD",
        "mkdir -p /tmp/metastone-jax-xpk-metastone",
        "tar -xzf /tmp/metastone-jax-xpk-metastone.tar.gz -C /tmp/metastone-jax-xpk-metastone",
        "xpk workload create --cluster=metastone-v5p-64 --workload=metastone --tpu-type=v5p-64 "
        "--num-slices=1 --zone=us-east5-a --base-docker-image=python:3.11 "
        '--script-dir=/tmp/metastone-jax-xpk-metastone --command \'pip install -q -e ".[tpu]" '
        "&& metastone-jax train --config=configs/train.py:grpo-1.5b --workdir=gs://b/grpo'",
    ],
}


@pytest.mark.parametrize("t", [V5E, V5P], ids=["v5e-8", "v5p-64"])
def test_xpk_dry_runs_print_the_xpk_commands(capsys, t):
    c = ["--cluster", t["name"], "--zone", t["zone"]]
    cluster = (
        f"xpk cluster create --cluster={t['name']} --tpu-type="
        f"{'v5litepod-8' if t['acc'] == 'v5e-8' else 'v5p-64'} --num-slices=1 --zone={t['zone']}"
    )
    acc = ["--accelerator_type", t["acc"]]
    assert dry(capsys, xpk, "cluster", *c, *acc) == [cluster + " --on-demand"]
    assert dry(capsys, xpk, "cluster", *c, *acc, "--spot") == [cluster + " --spot"]
    assert dry(capsys, xpk, "cluster", *c, *acc, "--reservation", "r1") == [
        cluster + " --reservation=r1"
    ]
    assert dry(capsys, xpk, "workload", *c, *acc, "--", *TRAIN) == XPK[t["acc"]]
    tail = f"--cluster={t['name']} --zone={t['zone']}"
    assert dry(capsys, xpk, "list", *c) == [f"xpk workload list {tail}"]
    assert dry(capsys, xpk, "delete-workload", *c) == [
        f"xpk workload delete --cluster={t['name']} --workload=metastone --zone={t['zone']}"
    ]
    assert dry(capsys, xpk, "delete-cluster", *c) == [f"xpk cluster delete {tail}"]


def test_xpk_multislice_with_an_image_sets_the_coordinator_from_megascale(capsys):
    out = dry(capsys, xpk, "workload", "--cluster", "c", "--zone", "us-east5-a", "--project",
              "p", "--accelerator_type", "v5p-64", "--num_slices", "2", "--workload", "grpo",
              "--docker_image", "us-docker.pkg.dev/p/r/metastone:1", "--max_restarts", "5",
              "--", *TRAIN)  # fmt: skip
    assert out == [
        "xpk workload create --cluster=c --workload=grpo --tpu-type=v5p-64 --num-slices=2 "
        "--zone=us-east5-a --project=p --max-restarts=5 "
        "--docker-image=us-docker.pkg.dev/p/r/metastone:1 --command "
        '\'[ -z "$MEGASCALE_COORDINATOR_ADDRESS" ] || export '
        'JAX_COORDINATOR_ADDRESS="${MEGASCALE_COORDINATOR_ADDRESS%%:*}:8482"; '
        "metastone-jax train --config=configs/train.py:grpo-1.5b --workdir=gs://b/grpo'"
    ]


# ---- errors ---------------------------------------------------------------------------------


def test_bad_accelerator_type_is_one_line_listing_the_valid_ones():
    for script in ("launch/tpu.py", "launch/xpk.py"):
        args = (
            ["create", "--name", "t"]
            if script.endswith("tpu.py")
            else ["cluster", "--cluster", "c"]
        )
        r = subprocess.run(
            [sys.executable, script, *args, "--accelerator_type", "v5e-7", "--dry_run"],
            cwd=REPO, capture_output=True, text=True,
        )  # fmt: skip
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr == (
            f"{script}: unknown accelerator type 'v5e-7'; valid: v4-N (N TensorCores, a multiple "
            "of 8 up to 8192), v5e-N or v5litepod-N (N chips in 1,4,8,16,32,64,128,256), v5p-N (N "
            "TensorCores, a multiple of 8 up to 12288), v6e-N (N chips in 1,4,8,16,32,64,128,256)\n"
        )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["create", "--name", "t", "--accelerator_type", "v5p-60"], "unknown accelerator type"),
        (["create", "--name", "t", "--accelerator_type", "v5p-64", "--queued", "--preemptible"],
         "launch/tpu.py: --queued takes --spot, not --preemptible"),
        (["run", "--name", "t"], "launch/tpu.py run: give the command after --"),
        (["delete", "--name", "My_TPU"], "launch/tpu.py: --name='My_TPU': use lowercase letters"),
        (["run", "--name", "t", "--job", "a b", "--", "ls"], "launch/tpu.py: --job='a b'"),
    ],
)  # fmt: skip
def test_bad_input_exits_with_one_line(argv, message):
    with pytest.raises(SystemExit) as e:
        tpu.main([*argv, "--dry_run"])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_spot_and_preemptible_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        tpu.main(
            ["create", "--name", "t", "--accelerator_type", "v5e-8", "--spot", "--preemptible"]
        )
    assert "not allowed with argument" in capsys.readouterr().err


# ---- launch/remote.sh (on a fake worker: HOME, curl and tmux sockets in tmp_path) ------------


@pytest.fixture
def worker(tmp_path):
    """A worker home with the repository's remote.sh and a fake metadata server (curl): worker 3
    of a two-worker slice."""
    home = tmp_path / "home"
    (home / "metastone-jax" / "launch").mkdir(parents=True)
    script = home / "metastone-jax" / "launch" / "remote.sh"
    shutil.copy(os.path.join(REPO, "launch", "remote.sh"), script)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "curl").write_text(
        '#!/bin/sh\ncase "$*" in\n'
        "  *agent-worker-number) echo 3 ;;\n"
        "  *worker-network-endpoints) echo 'w-0:0:10.0.0.5,w-1:1:10.0.0.6' ;;\n"
        "  *) exit 22 ;;\n"
        "esac\n"
    )
    (bin_dir / "curl").chmod(0o755)
    (tmp_path / "tmux").mkdir()
    env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}",
               TMUX_TMPDIR=str(tmp_path / "tmux"))  # fmt: skip
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    env.pop("TMUX", None)

    def sh(*args):
        return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True)

    yield sh, home
    if shutil.which("tmux"):  # the tmux server of this test's own socket directory
        subprocess.run(["tmux", "kill-server"], env=env, capture_output=True)


def test_remote_job_logs_per_worker_and_sets_the_coordinator(worker):
    sh, home = worker
    r = sh("_job", "j", "bash", "-c", 'echo "coord=$JAX_COORDINATOR_ADDRESS cwd=$PWD"; exit 3')
    assert r.returncode == 3
    log = (home / "metastone-logs" / "j" / "worker-3.log").read_text().splitlines()
    assert log[0].startswith("[metastone] worker 3 ") and log[0].endswith(
        'start: bash -c echo "coord=$JAX_COORDINATOR_ADDRESS cwd=$PWD"; exit 3'
    )
    assert log[1] == f"coord=10.0.0.5:8482 cwd={home / 'metastone-jax'}"
    assert log[2].endswith("exit status 3")
    assert not (home / "metastone-logs" / "j" / "worker-3.pid").exists()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
def test_remote_run_is_detached_in_tmux_and_stop_sends_sigterm(worker):
    sh, home = worker
    r = sh("run", "j", "sleep", "60")
    assert r.returncode == 0 and r.stdout == (
        f"worker 3: started j in tmux; log: tail -f {home}/metastone-logs/j/worker-3.log\n"
    )
    again = sh("run", "j", "sleep", "60")
    assert again.returncode == 1 and "job j is already running" in again.stderr
    pid_file = home / "metastone-logs" / "j" / "worker-3.pid"
    for _ in range(100):
        if pid_file.exists():
            break
        time.sleep(0.05)
    assert sh("tail", "j").stdout.startswith("== worker 3: j running;")
    assert sh("stop", "j").stdout.startswith("worker 3: sent SIGTERM to j (pid ")
    log = home / "metastone-logs" / "j" / "worker-3.log"
    for _ in range(100):
        if "exit status" in log.read_text():
            break
        time.sleep(0.05)
    assert log.read_text().splitlines()[-1].endswith("exit status 143")  # 128 + SIGTERM
    assert sh("stop", "j").stdout == "worker 3: j is not running\n"
