"""A damaged or missing params checkpoint given to a command: one clear line naming the path and
what is wrong (SystemExit), no traceback, no asyncio noise from the abandoned reads."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from test_sample_cli import ckpt  # noqa: F401  (fixture: tiny Qwen2 checkpoint + BPE tokenizer)
from test_tokenizer import bpe_dir  # noqa: F401

from metastone_jax.main import main


def largest_data_file(path):
    """The largest file under a d/ directory of params/: array data that every restore reads."""
    files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(path, "params"))
             if os.path.basename(root) == "d" for name in names]  # fmt: skip
    return max(files, key=os.path.getsize)


def rewrite_config(path, edit):
    path = os.path.join(path, "model_config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump(edit(config), f)


def set_d_ff(config, value):
    config["model"]["d_ff"] = value
    return config


def remove_all(path):
    for name in os.listdir(path):
        full = os.path.join(path, name)
        shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)


# (damage, expected message after "<the checkpoint path>: "). The tiny checkpoint: 2 layers,
# d_model 32, d_ff 64, so the down projection is [layers, d_ff, d_model] = [2, 64, 32].
DAMAGES = {
    "no model_config.json": (
        lambda c: os.remove(os.path.join(c, "model_config.json")),
        r"not a params checkpoint \(missing model_config\.json\)",
    ),
    "model_config.json not an object": (
        lambda c: open(os.path.join(c, "model_config.json"), "w").write("[1]"),
        r"damaged/model_config\.json: malformed, expected an object with a \"model\" object",
    ),
    "no params/": (
        lambda c: shutil.rmtree(os.path.join(c, "params")),
        r"parameters do not match model_config\.json: no params/ directory",
    ),
    "no hf/": (
        lambda c: shutil.rmtree(os.path.join(c, "hf")),
        r"not a params checkpoint \(no hf/ tokenizer directory\)",
    ),
    "emptied": (remove_all, r"empty directory, not a params checkpoint"),
    "no OCDBT manifest": (
        lambda c: os.remove(os.path.join(c, "params", "manifest.ocdbt")),
        r"cannot read params/ \(damaged or incomplete checkpoint\): "
        r"params/manifest\.ocdbt is missing",
    ),
    "a data file deleted": (
        lambda c: os.remove(largest_data_file(c)),
        r"cannot read params/ \(damaged or incomplete checkpoint\): .*params/",
    ),
    "params/d/ emptied": (
        lambda c: remove_all(os.path.join(c, "params", "d")),
        r"cannot read params/ \(damaged or incomplete checkpoint\): .*params/d/",
    ),
    "a data file truncated": (
        lambda c: os.truncate(largest_data_file(c), 100),
        r"cannot read params/ \(damaged or incomplete checkpoint\): .*value of size 100",
    ),
    "another d_ff in model_config.json": (
        lambda c: rewrite_config(c, lambda cfg: set_d_ff(cfg, 65)),
        r"parameters do not match model_config\.json: blocks\.mlp\.down_proj\.kernel has shape "
        r"\[2, 64, 32\] in params/, model_config\.json implies \[2, 65, 32\]",
    ),
}


def damaged(ckpt, tmp_path, damage):  # noqa: F811
    path = str(tmp_path / "damaged")
    shutil.copytree(ckpt, path)
    DAMAGES[damage][0](path)
    return path


def assert_one_clean_line(capsys, error, command, path, message):
    text = str(error.value)
    assert "\n" not in text
    assert text.startswith(f"metastone-jax {command}: {path}")
    assert re.search(message, text), text
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) <= 2, err


@pytest.mark.parametrize("damage", DAMAGES)
def test_sample_on_a_damaged_export(capsys, ckpt, tmp_path, damage):  # noqa: F811
    path = damaged(ckpt, tmp_path, damage)
    with pytest.raises(SystemExit) as error:
        main(["metastone-jax", "sample", f"--ckpt={path}", "--prompt=What is 2 + 3?"])
    assert_one_clean_line(capsys, error, "sample", path, DAMAGES[damage][1])


def test_sample_on_a_checkpoint_that_does_not_exist(capsys, tmp_path):
    path = str(tmp_path / "nope")
    with pytest.raises(SystemExit) as error:
        main(["metastone-jax", "sample", f"--ckpt={path}", "--prompt=What is 2 + 3?"])
    assert_one_clean_line(capsys, error, "sample", path, r"nope: no such checkpoint directory")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=r"file: not a directory \(expected a params checkpoint"):
        main(["metastone-jax", "sample", f"--ckpt={tmp_path / 'file'}", "--prompt=x"])


@pytest.mark.parametrize("damage", ["a data file truncated", "no OCDBT manifest", "no params/"])
def test_convert_jax_to_hf_on_a_damaged_export(capsys, ckpt, tmp_path, damage):  # noqa: F811
    path = damaged(ckpt, tmp_path, damage)
    out = tmp_path / "hf-out"
    with pytest.raises(SystemExit) as error:
        main(["metastone-jax", "convert", "jax-to-hf", f"--ckpt={path}", f"--out={out}"])
    assert_one_clean_line(capsys, error, "convert", path, DAMAGES[damage][1])
    assert sorted(os.listdir(tmp_path)) == ["damaged"]  # no partial output


def test_a_lost_orbax_metadata_file_still_loads_the_same_weights(ckpt, tmp_path):  # noqa: F811
    """Given the model's tree, the restore needs neither _METADATA nor the per-process manifest:
    such a checkpoint is intact, and the shape check (which reads _METADATA) steps aside."""
    from metastone_jax.checkpoint import load_params_checkpoint, params_fingerprint

    path = str(tmp_path / "copy")
    shutil.copytree(ckpt, path)
    os.remove(os.path.join(path, "params", "_METADATA"))
    os.remove(os.path.join(path, "params", "ocdbt.process_0", "manifest.ocdbt"))
    fingerprint = params_fingerprint(load_params_checkpoint(ckpt)[0])
    assert params_fingerprint(load_params_checkpoint(path)[0]) == fingerprint


def test_the_cli_prints_one_line_and_nothing_else(ckpt, tmp_path):  # noqa: F811
    """In a real process, up to its exit: the tracebacks of the bare Exception orbax raises,
    and the leftovers of the reads a failed restore abandons ("Event loop is closed", "exception
    was never retrieved", "never awaited"), reach no one: one line per failed command."""
    damages = [d for d in DAMAGES if "cannot read params/" in DAMAGES[d][1]]
    paths = [damaged(ckpt, tmp_path / str(i), d) for i, d in enumerate(damages)]
    script = (
        "import sys\nfrom metastone_jax.main import main\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        main(['metastone-jax', 'sample', '--ckpt=' + path, '--prompt=hi'])\n"
        "    except SystemExit as e:\n"
        "        print(e, file=sys.stderr)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True,
                         env=env, timeout=300)  # fmt: skip
    lines = run.stderr.splitlines()
    assert len(lines) == len(paths) == 4, run.stderr
    for path, line in zip(paths, lines, strict=True):
        assert line.startswith(f"metastone-jax sample: {path}: cannot read params/ (damaged")
