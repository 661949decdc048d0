"""Every import that is deferred to the call that needs it: optional or heavy dependencies, and
jax internals that only tests reach. Nothing else in the package imports inside a function.

Each accessor imports on first use and returns the module (or class). Why each one waits:

- `torch`: optional (reading or writing `score_module.pt`; the `.safetensors` form needs none).
- `pyplot`: matplotlib is slow to import and only plots need it (demo/report.py, scaling/law.py).
- `math_verify`, `math_verify_errors`: math-verify pulls in sympy (seconds); only grading with
  the symbolic check needs it (evaluate/grading.py, which falls back when it is missing).
- `pyarrow_parquet`: optional, only for verl-style `.parquet` benchmark files (data/builders.py).
- `tensorboardx`: heavy-ish, only where a run writes metrics (train/metrics.py).
- `pallas_interpret_internals`: private, version-specific jax modules that
  attention/paged_tpu.py patches while the TPU kernel runs in Pallas' interpret mode (tests).
"""

from __future__ import annotations

import types


def torch():
    import torch

    return torch


def pyplot(*, force: bool = False):
    """matplotlib.pyplot on the non-interactive Agg backend (plots are written to files)."""
    import matplotlib

    matplotlib.use("Agg", force=force)
    import matplotlib.pyplot as plt

    return plt


def math_verify():
    import math_verify

    return math_verify


def math_verify_errors():
    import math_verify.errors

    return math_verify.errors


def pyarrow_parquet():
    import pyarrow.parquet

    return pyarrow.parquet


def tensorboardx():
    import tensorboardX

    return tensorboardX


def pallas_interpret_internals() -> types.SimpleNamespace:
    """jax._src modules of Pallas' TPU interpret mode: interpret_pallas_call, shared_memory and
    utils (jax._src.pallas.mosaic.interpret), indexing and types (jax._src.state)."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call, shared_memory, utils
    from jax._src.state import indexing
    from jax._src.state import types as state_types

    return types.SimpleNamespace(
        interpret_pallas_call=interpret_pallas_call, shared_memory=shared_memory, utils=utils,
        indexing=indexing, state_types=state_types,
    )  # fmt: skip
