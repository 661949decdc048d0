"""Small top-k: max-and-count passes vs `lax.top_k` (XLA:CPU sorts), alone and in the decode loop.

Two comparisons in one run, same inputs on both sides:
  - `top_k_mask` on [N, V] logits at the demo's shape ([256, 512], k = 3) and the sampler
    bench's ([128, 16000]), for a few k;
  - one demo evaluation call of the sampler (8 prompts x 32 candidates, the demo model's shape
    with random weights, the demo's sampling: T 3.0, top-k 3, top-p 0.85, 128 new tokens,
    no stop token) with the passes and with `lax.top_k` (SMALL_TOP_K = 0).
Both find the same k-th value, so both calls sample the same tokens (checked).

    .venv/bin/python bench/top_k_bench.py
"""

from __future__ import annotations

import os

from common import best_time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    import jax
    import numpy as np

    from metastone_jax.model import create_model
    from metastone_jax.presets import get_preset
    from metastone_jax.sample import processors, sampler
    from metastone_jax.sample.processors import SamplingParams
    from metastone_jax.sprm.steps import StepTokens

    def timed_mask(logits, k, small):
        processors.SMALL_TOP_K = small
        fn = jax.jit(lambda x: processors.top_k_mask(x, k))
        out = fn(logits).block_until_ready()
        return best_time(lambda: fn(logits).block_until_ready(), 20), out

    print(f"jax {jax.__version__}, {os.cpu_count()} CPU threads")
    print("top_k_mask alone (fastest of 20):")
    default = processors.SMALL_TOP_K
    for n, v in ((256, 512), (128, 16000)):
        logits = jax.random.normal(jax.random.PRNGKey(0), (n, v)) * 3
        for k in (1, 3, 8, 16, 64):
            t_ours, a = timed_mask(logits, k, default)
            t_sort, b = timed_mask(logits, k, 0)
            assert np.array_equal(np.asarray(a), np.asarray(b))
            print(f"  [{n}, {v}] k={k:2d}: passes {t_ours * 1e3:7.2f} ms, lax.top_k "
                  f"{t_sort * 1e3:7.2f} ms: {t_sort / t_ours:5.1f}x")  # fmt: skip

    cfg = get_preset("demo")
    model = create_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, cfg.vocab_size, 40).tolist() for _ in range(8)]
    params = SamplingParams(temperature=3.0, top_p=0.85, top_k=3, max_new_tokens=128)
    step = StepTokens(step_ids=(7,), think_open=None, think_close=None)

    def call(small):
        processors.SMALL_TOP_K = small
        sampler._jitted.cache_clear()  # the threshold is read at trace time
        run = lambda: sampler.generate(model, prompts, k=32, params=params, step=step,  # noqa: E731
                                       seeds=list(range(8)))  # fmt: skip
        out = run()  # compile
        return best_time(run, 3), out

    t_ours, a = call(default)
    t_sort, b = call(0)
    processors.SMALL_TOP_K = default
    assert np.array_equal(a.tokens, b.tokens), "the two top-k paths sampled different tokens"
    n_tokens = int(a.length.sum())
    print(f"demo evaluation call (8 prompts x 32, {n_tokens} tokens, fastest of 3):")
    print(f"  passes    {t_ours:6.2f} s  ({n_tokens / t_ours:8.1f} tok/s)")
    print(f"  lax.top_k {t_sort:6.2f} s  ({n_tokens / t_sort:8.1f} tok/s)")
    print(f"  ratio: {t_sort / t_ours:.2f}x")


if __name__ == "__main__":
    main()
