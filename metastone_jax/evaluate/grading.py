"""Final-answer extraction, MATH-style normalization, answer matching, grading and voting.

Extraction, normalization, matching and voting are pure Python. The normalization follows the
spirit of the MATH ``strip_string`` (Hendrycks et al.) and the Minerva normalization, rewritten;
every rule is listed in ``normalize_answer``. ``grade_answer`` / ``grade_detail`` add a symbolic
check with math-verify (sympy) on top of ``answers_match``, with a timeout and a fallback.
Nothing in this module raises on odd model output: unparseable pieces just yield ``None``
(extraction) or ``False`` (matching, grading).

``python -m metastone_jax.evaluate.grading --check FILE`` grades each row's reference solution
(last box of ``solution``) against its ``answer`` and lists the disagreements.
"""

from __future__ import annotations

import functools
import math
import re
import threading
from fractions import Fraction

__all__ = [
    "GRADE_METHODS",
    "answers_match",
    "extract_final_answer",
    "grade_answer",
    "grade_detail",
    "majority_vote",
    "normalize_answer",
]

# ---------------------------------------------------------------------------------------------
# Brace-aware helpers
# ---------------------------------------------------------------------------------------------


def _brace_pairs(s: str) -> dict[int, int]:
    """Map each balanced ``{`` index to its ``}`` in one pass; an unclosed ``{`` is absent.

    Escaped characters (``\\{``, ``\\}``, ``\\\\``) are skipped: ``\\left\\{ ... \\right.``
    inside a box must not be counted as an unclosed group.
    """
    pairs: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


_TOKEN_RE = re.compile(r"\\(?:[a-zA-Z]+|.)|.", re.S)
_ROOT_INDEX_RE = re.compile(r"\s*\[[^\[\]]{0,40}\]")


def _brace_macro_args(s: str, cmd: str, nargs: int) -> str:
    """Rewrite ``\\frac12`` -> ``\\frac{1}{2}``, ``\\sqrt2`` -> ``\\sqrt{2}``.

    TeX lets a macro take a single token as argument; bracing every argument gives one spelling.
    Spaces before the arguments are dropped; a macro whose arguments cannot be read is left as is.
    One left-to-right pass with edits (not recursion) keeps deep nesting linear; nested macros
    inside braced arguments are reached by the same pass.
    """
    pairs = _brace_pairs(s)
    n = len(s)
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement), non-overlapping
    for m in re.finditer(re.escape(cmd) + r"(?![a-zA-Z])", s):
        j = m.end()
        if cmd == r"\sqrt":  # keep an optional root index: \sqrt[3]{x}
            om = _ROOT_INDEX_RE.match(s, j)
            if om:
                j = om.end()
        mine: list[tuple[int, int, str]] = []
        for _ in range(nargs):
            k = j
            while k < n and s[k].isspace():
                k += 1
            if k >= n or s[k] in "}^_$&":
                break
            if k > j:
                mine.append((j, k, ""))
            if s[k] == "{":
                if k not in pairs:
                    break
                j = pairs[k] + 1
            else:
                j = _TOKEN_RE.match(s, k).end()
                mine += [(k, k, "{"), (j, j, "}")]
        else:
            edits += mine
    out: list[str] = []
    i = 0
    for start, end, text in sorted(edits, key=lambda e: e[0]):  # stable: keeps "}{" order
        out.append(s[i:start] + text)
        i = max(i, end)
    out.append(s[i:])
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")

# Fallbacks when no box is present, most specific first; ``.`` stops at the end of the line.
_FALLBACK_RES = [
    re.compile(r"final\s+answer\s*(?:is|:)\s*:?[ \t]*(.*)", re.IGNORECASE),
    re.compile(r"answer\s+is\s*:?[ \t]*(.*)", re.IGNORECASE),
    re.compile(r"answer\s*:[ \t]*(.*)", re.IGNORECASE),
]


def _box_content(text: str, j: int, pairs: dict[int, int] | None = None) -> str | None:
    """Content of the box whose macro name ends at ``text[j]``, or None if malformed/empty."""
    k = j
    while k < len(text) and text[k].isspace():
        k += 1
    if k < len(text) and text[k] == "{":
        end = (_brace_pairs(text) if pairs is None else pairs).get(k)
        content = None if end is None else text[k + 1 : end].strip()
    else:  # ``\boxed 5`` form: one whitespace-delimited token, ending at ``$`` too
        m = re.match(r"[^\s${}]+", text[k:])
        content = m.group(0) if m else None
    return content or None


