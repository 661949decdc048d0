"""The command line in-process: `info` counts and memory, every command's --help, one-line
errors, the --mesh syntax and --config=PRESET."""

import os
import re

import pytest

from metastone_jax import configs
from metastone_jax.main import COMMANDS, main
from metastone_jax.sharding import parse_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(capsys, *args):
    main(["metastone-jax", *args])
    return capsys.readouterr().out


def test_info_1_5b_counts_sprm_head_as_2d2_plus_4d_plus_1(capsys):
    out = run(capsys, "info", "--config=configs/model.py:metastone-s1-1.5b", "--config.mesh.fsdp=1")
    counts = {k: int(v.replace(",", "")) for k, v in re.findall(r"^\s+(\w+)\s+([\d,]+)", out, re.M)}
    assert counts["sprm_head"] == 4_724_737
    # Hand count from the public config.json (V, D, L, K, head_dim, F; 12 query heads).
    V, D, L, K, hd, F = 151936, 1536, 28, 2, 128, 8960
    block = 2 * D + (D * D + D) + 2 * (D * K * hd + K * hd) + D * D + 3 * D * F
    assert counts["backbone"] == V * D + L * block + D
    assert counts["lm_head"] == V * D
    assert counts["total"] == counts["backbone"] + counts["lm_head"] + counts["sprm_head"]
    # bf16 backbone + LM head (2 bytes each); the SPRM head is kept in fp32 (4 bytes).
    mib = float(re.search(r"\): ([\d,.]+) MiB", out).group(1).replace(",", ""))
    expected = (counts["backbone"] + counts["lm_head"]) * 2 + counts["sprm_head"] * 4
    assert abs(mib - expected / 2**20) < 0.1


def test_info_per_device_memory_shrinks_with_fsdp(capsys):
    args = ["info", "--config=configs/model.py:metastone-s1-1.5b", "--config.mesh.fsdp=8"]
    mib = float(re.search(r"\): ([\d,.]+) MiB", run(capsys, *args)).group(1).replace(",", ""))
    total = 1_781_812_737 * 2 / 2**20
    assert total / 8 <= mib < total / 4  # norms/biases replicate; the big matrices split 8 ways


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "--config=configs/model.py:bogus"], "unknown model preset 'bogus'"),
        (["info", "--config=configs/model.py:tiny", "--config.model.layers=2"], "no key 'layers'"),
        (
            ["info", "--config=configs/model.py:tiny", "--config.model.n_heads=3"],
            "ModelConfig.n_heads",
        ),
        (
            ["info", "--config=configs/model.py:tiny", "--config.mesh.data=3"],
            "does not divide the 8",
        ),
        (["demo", "--config.spr.formz=bce"], "config.spr has no key 'formz'"),
        (["demo", "--bogus"], "unknown argument '--bogus'"),
        (["frobnicate"], "unknown command 'frobnicate'"),
        (["train"], "--workdir=DIR is required"),
        (
            ["train", "--workdir=/tmp/x", "--config.train.stepz=3"],
            "config.train has no key 'stepz'",
        ),
    ],
)
def test_errors_are_one_clear_line(args, message):
    with pytest.raises(SystemExit) as exc:
        main(["metastone-jax", *args])
    assert message in str(exc.value)
    assert "Traceback" not in str(exc.value)


# What each command's --help must show: its usage line and its main flags (every command is here).
HELP_FLAGS = {
    "info": ["--config", "--config.SECTION.KEY=VALUE", "sections: mesh, model", "--mesh"],
    "train": ["--workdir", "--config", "sections: data, mesh, model", "tiny-sft", "--mesh"],
    "convert": ["hf-to-jax", "jax-to-hf", "--hf_dir", "--ckpt", "--mesh data:N,fsdp:N,tensor:N"],
    "sample": ["--ckpt", "--prompt", "--mode", "--strategy", "--slots"],
    "evaluate": ["--ckpt", "--benchmark", "--modes", "--samples", "--slots"],
    "sweep": ["--workdir", "--config", "cpu, tpu_example", "--print_commands", "--only"],
    "plan": ["--config", "grpo-1.5b-v5e-8", "--mesh", "--tpu", "--json"],
    "demo": ["--workdir", "--quick", "--spr-study", "--config", "sections: eval"],
}


