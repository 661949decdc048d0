"""Final answers in model output: extraction, MATH-style normalization, matching and voting.

Pure Python, below both sampling (sample/search.py votes over candidates' answers) and evaluation
(evaluate/grading.py adds math-verify's symbolic check on top of `answers_match`). The
normalization follows the spirit of the MATH ``strip_string`` (Hendrycks et al.) and the Minerva
normalization, rewritten; every rule is listed in ``normalize_answer``. Nothing in this module
raises on odd model output: unparseable pieces just yield ``None`` (extraction) or ``False``
(matching).
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = [
    "answers_match",
    "extract_final_answer",
    "majority_vote",
    "normalize_answer",
    "unbox",
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


def unbox(s: str) -> str:
    """``\\boxed{X}`` -> X (a leading box, as ``normalize_answer`` rule 1); others unchanged."""
    s = s.strip()
    m = _BOX_RE.match(s)
    inner = _box_content(s, m.end()) if m else None
    return s if inner is None else inner


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
