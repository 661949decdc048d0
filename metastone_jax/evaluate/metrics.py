"""Metrics over a candidate pool: pure Python/numpy (no JAX), so any code can recompute them.

A question is a dict with "candidates": [{"answer", "correct", "step_scores", "tokens", ...}]
(the pool lines of `harness.sample_pool`). For a question with M candidates and a given k, the
candidates are split into disjoint consecutive groups of k; a method selects one candidate per
group; the question's accuracy is the share of groups whose selection is correct, and a metric
is the mean over questions (docs/method.md section 5), with a 95% interval.

How many groups (``GROUP_COUNTS``), when questions hold different numbers of candidates:
"per_question" (default): floor(M/k) for each question, every candidate used; "common": the
first floor(min over questions of M / k) groups for every question, as the released
``test/compute_metric.py`` (candidates past them are left out). With equal M they agree.
"""

from __future__ import annotations

import math

import numpy as np

from metastone_jax.answers import majority_vote

METHODS = (
    "random",  # the first candidate of the group (candidates are i.i.d.): plain pass@1
    "vote",  # majority over extracted answers
    "weighted_vote",  # votes weighted by the candidate's geomean SPRM score
    "sprm_geomean",  # argmax of the aggregated SPRM score (ties: the first) ...
    "sprm_mean",
    "sprm_min",
    "sprm_last",
    "sprm_product",
    "oracle",  # any candidate of the group correct: pass@k
)
GROUP_COUNTS = ("per_question", "common")
LOG_CLAMP = 1e-10  # geomean: log(max(p, 1e-10)), as sprm/aggregation.py and the released scorer
Z95 = 1.959963984540054


def candidate_score(step_scores, how: str = "geomean") -> float:
    """The SPRM score of one candidate from its counted step scores, as
    ``sprm.aggregation.aggregate`` (geomean clamps at 1e-10; product does not) but in float64;
    no step -> 0."""
    p = np.asarray(step_scores, np.float64)
    if p.size == 0:
        return 0.0
    if how == "geomean":
        return float(np.exp(np.mean(np.log(np.maximum(p, LOG_CLAMP)))))
    if how == "mean":
        return float(p.mean())
    if how == "min":
        return float(p.min())
    if how == "last":
        return float(p[-1])
    if how == "product":
        with np.errstate(divide="ignore"):
            return float(np.exp(np.sum(np.log(p))))
    raise ValueError(f"unknown aggregation {how!r}; expected geomean|mean|min|last|product")


def select_candidate(group: list[dict], method: str) -> int:
    """Index (within ``group``) of the candidate that ``method`` picks."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if method == "random":
        return 0
    if method == "oracle":
        return next((i for i, c in enumerate(group) if c["correct"]), 0)
    if method in ("vote", "weighted_vote"):
        weights = None
        if method == "weighted_vote":
            weights = [candidate_score(c["step_scores"]) for c in group]
        return majority_vote([c["answer"] for c in group], weights=weights)[1]
    scores = [candidate_score(c["step_scores"], method[len("sprm_") :]) for c in group]
    return int(np.argmax(scores))  # the first of equal maxima


def question_accuracy(question: dict, k: int, method: str, n_groups: int | None = None) -> float:
    """Share of the first ``n_groups`` (default floor(M/k)) consecutive groups of k whose
    selected candidate is correct."""
    cands = question["candidates"]
    most = len(cands) // k if k >= 1 else 0
    if most == 0:
        raise ValueError(
            f"question {question.get('id')!r}: {len(cands)} candidates, need at least k={k}"
        )
    if n_groups is None:
        n_groups = most
    elif not 1 <= n_groups <= most:
        raise ValueError(
            f"question {question.get('id')!r}: {n_groups} groups of k={k} asked, but its "
            f"{len(cands)} candidates hold 1..{most}"
        )
    hits = 0
    for g in range(n_groups):
        group = cands[g * k : (g + 1) * k]
        hits += bool(group[select_candidate(group, method)]["correct"])
    return hits / n_groups


def summarize(values) -> dict:
    """Mean and 95% interval of per-question accuracies: mean +- 1.96 * s / sqrt(n) with s the
    sample standard deviation (normal approximation), clipped to [0, 1]; one question gives
    the whole [0, 1]. -> {"mean", "ci95": [lo, hi], "n_questions"}."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        raise ValueError("no questions to summarize")
    mean = float(v.mean())
    half = Z95 * float(v.std(ddof=1)) / math.sqrt(v.size) if v.size > 1 else 1.0
    return {
        "mean": mean,
        "ci95": [max(0.0, mean - half), min(1.0, mean + half)],
        "n_questions": int(v.size),
    }


def group_counts(questions: list[dict], k: int, groups: str = "per_question") -> list[int]:
    """Groups of k per question under the ``groups`` rule (``GROUP_COUNTS``)."""
    if groups not in GROUP_COUNTS:
        raise ValueError(f"groups: expected one of {GROUP_COUNTS}, got {groups!r}")
    if k < 1:
        raise ValueError(f"k: expected an integer >= 1, got {k!r}")
    counts = [len(q["candidates"]) // k for q in questions]
    for q, n in zip(questions, counts, strict=True):
        if n == 0:
            raise ValueError(
                f"question {q.get('id')!r}: {len(q['candidates'])} candidates, need at least k={k}"
            )
    if groups == "common" and counts:
        counts = [min(counts)] * len(counts)
    return counts


def method_accuracy(
    questions: list[dict], k: int, method: str, groups: str = "per_question"
) -> dict:
    """``summarize`` of ``question_accuracy`` over the questions, plus "n_groups" (total);
    ``groups``: how many groups each question contributes (``GROUP_COUNTS``)."""
    counts = group_counts(questions, k, groups)
    per_question = [
        question_accuracy(q, k, method, n) for q, n in zip(questions, counts, strict=True)
    ]
    out = summarize(per_question)
    out["n_groups"] = sum(counts)
    return out


def tokens_per_question(questions: list[dict], k: int) -> float:
    """Generated tokens for k candidates: k x (mean tokens per candidate, averaged over
    questions)."""
    per_q = [np.mean([c["tokens"] for c in q["candidates"]]) for q in questions]
    return float(k * np.mean(per_q)) if per_q else 0.0


def pool_metrics(questions: list[dict], ks, methods=METHODS, groups: str = "per_question") -> dict:
    """{k: {"methods": {method: method_accuracy}, "tokens_per_question": float}}."""
    return {
        int(k): {
            "methods": {m: method_accuracy(questions, int(k), m, groups) for m in methods},
            "tokens_per_question": tokens_per_question(questions, int(k)),
        }
        for k in ks
    }
