"""Grading final answers against references: `answers_match` (answers.py), then math-verify
(sympy), with a timeout and a fallback.

Extraction, normalization, matching and voting live in metastone_jax/answers.py (pure Python,
shared with sampling); this module adds the symbolic check. Nothing here raises on odd model
output: unparseable pieces just yield ``False``.

``python -m metastone_jax.evaluate.grading --check FILE`` grades each row's reference solution
(last box of ``solution``) against its ``answer`` and lists the disagreements.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import threading

from metastone_jax import optional
from metastone_jax.answers import answers_match, extract_final_answer, unbox

__all__ = [
    "GRADE_METHODS",
    "grade_answer",
    "grade_detail",
]

# ---------------------------------------------------------------------------------------------
# Grading: answers_match, then math-verify (symbolic), with a timeout and a fallback
# ---------------------------------------------------------------------------------------------

# How ``grade_detail`` reached its verdict.
GRADE_METHODS = (
    "string_match",  # answers_match said True (the fast path: math-verify is not called)
    "math_verify",  # math-verify parsed both sides and decided
    "fallback_unparsed",  # math-verify could not parse a side: answers_match decides
    "fallback_timeout",  # math-verify ran past timeout_s: answers_match decides
    "fallback_error",  # math-verify raised (or is not installed): answers_match decides
    "no_answer",  # nothing to grade: no prediction, or no final answer in the text
)


class _Unparsed(Exception):
    pass


@functools.lru_cache(maxsize=4096)  # a gold is graded against many candidates
def _mv_parse(side: str, seconds: int | None) -> tuple:
    """math-verify's parse of ``\\boxed{side}``: LaTeX first, then plain expressions, no string
    fallback. Raises _Unparsed when nothing comes out (errors and timeouts are not cached)."""
    math_verify = optional.math_verify()
    config = [
        math_verify.LatexExtractionConfig(boxed_match_priority=0),
        math_verify.ExprExtractionConfig(),
    ]
    got = math_verify.parse(
        "\\boxed{" + side + "}", config, fallback_mode="no_fallback",
        parsing_timeout=seconds, raise_on_error=True,
    )  # fmt: skip
    if not got:
        raise _Unparsed(side)
    return tuple(got)


def _math_verify(pred: str, gold: str, seconds: int | None) -> bool:
    """math-verify's verdict on two answers (``verify(gold, pred)``, strict). Raises _Unparsed,
    math_verify's TimeoutException (a BaseException) past ``seconds`` per call (signal.alarm:
    main thread only; None = no timeout), or whatever math-verify raises."""
    math_verify = optional.math_verify()
    g, p = list(_mv_parse(gold, seconds)), list(_mv_parse(pred, seconds))
    return bool(math_verify.verify(g, p, timeout_seconds=seconds, raise_on_error=True))


def _timeout_exception() -> type[BaseException]:
    try:
        errors = optional.math_verify_errors()
    except ImportError:  # math-verify missing: the call itself fails -> fallback_error
        return TimeoutError
    return errors.TimeoutException


def _run_math_verify(pred: str, gold: str, timeout_s: float | None) -> tuple[bool | None, str]:
    """(verdict, "math_verify") or (None, the fallback method)."""
    timeout_exc = _timeout_exception()
    outcome: dict = {}

    def work(seconds):
        try:
            outcome["verdict"] = _math_verify(pred, gold, seconds)
        except _Unparsed:
            outcome["method"] = "fallback_unparsed"
        except (timeout_exc, TimeoutError):
            outcome["method"] = "fallback_timeout"
        except Exception:
            outcome["method"] = "fallback_error"

    if timeout_s is None or timeout_s <= 0:
        work(None)
    elif threading.current_thread() is threading.main_thread():
        work(max(1, math.ceil(timeout_s)))  # math-verify's own signal.alarm: whole seconds
    else:
        # signal.alarm only works in the main thread: run math-verify without its timeout in a
        # daemon thread and stop waiting after timeout_s. Python cannot kill a thread, so a
        # pathological comparison keeps a core busy in the background until sympy returns.
        worker = threading.Thread(target=work, args=(None,), name="math-verify", daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            return None, "fallback_timeout"
    if "verdict" in outcome:
        return outcome["verdict"], "math_verify"
    return None, outcome.get("method", "fallback_error")


def grade_detail(
    pred: str | None,
    gold: str,
    *,
    timeout_s: float | None = 5.0,
    extract: bool = False,
    fast_path: bool = True,
) -> tuple[bool, str]:
    """Whether ``pred`` is a correct answer for ``gold``, and how that was decided.

    ``pred`` is an answer (e.g. from ``extract_final_answer``; a leading ``\\boxed{}`` is
    unwrapped), or with ``extract=True`` a whole response whose final answer is extracted first.
    Order: no answer -> (False, "no_answer"); ``answers_match`` True -> (True, "string_match")
    (skipped with ``fast_path=False``); else math-verify (``parse`` of ``\\boxed{answer}`` on both
    sides, ``verify(gold, pred)``, strict) -> (verdict, "math_verify"). When math-verify cannot
    parse a side, times out or raises, ``answers_match`` decides and the method says why
    (``fallback_unparsed`` / ``fallback_timeout`` / ``fallback_error``; see GRADE_METHODS).

    Timeout: in the main thread each math-verify call (two parses, one verify) gets
    ceil(timeout_s) seconds through math-verify's own ``signal.alarm`` (it also cancels any
    alarm the caller had set). In other threads, where signals do not work, the whole comparison
    runs in a daemon thread and is abandoned after ``timeout_s``. ``timeout_s=None``: no limit.
    """
    answer = extract_final_answer(pred) if extract else pred
    if not isinstance(answer, str) or not answer.strip() or gold is None:
        return False, "no_answer"
    gold = str(gold)
    matched = answers_match(answer, gold)
    if matched and fast_path:
        return True, "string_match"
    verdict, method = _run_math_verify(unbox(answer), unbox(gold), timeout_s)
    return (matched, method) if verdict is None else (verdict, method)


def grade_answer(
    pred: str | None, gold: str, *, timeout_s: float | None = 5.0, extract: bool = False
) -> bool:
    """``grade_detail(...)[0]``: ``answers_match``, else math-verify (with timeout/fallback)."""
    return grade_detail(pred, gold, timeout_s=timeout_s, extract=extract)[0]


# ---------------------------------------------------------------------------------------------
# `python -m metastone_jax.evaluate.grading --check FILE`
# ---------------------------------------------------------------------------------------------


def check_reference_solutions(
    path: str, *, fast_path: bool = True, timeout_s: float | None = 5.0
) -> dict:
    """Grades each JSONL row's reference solution (its final answer: the last box of
    ``solution``) against its ``answer``. -> {"n", "agree", "methods": {method: count},
    "disagreements": [(id, extracted, gold)]}; ids are ``unique_id``/``id`` or ``line N``."""
    n, agree, methods, misses = 0, 0, {}, []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            rid = str(row.get("unique_id", row.get("id", f"line {lineno}")))
            pred, gold = extract_final_answer(row.get("solution", "")), str(row["answer"])
            ok, method = grade_detail(pred, gold, timeout_s=timeout_s, fast_path=fast_path)
            n += 1
            agree += ok
            methods[method] = methods.get(method, 0) + 1
            if not ok:
                misses.append((rid, pred, gold))
    return {"n": n, "agree": agree, "methods": methods, "disagreements": misses}


def _main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m metastone_jax.evaluate.grading")
    p.add_argument(
        "--check", required=True, metavar="FILE",
        help="JSONL with 'solution' and 'answer' (e.g. math500.jsonl)",
    )  # fmt: skip
    p.add_argument(
        "--no_fast_path", action="store_true",
        help="send every row through math-verify (no answers_match shortcut)",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=5.0, help="math-verify timeout, seconds")
    args = p.parse_args(argv)
    res = check_reference_solutions(
        args.check, fast_path=not args.no_fast_path, timeout_s=args.timeout
    )
    n = max(res["n"], 1)
    print(f"{args.check}: {res['agree']}/{res['n']} agree ({res['agree'] / n:.2%}); "
          f"paths: {res['methods']}")  # fmt: skip
    for rid, pred, gold in res["disagreements"]:
        print(f"  disagree {rid}: extracted {pred!r}, gold {gold!r}")


if __name__ == "__main__":
    _main()
