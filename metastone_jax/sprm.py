"""SPRM bookkeeping: which tokens are scored steps, which features score them, and how step
scores are aggregated into one candidate score (docs/method.md sections 2 and 5).

Shapes: B batch, T sequence length, S steps, D feature width, P questions, K candidates.
Everything here is a pure jnp function of arrays (numpy input is accepted), so it runs under
``jit``; ``StepTokens`` and the ``mode``/``how`` strings are static (hashable / Python values).

Where the method is scored
--------------------------
The step token at position t is scored with the feature (second-to-last block output) at
position t-1, the position whose LM output *predicts* it. ``shift_for_scoring`` turns a token
mask into the matching mask over feature positions: apply the head to every position, then
``aggregate(scores, shift_for_scoring(mask))``. In a decode loop the feature that scores a
freshly sampled step token is the one computed in the same step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax.numpy as jnp

STEP_TEXT = ".\n\n"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# The Chinese variant (C-Eval, inference only): tokens built around one of these characters.
ZH_STEP_CHARS = ("\n", "\u3002")  # newline, ideographic full stop
MODES = ("train", "inference")
AGGREGATIONS = ("geomean", "mean", "min", "last", "product")
LOG_CLAMP = 1e-10  # geometric mean: log(max(p, 1e-10)), as the released scorer


@dataclasses.dataclass(frozen=True)
class StepTokens:
    """Token ids that mark steps, and the think-tag ids (``None``: not in the vocabulary).

    Hashable, so it can be a static argument of ``jit``.
    """

    step_ids: tuple[int, ...]
    think_open: int | None = None
    think_close: int | None = None

    def __post_init__(self):
        # Normalise to a sorted tuple of Python ints: hashing/equality must not depend on the
        # order or on numpy int types the ids were given in.
        ids = tuple(sorted({int(i) for i in self.step_ids}))
        object.__setattr__(self, "step_ids", ids)
        for name in ("think_open", "think_close"):
            v = getattr(self, name)
            object.__setattr__(self, name, None if v is None else int(v))

    @classmethod
    def from_tokenizer(
        cls,
        tok: Any,
        step_text: str | Sequence[int] = STEP_TEXT,
        think_open: str = THINK_OPEN,
        think_close: str = THINK_CLOSE,
        variant: Literal["en", "zh"] = "en",
    ) -> StepTokens:
        """Step and think ids for ``tok`` (a ``metastone_jax.data.tokenizer_base.Tokenizer``).

        ``variant="en"``: ``step_text`` is a string that must encode to exactly one id (which
        decodes back to it), or an explicit sequence of ids. ``variant="zh"``: every vocab id
        whose decoded text contains "\\n" or "。" with at most one other character (length <= 3);
        ``step_text`` is then ignored. Think ids come from ``tok.token_to_id``.
        """
        if variant == "en":
            step_ids = _english_step_ids(tok, step_text)
        elif variant == "zh":
            step_ids = _chinese_step_ids(tok)
        else:
            raise ValueError(f"unknown step-token variant {variant!r}; expected 'en' or 'zh'")
        return cls(step_ids, tok.token_to_id(think_open), tok.token_to_id(think_close))


def _english_step_ids(tok: Any, step_text: str | Sequence[int]) -> tuple[int, ...]:
    if not isinstance(step_text, str):
        ids = tuple(int(i) for i in step_text)
        bad = [i for i in ids if not 0 <= i < tok.vocab_size]
        if not ids or bad:
            raise ValueError(
                f"explicit step ids must be a non-empty list of ids in [0, {tok.vocab_size}); "
                f"got {list(ids)}"
            )
        return ids
    ids = list(tok.encode(step_text))
    if len(ids) != 1:
        raise ValueError(
            f"the step string {step_text!r} must be a single token for this tokenizer, but it "
            f"encodes to {len(ids)} ids {ids}; pass the step ids explicitly (step_text=[...]) "
            "or use a tokenizer with the step string in its vocabulary"
        )
    # Guard against a tokenizer that silently drops part of the string (e.g. whitespace):
    # every "." would then count as a step.
    decoded = tok.decode(ids)
    if decoded != step_text:
        raise ValueError(
            f"the step string {step_text!r} encodes to the single id {ids[0]}, which decodes "
            f"to {decoded!r}, not the step string; pass the step ids explicitly"
        )
    return tuple(ids)


def _chinese_step_ids(tok: Any) -> tuple[int, ...]:
    # As the released C-Eval scorer: for each target character, the decoded token contains it,
    # at most one other character remains once it is removed, and the token is <= 3 characters.
    ids = []
    for i in range(tok.vocab_size):
        try:
            text = tok.decode([i])
        except Exception:  # ids a tokenizer cannot decode (holes in the vocab) just don't count
            continue
        if len(text) <= 3 and any(
            c in text and len(text.replace(c, "")) <= 1 for c in ZH_STEP_CHARS
        ):
            ids.append(i)
    if not ids:
        raise ValueError("zh step variant: no vocab token contains '\\n' or '。' (length <= 3)")
    return tuple(ids)


def _shift_right(x: jnp.ndarray) -> jnp.ndarray:
    """``y[..., t] = x[..., t-1]``, ``y[..., 0] = False`` (there is nothing before t=0)."""
    return jnp.pad(x[..., :-1], [(0, 0)] * (x.ndim - 1) + [(1, 0)])


def isin_ids(tokens: jnp.ndarray, ids: tuple[int, ...]) -> jnp.ndarray:
    """bool, same shape as ``tokens``: the token is one of ``ids`` (any order)."""
    # searchsorted instead of an [..., len(ids)] comparison: the zh variant has many ids.
    if not ids:
        return jnp.zeros(tokens.shape, bool)
    table = jnp.asarray(sorted(ids), dtype=tokens.dtype)
    idx = jnp.clip(jnp.searchsorted(table, tokens), 0, len(ids) - 1)
    return table[idx] == tokens


def is_id(tokens: jnp.ndarray, i: int | None) -> jnp.ndarray:
    """bool, same shape as ``tokens``: the token is ``i`` (never, when ``i`` is None)."""
    return jnp.zeros(tokens.shape, bool) if i is None else tokens == i


def step_mask(
    tokens,
    step: StepTokens,
    *,
    mode: Literal["train", "inference"],
    valid=None,
    response_start=None,
) -> jnp.ndarray:
    """bool [B, T]: the step tokens that are scored (docs/method.md section 2).

    ``tokens`` int [B, T]; ``valid`` bool [B, T] marks real tokens (default: all); padding is
    never a step, never a think tag, and counts as "nothing" when it is x[t-1];
    ``response_start`` int [B] (or scalar): index in the [B, T] layout of the first response
    token, applied in both modes when given (the released scorer passes none at inference).
    A position counts when all hold:

    1. x[t] is a step token and x[t-1] is not (first of a run);
    2. x[t-1] is not ``<think>``;
    3. train: first ``<think>`` <= t <= last ``</think>``; a missing ``<think>`` puts the lower
       bound at the sequence start and a missing ``</think>`` the upper bound at its end, as
       the released training code (its argmax falls back to 0 / L-1), so no think tags means
       the whole sequence. Inference, as the released scorer (``test/score_model_queue.py``),
       which bounds *feature* positions p = t-1 to start < p < end: start is the ``<think>``
       when the sequence holds exactly one, else its first real token; end is the
       ``</think>`` when it holds exactly one, else past the sequence. In token positions:
       start + 1 < t <= end. So without exactly one ``<think>`` the second real token is
       never scored (t = start + 1 after ``<think>`` is rule 2 anyway), and a ``</think>``
       is itself in range (it only matters when the tag is also a step id);
    4. t >= response_start;
    5. x[t-1] is a real token: its feature is what scores x[t] (``shift_for_scoring``), so the
       first real token can never be scored (the released code never scores it either).

    "The sequence" at inference is what the released scorer re-tokenises: the chat-templated
    prompt and the response, so its first two tokens are prompt tokens. Pass the prompt too
    (left-padded rows are fine: padding is not a real token).
    """
    if mode not in MODES:
        raise ValueError(f"unknown step_mask mode {mode!r}; expected one of {MODES}")
    tokens = jnp.asarray(tokens)
    T = tokens.shape[-1]
    valid = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)

    is_step = isin_ids(tokens, step.step_ids) & valid
    is_open = is_id(tokens, step.think_open) & valid
    is_close = is_id(tokens, step.think_close) & valid
    # Invalid x[t-1] -> False in all three: padding before t is "nothing".
    mask = is_step & _shift_right(valid) & ~_shift_right(is_step) & ~_shift_right(is_open)

    pos = jnp.arange(T)
    if mode == "train":
        first_open = jnp.argmax(is_open, axis=-1)
        last_close = T - 1 - jnp.argmax(is_close[..., ::-1], axis=-1)
        lo = jnp.where(is_open.any(-1), first_open, 0)
        hi = jnp.where(is_close.any(-1), last_close, T - 1)
        in_range = (pos >= lo[..., None]) & (pos <= hi[..., None])
    else:
        # The fallback lower bound is the second real token: t must lie past it.
        second_real = jnp.argmax(jnp.cumsum(valid, axis=-1) >= 2, axis=-1)
        lo = jnp.where(is_open.sum(-1) == 1, jnp.argmax(is_open, axis=-1), second_real)
        hi = jnp.where(is_close.sum(-1) == 1, jnp.argmax(is_close, axis=-1), T)
        in_range = (pos > lo[..., None]) & (pos <= hi[..., None])
    mask &= in_range
    if response_start is not None:
        mask &= pos >= jnp.asarray(response_start)[..., None]
    return mask


def shift_for_scoring(mask) -> jnp.ndarray:
    """bool [B, T] over *feature* positions: p is set when token p+1 is a scored step.

    The feature at p is the one whose LM output predicts token p+1, so ``head(features)[p]``
    is the score of the step token at p+1; the last position scores nothing.
    """
    mask = jnp.asarray(mask, bool)
    return jnp.pad(mask[..., 1:], [(0, 0)] * (mask.ndim - 1) + [(0, 1)])


# ---------------------------------------------------------------------------------------------
# Aggregation (docs/method.md section 5)
# ---------------------------------------------------------------------------------------------


def _check_how(how: str) -> None:
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; expected one of {AGGREGATIONS}")


def _float(x) -> jnp.ndarray:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def aggregate(scores, mask=None, how: str = "geomean") -> jnp.ndarray:
    """Candidate score [...] from step scores (probabilities) [..., S] over ``mask`` [..., S].

    geomean: exp(mean(log(max(p, 1e-10)))) (the released selector); mean; min; last: the last
    masked step; product: exp(sum(log p)) (no clamp, so a zero step gives 0). A candidate with
    no masked step gets 0 whatever ``how`` is.
    """
    _check_how(how)
    p = _float(scores)
    m = jnp.ones(p.shape, bool) if mask is None else jnp.asarray(mask, bool)
    m = jnp.broadcast_to(m, p.shape)
    count = m.sum(-1)
    if p.shape[-1] == 0:  # no steps at all (min/argmax would fail on an empty axis)
        return jnp.zeros(p.shape[:-1], p.dtype)
    empty = count == 0
    n = jnp.maximum(count, 1).astype(p.dtype)
    if how == "geomean":
        out = jnp.exp(jnp.where(m, jnp.log(jnp.maximum(p, LOG_CLAMP)), 0).sum(-1) / n)
    elif how == "mean":
        out = jnp.where(m, p, 0).sum(-1) / n
    elif how == "min":
        out = jnp.where(m, p, jnp.inf).min(-1)
    elif how == "last":
        idx = p.shape[-1] - 1 - jnp.argmax(m[..., ::-1], axis=-1)
        out = jnp.take_along_axis(p, idx[..., None], axis=-1)[..., 0]
    else:  # product
        out = jnp.exp(jnp.where(m, jnp.log(p), 0).sum(-1))
    return jnp.where(empty, 0, out)


class RunningScore(NamedTuple):
    """Incremental ``aggregate`` for a decode loop (a pytree; all fields have the batch shape).

    ``state = RunningScore.init((B,)); state = state.update(score, take); state.value(how)``
    equals ``aggregate`` over the taken steps. ``sum_log`` is clamped (geomean), ``log_prod``
    is not (product).
    """

    count: jnp.ndarray
    sum_log: jnp.ndarray
    sum: jnp.ndarray
    min: jnp.ndarray
    last: jnp.ndarray
    log_prod: jnp.ndarray

    @classmethod
    def init(cls, shape, dtype=jnp.float32) -> RunningScore:
        z = jnp.zeros(shape, dtype)
        return cls(jnp.zeros(shape, jnp.int32), z, z, jnp.full(shape, jnp.inf, dtype), z, z)

    def update(self, score, take) -> RunningScore:
        """Add ``score`` [shape] where ``take`` [shape] bool; elsewhere the state is kept."""
        p = jnp.asarray(score).astype(self.sum.dtype)
        take = jnp.asarray(take, bool)
        return RunningScore(
            count=self.count + take.astype(jnp.int32),
            sum_log=self.sum_log + jnp.where(take, jnp.log(jnp.maximum(p, LOG_CLAMP)), 0),
            sum=self.sum + jnp.where(take, p, 0),
            min=jnp.where(take, jnp.minimum(self.min, p), self.min),
            last=jnp.where(take, p, self.last),
            log_prod=self.log_prod + jnp.where(take, jnp.log(p), 0),
        )

    def value(self, how: str = "geomean") -> jnp.ndarray:
        """The candidate score so far (0 while no step was taken)."""
        _check_how(how)
        n = jnp.maximum(self.count, 1).astype(self.sum.dtype)
        out = {
            "geomean": lambda: jnp.exp(self.sum_log / n),
            "mean": lambda: self.sum / n,
            "min": lambda: self.min,
            "last": lambda: self.last,
            "product": lambda: jnp.exp(self.log_prod),
        }[how]()
        return jnp.where(self.count == 0, 0, out)


def select(agg_scores) -> jnp.ndarray:
    """int [P]: the best of K candidates per question from [P, K] scores (ties: the first).

    NaN scores never win (an all-NaN row selects candidate 0).
    """
    a = _float(agg_scores)
    return jnp.argmax(jnp.where(jnp.isnan(a), -jnp.inf, a), axis=-1)


__all__ = [
    "AGGREGATIONS",
    "MODES",
    "RunningScore",
    "StepTokens",
    "aggregate",
    "is_id",
    "isin_ids",
    "select",
    "shift_for_scoring",
    "step_mask",
]
