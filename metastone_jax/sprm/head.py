"""The SPRM head (docs/method.md section 1): one logit per penultimate-layer feature vector.

The same layout as the released `score_module.pt` (sprm/score_module.py reads and writes it):
torch.nn.Sequential(Linear(D, 2D), ReLU, Dropout(0.5), Linear(2D, 1)). `model.Transformer` holds
one as its `sprm` attribute and scores features with it (`Transformer.sprm_logits`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from metastone_jax.layers import Linear, uniform_init


class SPRMHead(nnx.Module):
    """Linear(D, 2D) -> ReLU -> Dropout(0.5) -> Linear(2D, 1): one logit per feature vector.

    Initialised like torch.nn.Linear (uniform +-1/sqrt(fan_in)), as the released head was.
    """

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, dropout: float = 0.5):
        b1, b2 = d_model**-0.5, (2 * d_model) ** -0.5
        self.dropout = dropout
        self.fc1 = Linear(
            (d_model,), (2 * d_model,), ("embed",), ("sprm_hidden",), use_bias=True, rngs=rngs,
            kernel_init=uniform_init(b1), bias_init=uniform_init(b1),
        )  # fmt: skip
        self.fc2 = Linear(
            (2 * d_model,), (1,), ("sprm_hidden",), (None,), use_bias=True, rngs=rngs,
            kernel_init=uniform_init(b2), bias_init=uniform_init(b2),
        )  # fmt: skip

    def __call__(self, features: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """features [..., D] -> logits [...] (fp32). Dropout is active only given `dropout_rng`."""
        h = jax.nn.relu(self.fc1(features.astype(jnp.float32)))
        if dropout_rng is not None and self.dropout > 0:
            keep = jax.random.bernoulli(dropout_rng, 1.0 - self.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.dropout), 0.0)
        return self.fc2(h)[..., 0]
