"""pass@1 group counts when questions hold different numbers of candidates: per question
(floor(M/k) each) or common (floor(min M / k) for all, the released test/compute_metric.py)."""

import json

import pytest

from metastone_jax.evaluate import harness
from metastone_jax.evaluate.metrics import GROUP_COUNTS, method_accuracy, pool_metrics
from metastone_jax.main import main


def cand(correct, score):
    return {"answer": "x", "correct": correct, "step_scores": [score], "tokens": 5}


# k = 2. Q1 holds M=4 (2 groups), Q2 holds M=6 (3 groups); "common" keeps 2 groups of each.
Q1 = {"id": "q1", "candidates": [cand(True, 0.9), cand(False, 0.1),
                                 cand(False, 0.2), cand(True, 0.8)]}  # fmt: skip
Q2 = {"id": "q2", "candidates": [cand(False, 0.3), cand(True, 0.6), cand(True, 0.7),
                                 cand(False, 0.2), cand(True, 0.1), cand(False, 0.4)]}  # fmt: skip
# By hand. random (each group's first): Q1 c0 T, c2 F -> 1/2; Q2 c0 F, c2 T, c4 T -> 2/3 over
# three groups, 1/2 over the first two. sprm_geomean (one step: the score): Q1 c0, c3 -> 1;
# Q2 c1 T, c2 T, c5 F -> 2/3 over three groups, 1 over two.
# The released loop: K = min(4, 6) // 2 = 2; mean over i < K of the mean over questions of
# group i: random (1 + 0)/2 and (0 + 1)/2 -> 1/2; sprm (1 + 1)/2 twice -> 1.
EXPECTED = {
    "per_question": {"random": (1 / 2 + 2 / 3) / 2, "sprm_geomean": (1 + 2 / 3) / 2, "n": 5},
    "common": {"random": 1 / 2, "sprm_geomean": 1.0, "n": 4},
}


@pytest.mark.parametrize("groups", GROUP_COUNTS)
def test_group_count_hand_computation(groups):
    want = EXPECTED[groups]
    for method in ("random", "sprm_geomean"):
        got = method_accuracy([Q1, Q2], 2, method, groups)
        assert got["mean"] == pytest.approx(want[method], abs=1e-12), method
        assert got["n_groups"] == want["n"] and got["n_questions"] == 2
    pooled = pool_metrics([Q1, Q2], [2], methods=("random",), groups=groups)
    assert pooled[2]["methods"]["random"]["mean"] == pytest.approx(want["random"], abs=1e-12)


def test_equal_candidate_counts_make_the_rules_agree():
    q2 = {"id": "q2", "candidates": Q2["candidates"][:4]}
    for method in ("random", "sprm_geomean", "oracle"):
        a = method_accuracy([Q1, q2], 2, method, "per_question")
        b = method_accuracy([Q1, q2], 2, method, "common")
        assert a == b


def test_bad_group_rule_and_too_few_candidates():
    with pytest.raises(ValueError, match=r"groups: expected one of \('per_question', 'common'\)"):
        method_accuracy([Q1, Q2], 2, "random", "released")
    with pytest.raises(ValueError, match=r"question 'q1': 4 candidates, need at least k=5"):
        method_accuracy([Q1, Q2], 5, "random", "common")


def test_cli_rejects_an_unknown_group_rule_before_loading(tmp_path):
    with pytest.raises(SystemExit, match=r"metastone-jax evaluate: --groups: expected one of"):
        main(["metastone-jax", "evaluate", f"--ckpt={tmp_path}", "--benchmark=none.jsonl",
              "--samples=2", "--modes=low", "--groups=min"])  # fmt: skip


def test_cli_hands_the_group_rule_to_evaluate(tmp_path, monkeypatch, capsys):
    bench = tmp_path / "b.jsonl"
    bench.write_text("")
    seen = {}

    def fake_evaluate(ckpt, benchmark, **kwargs):
        seen.update(kwargs)
        return {"groups": kwargs["groups"]}

    monkeypatch.setattr(harness, "evaluate", fake_evaluate)
    for groups in GROUP_COUNTS:
        main(["metastone-jax", "evaluate", f"--ckpt={tmp_path}", f"--benchmark={bench}",
              "--samples=2", "--modes=low", f"--groups={groups}", "--json"])  # fmt: skip
        assert seen["groups"] == groups and json.loads(capsys.readouterr().out)["groups"] == groups
    main(["metastone-jax", "evaluate", f"--ckpt={tmp_path}", f"--benchmark={bench}",
          "--samples=2", "--modes=low", "--json"])  # fmt: skip
    assert seen["groups"] == "per_question"  # the default
