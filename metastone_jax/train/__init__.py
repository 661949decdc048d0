"""Training: train state and optimizers, pure train steps, the loop, orbax checkpoints."""
