"""Scaling sweeps and the test-time scaling law (docs/method.md section 6).

law.py: compute accounting, the accuracy = a * log10(C) + b fit, table and plot (no JAX).
sweep.py: the grid over model size x k x thinking budget, run locally or printed as commands.
cli.py: `metastone-jax sweep`.
"""

from metastone_jax.scaling.law import (
    LawFit,
    fit_log_law,
    plot_scaling,
    question_compute,
    sprm_head_flops,
    write_table,
)

__all__ = [
    "LawFit",
    "fit_log_law",
    "plot_scaling",
    "question_compute",
    "sprm_head_flops",
    "write_table",
]
