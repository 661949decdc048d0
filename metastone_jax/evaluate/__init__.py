"""Evaluation on math benchmarks: grading (math-verify on top of metastone_jax/answers.py), the
resumable harness (candidate pools, beam evaluation), pool metrics, and the `evaluate` command."""
