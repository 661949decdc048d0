"""`train.stamps`: the settings a cached stage was made with, checked on reuse."""

import json
import os

import pytest
from ml_collections import ConfigDict

from metastone_jax.train import stamps


def test_claim_writes_then_accepts_the_same_settings(tmp_path):
    out = str(tmp_path / "spr" / "rollouts.npz")
    settings = {"seed": 0, "sampling": ConfigDict({"temperature": 3.0, "ks": (1, 2)})}
    stamps.claim(out, settings, output_exists=False)
    path = str(tmp_path / "spr" / "rollouts.stage.json")
    assert json.load(open(path)) == {"seed": 0, "sampling": {"temperature": 3.0, "ks": [1, 2]}}
    open(out, "w").close()
    stamps.claim(out, settings, output_exists=True)  # same settings (tuple vs stored list)
    assert [f for f in os.listdir(tmp_path / "spr") if ".tmp-" in f] == []


def test_claim_names_the_first_differing_nested_setting(tmp_path):
    out = str(tmp_path / "sft")
    stamps.claim(out, {"sft": {"lr": 1e-3, "steps": 10}, "seed": 0}, output_exists=False)
    with pytest.raises(ValueError) as err:
        stamps.claim(out, {"sft": {"lr": 1e-3, "steps": 20}, "seed": 0}, output_exists=True)
    msg = str(err.value)
    assert "sft.steps=10" in msg and "sft.steps=20" in msg and "sft.stage.json" in msg
    # A setting only one side has is a difference too.
    with pytest.raises(ValueError, match=r"sft.extra=None .* sft.extra=1"):
        stamps.claim(out, {"sft": {"lr": 1e-3, "steps": 10, "extra": 1}, "seed": 0},
                     output_exists=True)  # fmt: skip
    # The refused claims left the stamp as it was.
    assert json.load(open(tmp_path / "sft.stage.json"))["sft"]["steps"] == 10


def test_claim_without_output_takes_the_new_settings(tmp_path):
    """A stage that never finished (no output) is made again under the new settings; an output
    without a stamp (a workdir from before stamps) is taken as it is."""
    out = str(tmp_path / "eval")
    stamps.claim(out, {"a": 1}, output_exists=False)
    stamps.claim(out, {"a": 2}, output_exists=False)
    assert json.load(open(tmp_path / "eval.stage.json")) == {"a": 2}
    legacy = str(tmp_path / "old")
    stamps.claim(legacy, {"a": 3}, output_exists=True)
    assert json.load(open(tmp_path / "old.stage.json")) == {"a": 3}


def test_demo_settings_cover_each_stage_and_its_upstream():
    from metastone_jax import configs

    cfg = configs.load("demo.py", "quick")
    sft = stamps.sft_settings(cfg)
    rollouts = stamps.rollout_settings(cfg, 0, 64)
    head = stamps.head_settings(cfg, "filtered")
    ev = stamps.eval_settings(cfg, ["bce", "filtered"])
    assert sft["sft"]["lr"] == cfg.sft.lr and sft["task"]["max_ops"] == cfg.task.max_ops
    for downstream in (rollouts, head, ev):
        assert {k: downstream[k] for k in sft} == sft
    assert rollouts["sampling"]["temperature"] == cfg.sampling.temperature
    assert head["head"]["warmup_bce_steps"] == cfg.spr.warmup_bce_steps
    assert stamps.head_settings(cfg, "bce")["head"]["warmup_bce_steps"] == 0  # unused by BCE
    assert ev["heads"]["filtered"] == head["head"] and "progress" not in json.dumps(ev)
