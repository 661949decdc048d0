"""The synthetic task's exact step checker and the SPRM pick diagnosis, on hand-made solutions."""

import math
import re

import numpy as np
import pytest

from metastone_jax.data.synthetic import (
    OPS,
    check_steps,
    first_error,
    make_examples,
    parse_prompt,
    slip_spans,
)
from metastone_jax.demo.diagnose import auroc, diagnose

PROMPT = "Start at 2. add 4, subtract 7, subtract 9, add 5. What is the result?"
RIGHT = "<think>2+4=6.\n\n6-7=-1.\n\n-1-9=-10.\n\n-10+5=-5.\n\n</think>The answer is \\boxed{-5}."


def test_parse_prompt_and_reject_other_text():
    assert parse_prompt(PROMPT) == (2, [("+", 4), ("-", 7), ("-", 9), ("+", 5)])
    assert parse_prompt("Start at 3. multiply by 2. What is the result?") == (3, [("*", 2)])
    with pytest.raises(ValueError, match="not a synthetic-task prompt"):
        parse_prompt("What is 2+2?")


@pytest.mark.parametrize(
    "text, labels, kind",
    [
        (RIGHT, [True] * 4, "ok"),
        # a reflective step counts by its last attempt
        (RIGHT.replace("6-7=-1.", "6-7=1, wait, 6-7=-1."), [True] * 4, "ok"),
        # wrong arithmetic at step 2: it and every later step are "not right so far"
        (RIGHT.replace("6-7=-1.\n\n-1-9=-10.\n\n-10+5=-5", "6-7=1.\n\n1-9=-8.\n\n-8+5=-3"),
         [True, False, False, False], "step"),
        # a wrong operand copied from the prompt, arithmetic consistent
        (RIGHT.replace("-1-9=-10.\n\n-10+5=-5", "-1-8=-9.\n\n-9+5=-4"),
         [True, True, False, False], "step"),
        # a wrong value carried from the previous step
        (RIGHT.replace("-10+5=-5", "-11+5=-6"), [True, True, True, False], "step"),
        (RIGHT.replace("-10+5=-5.\n\n</think>", "-10+5=-5</think>"), [True] * 3, "unfinished"),
        (RIGHT.replace("-10+5=-5.\n\n", ""), [True] * 3, "steps"),
        (RIGHT.replace("boxed{-5}", "boxed{5}"), [True] * 4, "answer"),
        ("<think>2+4=6.\n\n6-7x.\n\n</think>", [True, False], "step"),
    ],
)  # fmt: skip
def test_check_steps_and_first_error_by_hand(text, labels, kind):
    assert check_steps(PROMPT, text) == labels
    assert first_error(PROMPT, text) == kind


def test_generated_solutions_check_as_right():
    for rec in make_examples("train", 200, 3, min_ops=2, max_ops=4, reflect=0.5, ops="+-*"):
        assert first_error(rec["prompt"], rec["solution"]) == "ok", rec["solution"]
        assert all(check_steps(rec["prompt"], rec["solution"]))


@pytest.mark.parametrize("kind", ["result", "operand", "op", "carry"])
def test_each_slip_kind_gets_exactly_its_part_wrong(kind):
    """A reflective step "a<op>b=c, wait, <right step>": the wrong attempt differs from the right
    step in the named part only, with consistent arithmetic unless the result is the slip."""
    seen = 0
    for rec in make_examples("train", 300, 5, min_ops=3, max_ops=4, reflect=0.5, ops="+-*",
                             slips=kind):  # fmt: skip
        assert first_error(rec["prompt"], rec["solution"]) == "ok", rec["solution"]
        for step in rec["solution"].split("<think>")[1].split("</think>")[0].split(".\n\n"):
            if ", wait, " not in step:
                continue
            wrong, right = step.split(", wait, ")
            (a, op, b, c), (ra, rop, rb, rc) = (
                re.fullmatch(r"(-?\d+)([-+*])(-?\d+)=(-?\d+)", x).groups() for x in (wrong, right)
            )
            differs = {"carry": a != ra, "op": op != rop, "operand": b != rb, "result": c != rc}
            assert differs[kind], step
            assert [part for part, d in differs.items() if d and part != "result"] == (
                [] if kind == "result" else [kind]
            ), step
            consistent = int(c) == OPS[op][1](int(a), int(b))
            assert consistent == (kind != "result"), step
            seen += 1
    assert seen > 100
    with pytest.raises(ValueError, match="slips="):
        next(make_examples("train", 1, 0, slips="result,typo"))


