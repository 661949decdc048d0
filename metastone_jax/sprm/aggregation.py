"""Step scores -> one candidate score (docs/method.md section 5): `aggregate` over a finished
candidate's steps, `RunningScore` for scores that grow inside a decode loop, `select` for the best
of K candidates.

Shapes: S steps, P questions, K candidates. Pure jnp functions of arrays (numpy input is
accepted), so they run under ``jit``; the ``how`` strings are static (Python values).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

AGGREGATIONS = ("geomean", "mean", "min", "last", "product")
LOG_CLAMP = 1e-10  # geometric mean: log(max(p, 1e-10)), as the released scorer


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


__all__ = ["AGGREGATIONS", "LOG_CLAMP", "RunningScore", "aggregate", "select"]
