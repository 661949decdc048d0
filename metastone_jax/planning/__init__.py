"""Memory planning for training runs on Cloud TPU slices (`metastone-jax plan`).

tpu.py (accelerator types, HBM per chip), memory.py (the accounting: every formula in its
docstring), state_bytes.py (exact train-state bytes from abstract shapes), engine_memory.py (the
rollout engine's terms, the slots and pages chosen, the segment lowered for XLA's analysis),
occupancy.py (the engine's schedule simulated), from_config.py (a plan from a train config; the
check `train` runs first), report.py (table, JSON, refusal), cli.py.
"""