def _last_boxed(text: str) -> str | None:
    """Content of the last well-formed, non-empty ``\\boxed``/``\\fbox``.

    A box with unbalanced braces (usually a generation cut off at the token limit) or an empty one
    (the prompt's "within \\boxed{}" echoed back) counts as None, and the previous box is used.
    """
    pairs = _brace_pairs(text)  # one pass: re-scanning per box is quadratic on long outputs
    for m in reversed(list(_BOX_RE.finditer(text))):
        content = _box_content(text, m.end(), pairs)
        if content is not None:
            return content
    return None


def _clean_tail(tail: str) -> str | None:
    """Trim a fallback "answer is X" capture down to X."""
    x = tail.strip().strip("*").strip()
    # "The final answer is $5$. I hope it is correct." -> the first math span, if it opens the tail.
    for op, cl in (("$$", "$$"), ("$", "$"), (r"\(", r"\)"), (r"\[", r"\]")):
        if x.startswith(op):
            end = x.find(cl, len(op))
            if end > len(op):
                x = x[len(op) : end]
            break
    x = x.strip()
    prev = None
    while prev != x:  # trailing "." and "$" in any order, e.g. "5$." or "5.$"
        prev = x
        x = x.rstrip().rstrip(".").rstrip("$").rstrip().rstrip("*")
    x = x.lstrip("$").strip()
    return x or None


def extract_final_answer(text: str) -> str | None:
    """The final answer of a reasoning response, or None.

    Only the text after the last ``</think>`` is read (the reasoning may contain tentative boxes).
    The last well-formed ``\\boxed{...}``/``\\fbox{...}``/``\\boxed X`` wins; without one, the
    rest of the line after "final answer is", then "answer is", then "Answer:" (last occurrence
    of each) is used.
    """
    if not isinstance(text, str):
        return None
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    for pat in _FALLBACK_RES:
        for m in reversed(list(pat.finditer(text))):
            got = _clean_tail(m.group(1))
            if got is not None:
                return got
    return None


# ---------------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------------

_TEXT_MACROS = r"\\(?:text|textrm|textbf|textit|textnormal|mbox|mathrm|mathbf|mathit|operatorname)"
_TEXT_MACRO_OPEN_RE = re.compile(_TEXT_MACROS + r"\s*\{")
_UNIT_TAIL_RE = re.compile(r"([\sa-zA-Z.]*)\}\s*(?:\^\{?[23]\}?)?\s*$")
_TEXT_WRAPPER_RE = re.compile(_TEXT_MACROS + r"\s*\{([^{}]*)\}")
# Bare unit words after a number ("5 cm", "12 inches^2"): a closed list, so algebra is never hit.
# Single letters (m, s, h, g) are left out: "8 m" may be a product with a variable.
_UNIT_SET = frozenset(
    """
    degree degrees radian radians cent cents dollar dollars unit units square sq cubic inch inches
    foot feet ft yard yards yd mile miles mph meter meters metre metres cm mm km kilometer
    kilometers centimeter centimeters millimeter millimeters sec second seconds min minute minutes
    hr hrs hour hours day days week weeks month months year years gram grams kg pound pounds lb
    lbs ounce ounces oz liter liters litre litres ml gallon gallons cup cups ways people students
    point points percent times calories
    """.split()
)
_ASSIGN_RE = re.compile(r"^\s*(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?\s*=\s*(?P<rhs>.+)$", re.S)
_INT_RE = re.compile(r"^-?\d+$")
_DEC_RE = re.compile(r"^-?\d+\.\d+$")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\s*\d{3})+(?:\.\d+)?$")


# The two unit rules scan by hand: the natural regexes backtrack quadratically (or worse) on
# long junk such as a whole unboxed paragraph returned by a fallback.


def _drop_trailing_text_unit(s: str) -> str:
    """``5.4 \\text{ cents}`` -> ``5.4``: a final text wrapper of words after a number is a unit."""
    last = max(_TEXT_MACRO_OPEN_RE.finditer(s), key=lambda m: m.start(), default=None)
    if last is None or not _UNIT_TAIL_RE.match(s, last.end()):
        return s
    pre = s[: last.start()]
    return pre.rstrip() if any(c.isdigit() for c in pre) else s


