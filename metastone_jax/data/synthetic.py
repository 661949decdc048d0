"""A synthetic verifiable reasoning task: chained arithmetic, one step per operation.

    prompt:   "Start at 3. add 4, multiply by 2, subtract 5. What is the result?"
    solution: "<think>3+4=7.\\n\\n7*2=14.\\n\\n14-5=9.\\n\\n</think>The answer is \\boxed{9}."

Every intermediate result is written out, so an error happens in an individual step and the
final answer is checked exactly. Difficulty knobs: the number of operations and the operand range.
Records use the schema of `metastone_jax.data.builders` (id, prompt, answer, solution; the
builder adds the chat messages).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator

import numpy as np

from metastone_jax.sprm.steps import STEP_TEXT

OPS = {"+": ("add", lambda a, b: a + b), "-": ("subtract", lambda a, b: a - b),
       "*": ("multiply by", lambda a, b: a * b)}  # fmt: skip


SLIPS = (-10, -2, -1, 1, 2, 10)  # how a reflective trace's wrong first attempt is off
# What a reflective step's wrong first attempt gets wrong: the result of the right expression,
# or (written with consistent arithmetic) the operand, the operation or the carried value.
SLIP_KINDS = ("result", "operand", "op", "carry")
WAIT = ", wait, "  # between a reflective step's wrong attempt and its correction


def make_problem(
    rng: np.random.Generator,
    *,
    n_ops: int,
    max_operand: int,
    ops: str,
    reflect: float = 0.0,
    slips: tuple[str, ...] = ("result",),
):
    """(prompt, solution, answer) for one random chain of `n_ops` operations.

    With probability `reflect` a step first writes a wrong attempt and corrects itself within
    the step ("7+5=13, wait, 7+5=12.\n\n"), as long-CoT traces do: a policy trained on such
    traces must notice a wrong step where it would end, which is the very position whose
    feature the SPRM scores (docs/method.md section 2). `slips` (among SLIP_KINDS, drawn uniformly)
    says what the attempt gets wrong: the result, or with consistent arithmetic the operand
    ("7+6=13, wait, 7+5=12"), the operation ("7-5=2, wait, ...") or the carried value
    ("8+5=13, wait, ...")."""
    value = int(rng.integers(1, max_operand + 1))
    words, steps = [], []
    start = value
    for _ in range(n_ops):
        op = ops[int(rng.integers(len(ops)))]
        operand = int(rng.integers(1, max_operand + 1))
        name, fn = OPS[op]
        new = fn(value, operand)
        words.append(f"{name} {operand}")
        expr = f"{value}{op}{operand}"
        if reflect and rng.random() < reflect:
            wrong = _wrong_attempt(rng, value, op, operand, max_operand, ops, slips)
            steps.append(f"{wrong}{WAIT}{expr}={new}.\n\n")
        else:
            steps.append(f"{expr}={new}.\n\n")
        value = new
    prompt = f"Start at {start}. {', '.join(words)}. What is the result?"
    solution = "<think>" + "".join(steps) + f"</think>The answer is \\boxed{{{value}}}."
    return prompt, solution, str(value)


def _wrong_attempt(rng, value: int, op: str, operand: int, max_operand: int, ops: str, slips):
    """A reflective step's wrong first attempt, "a<op>b=c", of a kind drawn from `slips`; a
    result slip where the kind has no wrong value to offer (one operation, no operand nearby)."""
    kind = slips[int(rng.integers(len(slips)))] if len(slips) > 1 else slips[0]
    if kind == "operand":
        b = operand + int(rng.choice((-2, -1, 1, 2)))
        if not 1 <= b <= max_operand:
            b = operand - (b - operand)  # reflect into the operand range
        if 1 <= b <= max_operand:
            return f"{value}{op}{b}={OPS[op][1](value, b)}"
    if kind == "op" and len(ops) > 1:
        other = [o for o in ops if o != op]
        o = other[int(rng.integers(len(other)))]
        return f"{value}{o}{operand}={OPS[o][1](value, operand)}"
    if kind == "carry":
        a = value + int(rng.choice(SLIPS))
        return f"{a}{op}{operand}={OPS[op][1](a, operand)}"
    slip = int(SLIPS[int(rng.integers(len(SLIPS)))])  # the original draw: same data as before
    return f"{value}{op}{operand}={OPS[op][1](value, operand) + slip}"


def slip_spans(solution: str) -> list[tuple[int, int]]:
    """Where each reflective step's wrong attempt first departs from its correction: [start,
    end) character spans of `solution`, one character each, in order.

    "7+5=13, wait, 7+5=12.\n\n" -> the span of "3". Everything else is right to learn: the
    text before the slip, the arithmetic that follows from it, and the ", wait, " correction.
    SFT can leave these spans out of its loss (`config.data.unlearned_slips`), so that the
    policy learns to notice and correct a slip without learning to make one. A wrong attempt
    that is a prefix of its correction has no such character and gets no span."""
    start = solution.find("<think>")
    if start < 0:
        return []
    spans, pos = [], start + len("<think>")
    for step in step_texts(solution)[0]:
        if WAIT in step:
            attempts = step.split(WAIT)
            wrong, right = attempts[0], attempts[-1]
            i = next((j for j, (a, b) in enumerate(zip(wrong, right, strict=False)) if a != b),
                     len(right))  # fmt: skip
            if i < len(wrong):
                spans.append((pos + i, pos + i + 1))
        pos += len(step) + len(STEP_TEXT)
    return spans


def make_examples(
    split: str,
    n: int,
    seed: int,
    *,
    min_ops: int = 2,
    max_ops: int = 3,
    max_operand: int = 9,
    ops: str = "+-",
    reflect: float = 0.0,
    slips: str = "result",
) -> Iterator[dict[str, str]]:
    """`n` records for `split`, a pure function of (split, n, seed, knobs). `slips`: the kinds
    of a reflective step's wrong attempt, comma-separated among SLIP_KINDS (`make_problem`)."""
    kinds = tuple(k.strip() for k in slips.split(","))
    if not kinds or set(kinds) - set(SLIP_KINDS):
        raise ValueError(f"synthetic task: slips={slips!r}; expected kinds among {SLIP_KINDS}")
    if min_ops < 1 or max_ops < min_ops:
        raise ValueError(f"synthetic task: need 1 <= min_ops <= max_ops, got {min_ops}, {max_ops}")
    unknown = set(ops) - set(OPS)
    if unknown:
        raise ValueError(f"synthetic task: unknown ops {sorted(unknown)}; expected among {OPS}")
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    for i in range(n):
        n_ops = int(rng.integers(min_ops, max_ops + 1))
        prompt, solution, answer = make_problem(
            rng, n_ops=n_ops, max_operand=max_operand, ops=ops, reflect=reflect, slips=kinds
        )
        yield {
            "id": f"{split}-{i}",
            "prompt": prompt,
            "answer": answer,
            "solution": solution,
        }


