"""Memory planning for training runs on Cloud TPU slices (`metastone-jax plan`).

tpu.py (accelerator types, HBM per chip), memory.py (the accounting: every formula in its
docstring), state_bytes.py (exact train-state bytes from abstract shapes), from_config.py (a plan
from a train config; the check `train` runs first), report.py (table, JSON, refusal), cli.py.
"""
