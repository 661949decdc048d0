"""Released rollout options against hand computation: the reward's format check
(rl.format_check) and truncated rollouts in the SPR loss (spr.truncated), plus their path from
the config to the train step (loop.step_config)."""

import os

import numpy as np
import pytest
from config_files import train_config

from metastone_jax.sample.sampler import LENGTH, STOPPED, Candidates
from metastone_jax.sprm.steps import StepTokens
from metastone_jax.train.loop import step_config
from metastone_jax.train.rollout import (
    assistant_prefix,
    grade_rollouts,
    pack_rollouts,
    well_formed,
)
from metastone_jax.train.validate import validate_train_config


def tiny_grpo():
    return train_config("tiny-grpo")


# ---------------------------------------------------------------------------------------------
# rl.format_check
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix, text, ok",
    [
        ("", "<think>a.\n\nb</think>\\boxed{3}", True),
        ("", "no tags \\boxed{3}", False),
        ("", "<think>a</think>b</think>\\boxed{3}", False),  # two </think>
        ("", "<think>a<think>b</think>\\boxed{3}", False),  # two <think>
        ("", "</think>a<think>\\boxed{3}", False),  # out of order
        ("<think>\n", "a</think>\\boxed{3}", True),  # the template opened the span
        ("<think>\n", "<think>a</think>\\boxed{3}", False),  # and the response opened another
    ],
)
def test_well_formed_hand_cases(prefix, text, ok):
    assert well_formed(text, prefix) is ok


def test_assistant_prefix_is_the_open_think_span_of_the_prompt():
    assert assistant_prefix("User: 2+2?\nAssistant: <think>\n") == "<think>\n"
    # Tags the prompt closes belong to its instructions, not to the assistant's turn.
    assert assistant_prefix("Think inside <think> </think>.\nUser: 2+2?\nAnswer: ") == ""
    assert assistant_prefix("User: 2+2?\nAnswer: ") == ""


def test_format_check_zeroes_malformed_correct_answers():
    texts = [
        ["<think>1+3=4.\n\n</think>\\boxed{4}", "1+3=4 \\boxed{4}", "<think>x</think>\\boxed{5}"],
        ["</think>\\boxed{7}", "<think><think>a</think>\\boxed{7}", "b</think>\\boxed{7}"],
    ]
    answers = ["4", "7"]
    # Answer alone: row 0 right, right, wrong; row 1 right three times.
    np.testing.assert_array_equal(grade_rollouts(texts, answers), [[1, 1, 0], [1, 1, 1]])
    # Format check, no prompt text: only the first of row 0 is well-formed.
    got = grade_rollouts(texts, answers, format_check=True)
    np.testing.assert_array_equal(got, [[1, 0, 0], [0, 0, 0]])
    # Prompt 1 opens the think span: its "</think>..." and "b</think>..." responses are
    # well-formed, the one with its own <think> holds two.
    prompts = ["Q: 1+3?\nAnswer: ", "Q: 3+4?\nAnswer: <think>\n"]
    got = grade_rollouts(texts, answers, format_check=True, prompts=prompts)
    np.testing.assert_array_equal(got, [[1, 0, 0], [1, 0, 1]])


# ---------------------------------------------------------------------------------------------
# spr.truncated
# ---------------------------------------------------------------------------------------------


def candidates():
    """One prompt, four candidates: stopped right, truncated wrong, truncated right, stopped
    wrong."""
    g = 3
    return Candidates(
        tokens=np.arange(12, dtype=np.int32).reshape(1, 4, g) + 10,
        length=np.array([[3, 3, 3, 2]]),
        finish=np.array([[STOPPED, LENGTH, LENGTH, STOPPED]]),
        logprob=np.zeros((1, 4)),
        step_scores=np.zeros((1, 4, 1)),
        step_index=np.full((1, 4, 1), -1),
        step_mask=np.zeros((1, 4, 1), bool),
    )


@pytest.mark.parametrize(
    "truncated, include",
    [("exclude", [True, False, True, True]), ("negative", [True, True, True, True])],
)
def test_truncated_wrong_rollouts_in_the_spr_loss(truncated, include):
    rewards = np.array([[1.0, 0.0, 1.0, 0.0]], np.float32)
    rows = pack_rollouts([[1, 2]], candidates(), rewards, prompt_width=2, pad_id=0,
                         truncated=truncated)  # fmt: skip
    assert rows["include"].tolist() == include
    assert rows["labels"].tolist() == [1.0, 0.0, 1.0, 0.0]  # a truncated wrong one: negative


def test_bad_truncated_value_names_the_key():
    with pytest.raises(ValueError, match=r"spr.truncated='drop'; expected one of"):
        pack_rollouts([[1, 2]], candidates(), np.zeros((1, 4), np.float32), prompt_width=2,
                      pad_id=0, truncated="drop")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Config -> train step
# ---------------------------------------------------------------------------------------------

STEP = StepTokens(step_ids=(5,), think_open=6, think_close=7)


def test_defaults_keep_the_project_behaviour():
    c = tiny_grpo()
    assert (c.rl.format_check, c.spr.scope, c.spr.ranks, c.spr.truncated) == (
        False, "batch", 0, "exclude",
    )  # fmt: skip
    cfg = step_config(c, STEP)
    assert (cfg.spr_scope, cfg.spr_ranks) == ("batch", 0)


def test_released_options_reach_the_step_config():
    c = tiny_grpo()
    c.spr.scope, c.spr.ranks = "rank", 4
    cfg = step_config(c, STEP)
    assert (cfg.spr_scope, cfg.spr_ranks) == ("rank", 4)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("scope", "global", r"config.spr.scope='global': expected one of \('batch', 'rank'\)"),
        ("truncated", "drop",
         r"config.spr.truncated='drop': expected one of \('exclude', 'negative'\)"),
        ("ranks", -1, r"config.spr.ranks=-1: expected an int >= 0"),
    ],
)  # fmt: skip
def test_bad_values_fail_when_the_config_is_built_naming_the_key(key, value, message):
    c = tiny_grpo()
    c.spr[key] = value
    with pytest.raises(ValueError, match=message):
        validate_train_config(c)


def test_rank_scope_needs_ranks_that_divide_a_micro_batch():
    c = tiny_grpo()  # tiny-grpo: 8 prompts x 4 rollouts, one micro-batch of 32 rows
    c.spr.scope, c.spr.ranks = "rank", 3
    with pytest.raises(ValueError, match=r"config.spr.ranks=3: expected a divisor of the 32"):
        validate_train_config(c)
    c.spr.ranks = 4
    validate_train_config(c)


def test_options_reach_the_rollouts_of_a_grpo_step(tmp_path):
    """One GRPO step from scratch with the released options: the saved rollouts keep the
    truncated wrong ones (spr.truncated="negative"), the reward runs the format check on the
    decoded prompts, and the SPR loss runs under the per-rank scope (the mesh's 8 fsdp ranks,
    4 of the 32 rollouts each)."""
    from metastone_jax.train.loop import train
    from metastone_jax.train.metrics import read_metrics

    c = tiny_grpo()
    c.train.update(steps=1, save_every=1, progress=False, export=False)
    c.data.update(save_rollouts=True, synthetic_size=64)
    c.rl.update(max_new_tokens=6, format_check=True)  # 6 tokens: most rollouts are cut
    c.spr.update(scope="rank", truncated="negative")
    train(c, str(tmp_path))
    (m,) = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert m["truncated_fraction"] > 0 and np.isfinite(m["spr_loss"])
    with np.load(os.path.join(tmp_path, "rollouts", "step_000001.npz")) as rows:
        assert rows["include"].all()
