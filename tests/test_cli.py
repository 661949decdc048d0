"""`metastone-jax info` / `demo` in-process: counts, memory and error messages."""

import re

import pytest

from metastone_jax.main import main


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
