"""Packing sequences into rows of a token budget (first-fit decreasing), with segment ids.

Padded training rows hold one sequence each, as long as the longest: with long-CoT length
spread most of a row is padding. Packing lays several sequences end to end in a row of
`width` tokens; each keeps its own segment id (1, 2, ... in the row; 0 = padding), so the model
attends within a sequence only and restarts positions at each one (model.segment_positions).

Packing runs per micro-batch: a micro-batch's sequences stay together, so every loss that is
normalised over a micro-batch (the token means, the SPR class counts) is unchanged. Per-row
values (advantages, SPR labels, include) become per-token arrays. Random draws over positions
(the SPR head's dropout) follow the layout: the same distribution, other draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices into `lengths`, each summing to at most `capacity`: longest first, each
    into the first bin with room (at most 11/9 of the optimal bin count + 1)."""
    too_long = [(i, n) for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        i, n = too_long[0]
        raise ValueError(
            f"packing: sequence {i} has {n} tokens, more than the row budget of {capacity} "
            "(raise data.pack_tokens to at least the longest prompt + response)"
        )
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def _spans(valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's valid span (start, length); the valid tokens must be contiguous."""
    n = valid.sum(axis=1)
    start = np.argmax(valid, axis=1)
    bad = [i for i in range(len(valid)) if not valid[i, start[i] : start[i] + n[i]].all()]
    if bad:
        raise ValueError(f"packing: row {bad[0]}'s valid tokens are not contiguous")
    return start, n


def pack_rows(batch: dict[str, np.ndarray], width: int, rows: int | None = None):
    """One micro-batch's rows -> packed rows.

    batch: arrays [n, T] (per token, aligned with batch["valid"]) or [n] (per row, spread over
    the row's tokens); "valid" marks each row's sequence (contiguous). rows: the packed row
    count (default: as many as first-fit decreasing needs; more pads with empty rows).
    -> {same keys [R, width], "segment_ids" [R, width] int32 (0: padding)}, the bins.
    """
    batch = {key: np.asarray(value) for key, value in batch.items()}
    start, lengths = _spans(batch["valid"].astype(bool))
    bins = first_fit_decreasing(lengths.tolist(), width)
    r = len(bins) if rows is None else rows
    if r < len(bins):
        raise ValueError(f"packing: {len(bins)} rows needed, only {r} allowed")
    out = {key: np.zeros((r, width), value.dtype) for key, value in batch.items()}
    segment_ids = np.zeros((r, width), np.int32)
    for b, members in enumerate(bins):
        at = 0
        for s, i in enumerate(sorted(members)):
            n, a = int(lengths[i]), int(start[i])
            for key, value in batch.items():
                out[key][b, at : at + n] = value[i, a : a + n] if value.ndim == 2 else value[i]
            segment_ids[b, at : at + n] = s + 1
            at += n
    out["valid"] = segment_ids > 0
    out["segment_ids"] = segment_ids
    return out, bins


def rows_needed(valid: np.ndarray, width: int) -> int:
    """The most packed rows any micro-batch of valid [A, b, T] needs."""
    valid = np.asarray(valid, bool)
    return max(len(first_fit_decreasing(_spans(v)[1].tolist(), width)) for v in valid)


def pack_micro_batches(batch: dict[str, np.ndarray], width: int, *, rows_multiple: int = 1,
                       rows: int | None = None):  # fmt: skip
    """Micro-batches [A, b, ...] -> packed [A, R, width]: each micro-batch packed on its own,
    R the most rows any needs (or `rows`, e.g. the most over several processes), rounded up to
    a multiple of `rows_multiple` (the devices the rows are sharded over)."""
    r = rows_needed(batch["valid"], width) if rows is None else rows
    r = -(-r // rows_multiple) * rows_multiple
    micro = [{k: np.asarray(v)[a] for k, v in batch.items()} for a in range(len(batch["valid"]))]
    packed = [pack_rows(m, width, rows=r)[0] for m in micro]
    return {k: np.stack([p[k] for p in packed]) for k in packed[0]}


def tokens_per_useful(batch: dict[str, np.ndarray]) -> float:
    """Positions a step processes per real token: size of the token arrays / valid count."""
    valid = np.asarray(batch["valid"])
    return valid.size / max(int(valid.sum()), 1)