def _drop_bare_units(s: str) -> str:
    """``12 square feet`` -> ``12``: trailing unit words after a number (no letters in between)."""
    body = re.sub(r"\^\{?[23]\}?$", "", s)
    end = len(body)
    dropped = False
    while True:
        stop = end
        while stop > 0 and body[stop - 1].isspace():
            stop -= 1
        start = stop
        while start > 0 and body[start - 1].isascii() and body[start - 1].isalpha():
            start -= 1
        if start == stop or body[start:stop] not in _UNIT_SET:
            break
        if start == 0 or not body[start - 1].isspace():
            break
        end, dropped = start, True
    if not dropped:
        return s
    pre = body[:end].rstrip()
    last_letter = max((i for i, c in enumerate(pre) if c.isascii() and c.isalpha()), default=-1)
    return pre if any(c.isdigit() for c in pre[last_letter + 1 :]) else s


def normalize_answer(ans: str) -> str:
    """Canonical string form of an answer for equality tests and voting.

    Rules, in order (the reason for each is in the comments below):
    1. ``\\boxed{X}`` wrapper -> X; newlines and TeX spaces (``\\, \\; \\: \\ ~``) -> space.
    2. Thousands separators ``10,\\!080`` / ``10{,}080`` -> ``10080``; then ``\\!`` dropped.
    3. ``\\dfrac``/``\\tfrac`` -> ``\\frac``; ``\\left``/``\\right`` and ``\\displaystyle`` dropped;
       ``\\le``/``\\ge`` -> ``\\leq``/``\\geq``; ``\\varnothing`` -> ``\\emptyset``.
    4. Degree marks (``^\\circ``, ``^{\\circ}``, ``°``), ``$``/``\\$`` and ``%``/``\\%`` dropped.
    5. A trailing ``\\text{...}``/``\\mbox{...}`` after a number is a unit and dropped
       (``5.4 \\text{ cents}`` -> ``5.4``); other text wrappers keep their content
       (``\\text{Evelyn}`` -> ``Evelyn``); bare unit words after a number are dropped (``5 cm``).
    6. A single-variable assignment ``x = 5`` / ``\\theta = ...`` -> right-hand side (only when
       there is exactly one ``=``, so equations like ``5x - 7y + 11z + 4 = 0`` are kept); a leading
       ``x \\in`` is dropped too.
    7. Trailing ``.`` dropped (sentence punctuation).
    8. Pure numbers: ``1,000`` -> ``1000`` (groups of exactly three digits; ``120, 240`` is read
       as 120240 too, since spacing cannot tell it apart from ``120,240`` and the rule must give
       both one form), leading zeros dropped (AIME ``033`` -> ``33``),
       ``.5`` -> ``0.5``, decimal trailing zeros dropped (``2.50`` -> ``2.5``, ``3.0`` -> ``3``).
    9. ``\\frac12`` -> ``\\frac{1}{2}``, ``\\sqrt2`` -> ``\\sqrt{2}``; integer ``a/b`` ->
       ``\\frac{a}{b}``; ``\\frac{-a}{b}`` -> ``-\\frac{a}{b}``.
    10. All whitespace removed; a lone multiple-choice ``(C)`` -> ``C``; an answer made only of
        words (``East``) is lower-cased.
    """
    if not isinstance(ans, str):
        return ""
    s = ans.strip()
    # 1. A gold or predicted answer may still carry its box.
    m = _BOX_RE.match(s)
    if m:
        inner = _box_content(s, m.end())
        if inner is not None:
            s = inner
    s = s.replace("\n", " ")
    # "\\" (a matrix row break) is matched first so its second backslash is not read as "\ ".
    s = re.sub(r"\\\\|\\[,;: ]|~", lambda m: m.group(0) if m.group(0) == "\\\\" else " ", s)
    # 2. Thousands separators must go before "\!" is dropped: ",\!" is how MATH writes them.
    s = re.sub(r"(\d),\\!\s*(?=\d{3}(?!\d))", r"\1", s)
    s = re.sub(r"(\d)\{,\}(?=\d{3}(?!\d))", r"\1", s)
    s = s.replace(r"\!", "")
    # 3. Spelling variants that render the same.
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])\.?", "", s)
    s = re.sub(r"\\displaystyle(?![a-zA-Z])", "", s)
    s = re.sub(r"\\le(?![a-zA-Z])", r"\\leq", s)
    s = re.sub(r"\\ge(?![a-zA-Z])", r"\\geq", s)
    s = s.replace(r"\varnothing", r"\emptyset")
    # 4. Decorations that never change the value asked for.
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])|°|\\degree(?![a-zA-Z])", "", s)
    s = s.replace(r"\$", "").replace("$", "")
    s = s.replace(r"\%", "").replace("%", "")
    # 5. Units: MATH golds write them as a trailing \text{ unit}; models often drop them.
    s = _drop_trailing_text_unit(s)
    for _ in range(4):  # innermost first; deeper nesting of text wrappers is not a real answer
        s = _TEXT_WRAPPER_RE.sub(r"\1", s)
    s = _drop_bare_units(s.strip())
    # 6. "x = 5" and "5" are the same answer; equations with more structure are kept whole.
    m = _ASSIGN_RE.match(s)
    if m and s.count("=") == 1:
        s = m.group("rhs")
    s = re.sub(r"^\s*[a-zA-Z]\s*\\in(?![a-zA-Z])\s*", "", s)
    # 7. Sentence punctuation.
    s = s.strip()
    while s.endswith(".") or s.endswith(","):
        s = s[:-1].rstrip()
    # 8. Pure numbers with thousands separators; "3,5,7" and "1,-2" are lists and kept.
    if _THOUSANDS_RE.match(s):
        s = re.sub(r",\s*", "", s)
    # 9. One spelling per fraction / root.
    s = _brace_macro_args(s, r"\frac", 2)
    s = _brace_macro_args(s, r"\sqrt", 1)
    s = re.sub(r"(?<![\w.\\/}])(\d+)\s*/\s*(\d+)(?![\w.{/])", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{\s*-\s*([^{}]*)\}", r"-\\frac{\1}", s)
    # 10. Spaces never matter in these answers.
    s = re.sub(r"\s+", "", s)
    s = s.replace(r"--\frac", r"\frac")  # from rule 9 on "-\frac{-1}{2}"
    s = re.sub(r"(?<![\d.])\.(?=\d)", "0.", s)
    if _INT_RE.match(s):
        s = re.sub(r"^(-?)0+(?=\d)", r"\1", s)
        if s == "-0":
            s = "0"
    elif _DEC_RE.match(s):
        s = re.sub(r"^(-?)0+(?=\d)", r"\1", s).rstrip("0").rstrip(".")
        if s in ("-0", ""):
            s = "0"
    m = re.fullmatch(r"\(([A-E])\)", s)
    if m:
        s = m.group(1)
    if len(s) > 1 and re.fullmatch(r"[A-Za-z]+", s):
        s = s.lower()
    return s


# ---------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------

_NUM = r"-?\d+(?:\.\d+)?"


def _to_number(s: str) -> Fraction | None:
    """Exact value of a normalized answer that is a plain number, else None.

    Accepts integers, decimals, ``\\frac{a}{b}`` (a, b numbers), mixed numbers ``1\\frac{4}{5}``
    (MATH writes them) and ``a\\times10^{k}``.
    """
    try:
        if re.fullmatch(_NUM, s):
            return Fraction(s)
        m = re.fullmatch(r"(-?)\\frac\{(" + _NUM + r")\}\{(" + _NUM + r")\}", s)
        if m:
            val = Fraction(m.group(2)) / Fraction(m.group(3))
            return -val if m.group(1) else val
        m = re.fullmatch(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}", s)
        if m:
            val = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
            return -val if m.group(1) else val
        m = re.fullmatch(r"(" + _NUM + r")\\times10\^\{?(-?\d+)\}?", s)
        if m and abs(int(m.group(2))) <= 400:
            return Fraction(m.group(1)) * Fraction(10) ** int(m.group(2))
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _close(a: Fraction, b: Fraction) -> bool:
    return abs(a - b) <= Fraction(1, 10**9) * max(abs(a), abs(b))


def _split_top_level(s: str) -> list[str]:
    """Split on commas that are not nested in any bracket."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts


def _norm_match(a: str, b: str, depth: int = 0) -> bool:
    if a == b:
        return True
    x, y = _to_number(a), _to_number(b)
    if x is not None and y is not None:
        return _close(x, y)
    # Tuples / intervals / lists: same brackets, same length, element-wise match, ORDER-SENSITIVE
    # (an ordered pair and a coordinate triple must keep order; for unordered root lists MATH golds
    # use the order the solution found them in, and we do not guess which lists are sets).
    if len(a) > 1 and len(b) > 1 and a[0] == b[0] and a[-1] == b[-1] and a[0] in "([":
        a, b = a[1:-1], b[1:-1]
    pa, pb = _split_top_level(a), _split_top_level(b)
    if len(pa) > 1 and len(pa) == len(pb) and depth < 16:  # depth: no RecursionError on junk
        return all(_norm_match(p, q, depth + 1) for p, q in zip(pa, pb, strict=True))
    return False


def answers_match(pred: str | None, gold: str) -> bool:
    """Whether ``pred`` is the same answer as ``gold``.

    Equal normalized strings, or equal numbers (integers, decimals, ``\\frac{a}{b}``, ``a/b``;
    relative tolerance 1e-9), applied element-wise to comma-separated tuples and intervals with the
    same brackets. Tuples are order-sensitive: ``1,-2`` does not match ``-2,1``.
    """
    if pred is None or gold is None:
        return False
    a, b = normalize_answer(pred), normalize_answer(gold)
    if not a or not b:
        return False
    return _norm_match(a, b)


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


def _unbox(s: str) -> str:
    """``\\boxed{X}`` -> X (a leading box, as ``normalize_answer`` rule 1); others unchanged."""
    s = s.strip()
    m = _BOX_RE.match(s)
    inner = _box_content(s, m.end()) if m else None
    return s if inner is None else inner


@functools.lru_cache(maxsize=4096)  # a gold is graded against many candidates
def _mv_parse(side: str, seconds: int | None) -> tuple:
    """math-verify's parse of ``\\boxed{side}``: LaTeX first, then plain expressions, no string
    fallback. Raises _Unparsed when nothing comes out (errors and timeouts are not cached)."""
    import math_verify

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
    import math_verify

    g, p = list(_mv_parse(gold, seconds)), list(_mv_parse(pred, seconds))
    return bool(math_verify.verify(g, p, timeout_seconds=seconds, raise_on_error=True))


def _timeout_exception() -> type[BaseException]:
    try:
        from math_verify.errors import TimeoutException
    except ImportError:  # math-verify missing: the call itself fails -> fallback_error
        return TimeoutError
    return TimeoutException


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
    verdict, method = _run_math_verify(_unbox(answer), _unbox(gold), timeout_s)
    return (matched, method) if verdict is None else (verdict, method)


def grade_answer(
    pred: str | None, gold: str, *, timeout_s: float | None = 5.0, extract: bool = False
) -> bool:
    """``grade_detail(...)[0]``: ``answers_match``, else math-verify (with timeout/fallback)."""
    return grade_detail(pred, gold, timeout_s=timeout_s, extract=extract)[0]


# ---------------------------------------------------------------------------------------------
# Voting
# ---------------------------------------------------------------------------------------------


def _vote_key(ans: str) -> str:
    """Group key: the exact value for numbers (so ``0.5`` and ``\\frac12`` vote together)."""
    s = normalize_answer(ans)
    num = _to_number(s)
    return f"#num:{num}" if num is not None else s


def majority_vote(
    answers: list[str | None], weights: list[float] | None = None
) -> tuple[str | None, int]:
    """Pick the answer with the most (weighted) votes.

    Answers are grouped by normalized form (numbers by exact value); ``weights`` (e.g. SPRM scores)
    are summed within a group, plain counts otherwise. None and answers that normalize to "" never
    win unless nothing else is there. Ties go to the group whose first member comes first.
    Returns (the first original answer of the winning group, its index); (None, 0) when no answer
    is usable. Raises ValueError for an empty list or mismatched weights.
    """
    if not answers:
        raise ValueError("majority_vote needs at least one answer")
    if weights is not None and len(weights) != len(answers):
        raise ValueError(f"{len(weights)} weights for {len(answers)} answers")
    totals: dict[str, float] = {}
    first: dict[str, int] = {}
    for i, ans in enumerate(answers):
        if ans is None:
            continue
        key = _vote_key(ans)
        if not key:
            continue
        totals[key] = totals.get(key, 0.0) + (1.0 if weights is None else float(weights[i]))
        first.setdefault(key, i)
    if not totals:
        return None, 0
    # dicts keep insertion order, i.e. by first member, so max() keeps the earliest on ties.
    best = max(totals, key=lambda k: totals[k])
    return answers[first[best]], first[best]


# ---------------------------------------------------------------------------------------------
# `python -m metastone_jax.evaluate.grading --check FILE`
# ---------------------------------------------------------------------------------------------


def check_reference_solutions(
    path: str, *, fast_path: bool = True, timeout_s: float | None = 5.0
) -> dict:
    """Grades each JSONL row's reference solution (its final answer: the last box of
    ``solution``) against its ``answer``. -> {"n", "agree", "methods": {method: count},
    "disagreements": [(id, extracted, gold)]}; ids are ``unique_id``/``id`` or ``line N``."""
    import json

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
    import argparse

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
