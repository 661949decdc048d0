"""Which tokens are scored steps, and which features score them (docs/method.md section 2).

Shapes: B batch, T sequence length, N decoding rows, S steps. Everything here is a pure jnp
function of arrays (numpy input is accepted), so it runs under ``jit``; ``StepTokens`` and the
``mode`` strings are static (hashable / Python values).

The step rule is written once and shared by the two places that apply it: ``starts_step``
(rules 1-2: a step token that starts a run, not right after ``<think>``) and
``inference_range`` (rule 3 at inference) are used by ``step_mask`` over whole sequences and by
the decode loop (sample/sampler.py), which records step tokens as it draws them.

Where the method is scored
--------------------------
The step token at position t is scored with the feature (second-to-last block output) at
position t-1, the position whose LM output *predicts* it. ``shift_for_scoring`` turns a token
mask into the matching mask over feature positions: apply the head to every position, then
``aggregation.aggregate(scores, shift_for_scoring(mask))``. In a decode loop the feature that
scores a freshly sampled step token is the one computed in the same step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import jax.numpy as jnp

STEP_TEXT = ".\n\n"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# The Chinese variant (C-Eval, inference only): tokens built around one of these characters.
ZH_STEP_CHARS = ("\n", "\u3002")  # newline, ideographic full stop
MODES = ("train", "inference")


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
    """``y[..., t] = x[..., t-1]``, ``y[..., 0] = 0`` (False: there is nothing before t=0)."""
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


def starts_step(token: jnp.ndarray, prev: jnp.ndarray, step: StepTokens) -> jnp.ndarray:
    """bool, ``token``'s shape: rules 1-2 of the step rule (docs/method.md section 2).

    ``token`` is a step token and ``prev``, the token before it, is neither a step token (only
    the first of a run counts) nor ``<think>``. Whether ``prev`` is a real token, and the
    thinking range (rule 3), are for the caller: ``step_mask`` over whole sequences, the decode
    loop (sample/sampler.py ``advance``) token by token.
    """
    return (
        isin_ids(token, step.step_ids)
        & ~isin_ids(prev, step.step_ids)
        & ~is_id(prev, step.think_open)
    )


def inference_range(pos, n_open, open_pos, n_close, close_pos, *, lo_fallback, hi_fallback):
    """bool, ``pos``'s shape [..., S]: rule 3 at inference, lo < pos <= hi per row.

    lo is the position of the ``<think>`` when the row holds exactly one (``n_open`` == 1,
    ``open_pos``), else ``lo_fallback`` (the row's second real token); hi is that of the
    ``</think>`` when it holds exactly one, else ``hi_fallback`` (past the end). ``n_open``,
    ``open_pos``, ``n_close``, ``close_pos`` and the fallbacks are per row [...]."""
    lo = jnp.where(n_open == 1, open_pos, lo_fallback)[..., None]
    hi = jnp.where(n_close == 1, close_pos, hi_fallback)[..., None]
    return (pos > lo) & (pos <= hi)


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

    is_open = is_id(tokens, step.think_open) & valid
    is_close = is_id(tokens, step.think_close) & valid
    # Rules 1, 2 and 5: x[t-1] must be a real token, so padding before t is "nothing" (the
    # shifted-in 0 at t = 0 never counts).
    mask = starts_step(tokens, _shift_right(tokens), step) & valid & _shift_right(valid)

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
        in_range = inference_range(
            pos, is_open.sum(-1), jnp.argmax(is_open, axis=-1),
            is_close.sum(-1), jnp.argmax(is_close, axis=-1),
            lo_fallback=second_real, hi_fallback=T,
        )  # fmt: skip
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


__all__ = [
    "MODES",
    "STEP_TEXT",
    "StepTokens",
    "inference_range",
    "is_id",
    "isin_ids",
    "shift_for_scoring",
    "starts_step",
    "step_mask",
]