def test_slip_spans_mark_the_first_wrong_character_of_each_attempt():
    sol = "<think>7+5=13, wait, 7+5=12.\n\n12-3=9.\n\n9-3=7, wait, 9-3=6.\n\n</think>x"
    assert [sol[a:b] for a, b in slip_spans(sol)] == ["3", "7"]
    assert slip_spans(RIGHT) == [] and slip_spans("no think span") == []
    # Every kind: the text before the span equals the correction's, the span's character does
    # not, and a step with no slip has no span.
    for rec in make_examples("train", 200, 1, min_ops=3, max_ops=4, reflect=0.5, ops="+-*",
                             slips="result,operand,op,carry"):  # fmt: skip
        text, spans = rec["solution"], slip_spans(rec["solution"])
        assert len(spans) == text.count(", wait, ")
        for a, b in spans:
            assert b == a + 1
            step_start = max(text.rfind(".\n\n", 0, a) + 3, text.find("<think>") + 7)
            wrong, right = text[step_start:].split(", wait, ")[:2]
            i = a - step_start
            assert wrong[:i] == right[:i] and wrong[i] != right[i : i + 1]


def test_auroc_against_pairwise_definition():
    rng = np.random.default_rng(0)
    y = rng.random(60) < 0.4
    s = np.round(rng.random(60), 1)  # ties on purpose
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
    assert auroc(y, s) == pytest.approx(np.mean(pairs))
    assert math.isnan(auroc([True, True], [0.1, 0.2]))


def test_diagnose_counts_the_picked_candidates_kinds():
    def cand(text, scores, correct):
        return {"text": text, "step_scores": scores, "correct": correct,
                "answer": text.rsplit("boxed{", 1)[-1].split("}")[0]}  # fmt: skip

    wrong_step = RIGHT.replace("6-7=-1.\n\n-1-9=-10.\n\n-10+5=-5", "6-7=1.\n\n1-9=-8.\n\n-8+5=-3")
    invisible = RIGHT.replace("boxed{-5}", "boxed{5}")
    q = {"prompt": PROMPT, "candidates": [
        cand(RIGHT, [0.9, 0.8, 0.7, 0.9], True),  # geomean ~0.82
        cand(invisible, [0.9, 0.9, 0.9, 0.9], False),  # outscores it: its error is after </think>
        cand(wrong_step, [0.9, 0.1, 0.2, 0.3], False),
        cand(RIGHT, [0.5, 0.5, 0.5, 0.5], True),
    ]}  # fmt: skip
    d = diagnose([q], ks=(1, 2, 4))
    assert d["candidates"] == {"ok": 0.5, "step": 0.25, "unfinished": 0.0, "steps": 0.0,
                               "answer": 0.25}  # fmt: skip
    assert d["picks"][1]["ok"] == 0.5 and d["picks"][1]["answer"] == 0.25  # every candidate
    assert d["picks"][2] == {"ok": 0.5, "step": 0.0, "unfinished": 0.0, "steps": 0.0,
                             "answer": 0.5}  # fmt: skip
    assert d["picks"][4]["answer"] == 1.0 and d["pick_accuracy"][4] == 0.0
    # step labels [T,T,T,T]*3 + [T,F,F,F]; scores of the F steps (0.1, 0.2, 0.3) are the lowest
    assert d["step_auroc"] == 1.0 and d["aligned_fraction"] == 1.0
    assert "_kind" not in q["candidates"][0]  # the pool is left as it was
