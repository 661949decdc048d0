"""GRPO's loss and gradient with the rollouts scored under the sampled top-k/top-p support
(`rl.logprob_support=sampled`) vs under the whole softmax (the default, as verl), in one run.

The demo's GRPO study shape: the demo model (random weights), 16 prompts x 8 rollouts = 128 rows
of 168 tokens (40 prompt + 128 response), T 3.0, top-k 3, top-p 0.85; full logits and chunks of
32 positions. Then the same model with a 16,000-token vocabulary on 32 rows, where the cut's
passes over the vocabulary weigh more. The SPR term is off on both sides (it does not depend on
the support).

    .venv/bin/python bench/logprob_support_bench.py
"""

from __future__ import annotations

import os

from common import best_time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def timed_pair(cfg, n: int, t: int = 168, prompt: int = 40) -> None:
    """Prints the full-softmax and sampled-support times of one loss + gradient call."""
    import jax
    import numpy as np
    from flax import nnx

    from metastone_jax.model import create_model
    from metastone_jax.train.state import pure_params
    from metastone_jax.train.step import LOSSES, StepConfig

    model = create_model(cfg, seed=0)
    graphdef, params = nnx.graphdef(model), pure_params(model)
    rng = np.random.default_rng(0)
    valid = np.ones((n, t), bool)
    response = valid.copy()
    response[:, :prompt] = False
    batch = {
        "tokens": rng.integers(10, cfg.vocab_size, (n, t)).astype(np.int32),
        "valid": valid,
        "response_mask": response,
        "advantages": rng.normal(size=n).astype(np.float32),
        "old_logp": rng.normal(-1, 0.3, (n, t - 1)).astype(np.float32),
        "ref_logp": rng.normal(-1, 0.3, (n, t - 1)).astype(np.float32),
    }

    def timed(chunk, top_k, top_p):
        step_cfg = StepConfig(kind="grpo", temperature=3.0, spr_coef=0.0, logits_chunk=chunk,
                              support_top_k=top_k, support_top_p=top_p)  # fmt: skip

        def loss(p):
            return LOSSES["grpo"](p, batch, None, graphdef=graphdef, cfg=step_cfg)

        fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
        jax.block_until_ready(fn(params))
        return best_time(lambda: jax.block_until_ready(fn(params)), 5)

    print(f"demo model, vocab {cfg.vocab_size}, [{n}, {t}] rollouts:")
    for chunk in (0, 32):
        full, sampled = timed(chunk, 0, 1.0), timed(chunk, 3, 0.85)
        print(f"  logits_chunk={chunk:2d}: full softmax {full * 1e3:7.1f} ms, sampled support "
              f"{sampled * 1e3:7.1f} ms: {sampled / full:4.2f}x the time")  # fmt: skip


def main() -> None:
    import jax

    from metastone_jax.presets import get_preset

    print(f"jax {jax.__version__}, {os.cpu_count()} CPU threads; GRPO loss + gradient, fastest "
          "of 5")  # fmt: skip
    demo = get_preset("demo")
    timed_pair(demo, 128)
    timed_pair(demo.replace(vocab_size=16000), 32)


if __name__ == "__main__":
    main()
