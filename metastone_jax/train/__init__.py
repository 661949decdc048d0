"""Training: train state and optimizers, pure train steps, the loop, orbax checkpoints; a run's
memory plan (plan.py, `metastone-jax plan`); the demo's policy-and-heads stages, which the
scaling sweep trains with (policy_and_heads.py)."""
