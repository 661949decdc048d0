"""Packed rows per micro-batch, simulated for the plan (data.pack_tokens > 0).

A packed micro-batch has as many rows as first-fit decreasing needs for its sequences
(data/packing.py), rounded up to the devices its rows are laid over. The plan takes the most
rows over RUNS simulated micro-batches: GRPO rollouts of prompt P (the padded width, an upper
bound) + a response drawn from the reference length distribution (lognormal, median G/4, sigma
0.7, capped at G; planning/occupancy.py). SFT rows' lengths are the data's and not known here:
the plan keeps one row per sequence, the most packing can need.
"""

from __future__ import annotations

import numpy as np

from metastone_jax.data.packing import first_fit_decreasing
from metastone_jax.planning.occupancy import RUNS, draw_lengths


def packed_rows(sequences: int, prompt: int, max_new: int, width: int, devices: int) -> int:
    """Rows of `width` tokens that `sequences` rollouts pack into (the most over RUNS draws),
    rounded up to a multiple of `devices`."""
    rng = np.random.default_rng(0)
    most = 0
    for _ in range(RUNS):
        lengths = prompt + draw_lengths(rng, sequences, max_new)
        most = max(most, len(first_fit_decreasing(lengths.tolist(), width)))
    return -(-most // devices) * devices
