"""Checkpoint conversion between HF/PyTorch and metastone-jax."""
