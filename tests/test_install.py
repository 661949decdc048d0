"""A non-editable install finds its configs: the package is installed (pip install --target, as a
wheel would be) from a copy of the sources that has no configs/ beside it, and run from a
directory outside the repository with only the install on PYTHONPATH."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    src, site = tmp / "src", tmp / "site"
    shutil.copytree(os.path.join(ROOT, "metastone_jax"), src / "metastone_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", "--target", str(site), str(src)],
        check=True, capture_output=True, cwd=tmp,
    )  # fmt: skip
    (tmp / "run").mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))
    return site, tmp / "run", env


CHECK = """
import metastone_jax
from metastone_jax import configs
from metastone_jax.cli_common import load_config
from metastone_jax.main import main
from metastone_jax.train import cli

print(metastone_jax.__file__)
print(configs.DIR)
config = load_config(cli.PROG, "grpo-1.5b-v5e-8", ["--config.data.batch_size=8"], cli.CONFIG_FILES)
print(config.preset, config.kind, config.data.batch_size, config.mesh.fsdp, config.model.n_layers)
try:
    main(["metastone-jax", "train", "--help"])
except SystemExit as e:
    print("help exit", e.code)
"""


def test_installed_package_resolves_a_train_preset(installed):
    site, run_dir, env = installed
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=run_dir, env=env, capture_output=True,
                         text=True, check=True).stdout.splitlines()  # fmt: skip
    assert out[0] == str(site / "metastone_jax" / "__init__.py")  # not the repository's
    assert out[1] == str(site / "metastone_jax" / "configs")
    assert out[2] == "grpo-1.5b-v5e-8 grpo 8 4 28"  # meshes.py over train.py over model.py
    assert "usage: metastone-jax train" in "\n".join(out) and out[-1] == "help exit 0"


def test_installed_console_script_takes_a_preset(installed):
    site, run_dir, env = installed
    result = subprocess.run([str(site / "bin" / "metastone-jax"), "info", "--config=tiny"],
                            cwd=run_dir, env=env, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("preset: tiny  arch: qwen2")
    bad = subprocess.run([str(site / "bin" / "metastone-jax"), "info", "--config=tinyy"],
                         cwd=run_dir, env=env, capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "metastone-jax info: --config=tinyy: unknown preset 'tinyy'; expected one of ['demo', "
        "'metastone-s1-1.5b', 'metastone-s1-32b', 'metastone-s1-7b', 'tiny'] (configs/model.py) "
        "or a file, --config=FILE.py[:PRESET]"
    ]


@pytest.mark.slow  # a training process; the default run resolves the preset (above)
def test_installed_console_script_trains_a_preset(installed):
    """`metastone-jax train --config=PRESET` from the install: the preset is found and a run
    completes (one step of the tiny SFT preset), leaving its checkpoint and metrics."""
    site, run_dir, env = installed
    result = subprocess.run(
        [str(site / "bin" / "metastone-jax"), "train", "--config=tiny-sft", "--workdir=run",
         "--config.train.steps=1", "--config.train.export=False",
         "--config.train.progress=False", "--config.data.synthetic_size=64"],
        cwd=run_dir, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "metastone-jax train: done, run" in result.stdout
    assert os.path.isfile(run_dir / "run" / "metrics.jsonl")
    assert os.listdir(run_dir / "run" / "checkpoints")
