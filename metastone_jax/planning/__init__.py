"""Memory planning for training runs on Cloud TPU slices (`metastone-jax plan`).

tpu.py (accelerator types, HBM per chip), memory.py (the accounting: every formula in its
docstring), engine_memory.py (the rollout engine's terms, the slots and pages chosen, the segment
lowered for XLA's analysis), occupancy.py (the engine's schedule simulated), packed_rows.py
(packed rows per micro-batch), build.py (a plan assembled from both accountings), report.py
(table, JSON, refusal), info.py (`metastone-jax info`). A plan from a train config, the check
`train` runs first and the `plan` command live in train/ (plan.py, state_bytes.py,
plan_cli.py), above this package: train imports planning, never the reverse.
"""
