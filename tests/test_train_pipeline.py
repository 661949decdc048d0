"""The train pipeline in process on the 8 simulated devices: SFT -> export -> GRPO + SPR from the
export (metrics, saved rollouts) -> a head-only SPR run on those rollouts (frozen backbone)."""

import os

import numpy as np
import pytest
from config_files import train_config

from metastone_jax.checkpoint import load_params_numpy
from metastone_jax.train.loop import train
from metastone_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sft_export(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sft"))
    train(train_config("tiny-sft", train={"steps": 150, "save_every": 150}), workdir)
    return workdir


def test_grpo_then_head_only_spr(sft_export, tmp_path):
    export = os.path.join(sft_export, "export")
    assert os.path.isfile(os.path.join(export, "hf", "tokenizer.model"))
    grpo_dir = str(tmp_path / "grpo")
    train(
        train_config(
            "tiny-grpo",
            init_ckpt=export,
            train={"steps": 2, "save_every": 1},
            data={"save_rollouts": True},
            rl={"max_new_tokens": 24},
        ),
        grpo_dir,
    )
    metrics = read_metrics(os.path.join(grpo_dir, "metrics.jsonl"))
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ("reward_mean", "policy_loss", "kl", "entropy", "spr_loss", "spr_kept_fraction",
                "score_correct", "score_incorrect", "score_gap", "grad_norm", "sprm_grad_norm",
                "tokens_per_s", "truncated_fraction"):  # fmt: skip
        assert key in metrics[-1], key
    assert metrics[-1]["spr_steps"] > 0  # the SPR loss saw step tokens in the rollouts
    assert os.listdir(os.path.join(grpo_dir, "tensorboard"))
    rollouts = os.path.join(grpo_dir, "rollouts")
    assert sorted(os.listdir(rollouts)) == ["step_000001.npz", "step_000002.npz"]

    spr_dir = str(tmp_path / "spr")
    config = train_config(
        "tiny-grpo",
        kind="spr",
        init_ckpt=os.path.join(grpo_dir, "export"),
        train={"steps": 3, "save_every": 3, "best_metric": "spr_loss", "best_mode": "min"},
        data={"rollouts_dir": rollouts},
        optim={"freeze_backbone": True},
    )
    train(config, spr_dir)
    _, before, _ = load_params_numpy(os.path.join(grpo_dir, "export"))
    _, after, _ = load_params_numpy(os.path.join(spr_dir, "export"))
    np.testing.assert_array_equal(after["embed"], before["embed"])
    np.testing.assert_array_equal(
        after["blocks"]["mlp"]["up_proj"]["kernel"], before["blocks"]["mlp"]["up_proj"]["kernel"]
    )
    assert np.abs(after["sprm"]["fc1"]["kernel"] - before["sprm"]["fc1"]["kernel"]).max() > 0


@pytest.mark.parametrize("top_k", [1, 0])
def test_grpo_rollouts_follow_rl_top_k(sft_export, tmp_path, top_k):
    """rl.top_k reaches the rollout sampler: at temperature 5, top-k 1 is greedy (every rollout
    of a prompt the same), while without it the rollouts of a prompt differ."""
    workdir = str(tmp_path / "grpo")
    rl = {"top_k": top_k, "temperature": 5.0, "max_new_tokens": 16}
    train(train_config("tiny-grpo", init_ckpt=os.path.join(sft_export, "export"),
                  train={"steps": 1, "save_every": 1, "export": False},
                  data={"save_rollouts": True}, rl=rl), workdir)  # fmt: skip
    rows = np.load(os.path.join(workdir, "rollouts", "step_000001.npz"))
    groups = rows["tokens"].reshape(-1, 4, rows["tokens"].shape[-1])  # tiny-grpo: rl.k = 4
    same = [bool((g == g[0]).all()) for g in groups]
    assert all(same) if top_k == 1 else not any(same)


def test_grpo_logprob_support_scores_the_sampled_distribution(sft_export, tmp_path):
    """rl.logprob_support="sampled" reaches the step: the same rollouts (same seed) get the
    entropy of the top-k 3 distribution they were drawn from (at most log 3), the whole
    softmax's is higher; an unknown value names the key."""
    entropy = {}
    for support in ("full", "sampled"):
        rl = {"top_k": 3, "temperature": 2.0, "max_new_tokens": 16, "logprob_support": support}
        workdir = str(tmp_path / support)
        once = {"steps": 1, "save_every": 1, "export": False}
        init = os.path.join(sft_export, "export")
        train(train_config("tiny-grpo", init_ckpt=init, train=once, rl=rl), workdir)
        (row,) = read_metrics(os.path.join(workdir, "metrics.jsonl"))
        assert np.isfinite(row["loss"])
        entropy[support] = row["entropy"]
    assert entropy["sampled"] <= np.log(3) + 1e-5 < entropy["full"]
    rl = {"logprob_support": "nucleus"}
    with pytest.raises(ValueError, match="rl.logprob_support='nucleus'"):
        train(train_config("tiny-grpo", init_ckpt=os.path.join(sft_export, "export"), rl=rl),
              str(tmp_path / "bad"))  # fmt: skip


@pytest.mark.slow  # two train runs; tests/test_packing.py checks the step itself by default
def test_packed_grpo_step_has_the_padded_steps_metrics(sft_export, tmp_path):
    """data.pack_tokens through the loop: the same rollouts (same seed and weights) packed
    into rows give the padded rows' step: the same token and step counts, and the same losses
    up to fp32 summation order. The SPR head's dropout is off: its mask is drawn over the
    layout's [rows, T] positions, so the two layouts draw different (equally likely) masks."""
    from tolerances import fp32_reduction_tol, transformer_terms

    from metastone_jax.presets import get_preset

    rows = {}
    for width in (0, 64):  # prompts of up to 48 + 16 new tokens: at most 64 per sequence
        workdir = str(tmp_path / f"pack{width}")
        once = {"steps": 1, "save_every": 1, "export": False}
        config = train_config("tiny-grpo", init_ckpt=os.path.join(sft_export, "export"),
                              train=once, rl={"max_new_tokens": 16},
                              data={"pack_tokens": width, "grad_accum": 2},
                              spr={"dropout": False})  # fmt: skip
        train(config, workdir)
        (rows[width],) = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    padded, packed = rows[0], rows[64]
    for key in ("tokens", "spr_steps", "n_correct", "n_incorrect", "reward_mean"):
        assert packed[key] == padded[key], key
    tol = fp32_reduction_tol(2 * transformer_terms(get_preset("tiny"), 64) + 32 * 64, 10.0)
    for key in ("loss", "policy_loss", "kl", "entropy", "spr_loss"):
        assert abs(packed[key] - padded[key]) <= tol, (key, packed[key], padded[key])


def test_saved_rollouts_only_for_spr(sft_export, tmp_path):
    config = train_config("tiny-sft", data={"rollouts_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="rollouts_dir"):
        train(config, str(tmp_path / "w"))


def test_unlearned_slips_need_the_synthetic_task(tmp_path, shared_dir):
    from metastone_jax import configs
    from metastone_jax.train.setup import _source

    config = configs.load("train.py", "demo-sft")
    config.data.source = os.path.join(shared_dir, "data", "aime24.jsonl")
    config.data.unlearned_slips = True
    with pytest.raises(ValueError, match=r"unlearned_slips.*aime24\.jsonl.*not 'synthetic'"):
        _source(config, str(tmp_path))
    config.data.unlearned_slips = False
    assert len(_source(config, str(tmp_path))) == 30