def test_help_table_covers_every_command():
    assert set(HELP_FLAGS) == set(COMMANDS)


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("command", list(HELP_FLAGS))
def test_every_command_answers_help_with_its_flags(capsys, command, flag):
    with pytest.raises(SystemExit) as exc:
        main(["metastone-jax", command, flag])
    assert exc.value.code == 0  # train --help needs no --workdir
    out = capsys.readouterr().out
    assert out.startswith(f"usage: metastone-jax {command}")
    for text in HELP_FLAGS[command]:
        assert text in out, (command, text)


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["metastone-jax", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(f"\n  {command} " in out for command in COMMANDS)


@pytest.mark.parametrize(
    "args",
    [
        ["info"],
        ["train", "--workdir=/nonexistent/w"],
        ["convert", "hf-to-jax", "--hf_dir=x", "--out=y"],
        ["sample", "--ckpt=x", "--prompt=p"],
        ["evaluate", "--ckpt=x", "--benchmark=b"],
        ["sweep", "--workdir=/nonexistent/w"],
        ["plan"],
        ["demo"],
    ],
    ids=lambda args: args[0],
)
def test_an_unknown_flag_is_one_line_naming_it(args):
    with pytest.raises(SystemExit) as exc:
        main(["metastone-jax", *args, "--bogus=1"])
    message = str(exc.value.code)
    assert message.startswith(f"metastone-jax {args[0]}") and "--bogus=1" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "text, shape",
    [
        ("data:1,fsdp:8,tensor:1", {"data": 1, "fsdp": 8, "tensor": 1}),
        ("fsdp:-1", {"data": 1, "fsdp": -1, "tensor": 1}),
        (" tensor:4 , data:2", {"data": 2, "fsdp": 1, "tensor": 4}),
    ],
)
def test_mesh_flag_forms(text, shape):
    assert parse_mesh(text) == shape


@pytest.mark.parametrize(
    "text, message",
    [
        ("data=1,fsdp=-1,tensor=1", "expected AXIS:N pairs such as data:N,fsdp:N,tensor:N"),
        ("data=1,fsdp=-1,tensor=1", "the AXIS=N form is not accepted"),
        ("data:1,pipe:2", "unknown axis 'pipe'"),
        ("fsdp:x", "size of 'fsdp' is not an integer"),
        ("fsdp:2,fsdp:4", "axis 'fsdp' is given twice"),
        ("tensor:0", "size of 'tensor' must be positive or -1"),
        ("", "expected AXIS:N pairs"),
    ],
)
def test_mesh_flag_errors(text, message):
    with pytest.raises(ValueError) as exc:
        parse_mesh(text)
    assert str(exc.value).startswith(f"--mesh={text}: ") and message in str(exc.value)


def test_mesh_flag_sets_config_mesh(capsys):
    by_key = run(capsys, "info", "--config=metastone-s1-1.5b", "--config.mesh.fsdp=8")
    assert run(capsys, "info", "--config=metastone-s1-1.5b", "--mesh=fsdp:8") == by_key
    assert "on mesh data:1,fsdp:8,tensor:1 " in by_key


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "--mesh=data=1,fsdp=-1,tensor=1"], "the AXIS=N form is not accepted"),
        (["convert", "hf-to-jax", "--hf_dir=x", "--out=y", "--mesh=fsdp=2"], "AXIS=N form"),
        (["plan", "--mesh=fsdp=8"], "expected AXIS:N pairs such as data:N,fsdp:N,tensor:N"),
        (["info", "--mesh=fsdp:8", "--config.mesh.data=1"], "both set the mesh: give one"),
    ],
)
def test_mesh_flag_errors_on_the_command_line(args, message):
    with pytest.raises(SystemExit) as exc:
        main(["metastone-jax", *args])
    assert message in str(exc.value.code) and "\n" not in str(exc.value.code)


def test_config_preset_alone_is_the_packaged_file(capsys):
    by_path = run(capsys, "info", "--config=configs/model.py:tiny")
    assert run(capsys, "info", "--config=tiny") == by_path
    train = ("train.py", "meshes.py")  # the train command's files
    assert configs.resolve("tiny-sft", train) == configs.path("train.py") + ":tiny-sft"
    mesh_preset = configs.resolve("grpo-1.5b-v5e-8", train)
    assert mesh_preset == configs.path("meshes.py") + ":grpo-1.5b-v5e-8"
    assert configs.resolve("cpu", ("sweeps/cpu.py",)) == configs.path("sweeps/cpu.py")
    assert configs.resolve("configs/train.py:tiny-sft", train) == "configs/train.py:tiny-sft"
    # The repository's configs/ is the packaged directory.
    assert os.path.samefile(os.path.join(ROOT, "configs"), configs.DIR)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--workdir=/nonexistent/w", "--config=tiny"],
         "--config=tiny: unknown preset 'tiny'; expected one of ['demo-grpo', 'demo-sft', "
         "'grpo-1.5b', 'grpo-1.5b-v4-8'"),
        (["info", "--config=nope"], "expected one of ['demo', 'metastone-s1-1.5b'"),
        (["sweep", "--workdir=/nonexistent/w", "--config=gpu"], "expected one of ['cpu', "),
        (["plan", "--preset=grpo-1.5b"], "--preset=grpo-1.5b: unknown preset"),
        (["info", "--config=no/such.py:tiny"], "no such file 'no/such.py' (or name a packaged"),
    ],
)  # fmt: skip
def test_config_preset_errors_list_the_presets(args, message):
    with pytest.raises(SystemExit) as exc:
        main(["metastone-jax", *args])
    assert message in str(exc.value.code) and "\n" not in str(exc.value.code)