# ---------------------------------------------------------------------------------------------
# Exact step checking (the task's own process labels, for diagnosis; the SPRM never sees them)
# ---------------------------------------------------------------------------------------------

_STEP_RE = re.compile(r"^(-?\d+)([-+*])(-?\d+)=(-?\d+)$")
_START_RE = re.compile(r"^Start at (-?\d+)\. (.*)\. What is the result\?$")
_NAMES = {name: op for op, (name, _) in OPS.items()}


def parse_prompt(prompt: str) -> tuple[int, list[tuple[str, int]]]:
    """ "Start at 3. add 4, multiply by 2. What is the result?" -> (3, [("+", 4), ("*", 2)])."""
    m = _START_RE.match(prompt.strip())
    if m is None:
        raise ValueError(f"not a synthetic-task prompt: {prompt!r}")
    ops = []
    for part in m[2].split(", "):
        name, _, operand = part.rpartition(" ")
        if name not in _NAMES:
            raise ValueError(f"not a synthetic-task prompt: {prompt!r} (operation {name!r})")
        ops.append((_NAMES[name], int(operand)))
    return int(m[1]), ops


def step_texts(text: str) -> tuple[list[str], str]:
    """The think span's steps (each ended by ".\\n\\n") and what follows the last one in it."""
    think = text.split("<think>", 1)[-1].split("</think>", 1)[0]
    *steps, tail = think.split(STEP_TEXT)
    return steps, tail


def check_steps(prompt: str, text: str) -> list[bool]:
    """Per written step: True while every step so far is right (the last attempt of a reflective
    step counts; its left operand must be the previous result, its operation and operand the
    prompt's) -> [n_steps] "correct so far" labels."""
    return _step_labels(*parse_prompt(prompt), step_texts(text)[0])


def _step_labels(value: int, ops: list[tuple[str, int]], steps: list[str]) -> list[bool]:
    out, ok = [], True
    for i, step in enumerate(steps):
        m = _STEP_RE.match(step.split(WAIT)[-1].strip())
        if ok and (m is None or i >= len(ops)):
            ok = False
        elif ok:
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            right = OPS[ops[i][0]][1](value, ops[i][1])
            ok = (a, op, b, c) == (value, ops[i][0], ops[i][1], right)
            value = right
        out.append(ok)
    return out


def check_solution(prompt: str, text: str, answer: str | None = None) -> tuple[list[bool], str]:
    """(`check_steps` labels, `first_error` kind), checking the steps once."""
    value, ops = parse_prompt(prompt)
    steps, tail = step_texts(text)
    labels = _step_labels(value, ops, steps)
    if not all(labels):
        return labels, "step"
    if tail.strip():
        return labels, "unfinished"
    if len(steps) != len(ops):
        return labels, "steps"
    for op, operand in ops:
        value = OPS[op][1](value, operand)
    if answer is None:
        boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
        answer = boxed[-1] if boxed else None
    return labels, "ok" if answer is not None and answer.strip() == str(value) else "answer"


def first_error(prompt: str, text: str, answer: str | None = None) -> str:
    """Where a solution first goes wrong: "ok", "step" (a written step is wrong), "unfinished"
    (text after the last step token inside the think span, never scored), "steps" (too few or
    too many steps, all right), or "answer" (right steps, wrong final answer: after `</think>`,
    never scored). `answer`: the extracted final answer (default: the text's last \\boxed{})."""
    return check_solution(prompt, text, answer)[1]
