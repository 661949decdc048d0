"""The decode loop's draw: the nucleus by rejection (`draw.draw`) vs the exact top-p mask then
a draw (`sample(process_logits(...))`, what the loop ran before), alone and in the loop.

Same inputs on both sides; the two sample the same law but not the same tokens (the rejection
rounds use their own uniforms). Prints:
  - the draw alone at the sampler bench's [128, 16000] (T 0.6, top-p 0.95, penalty 1.05);
  - the sampler bench's decode (a random Qwen2-shaped model d=512 L=8 V=16000, 4 prompts x 32
    candidates, 128 new tokens) with either draw, in alternating rounds (this shared 2-core VM
    varies by +-10% call to call).

    .venv/bin/python bench/draw_bench.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=128)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from metastone_jax.config import ModelConfig
    from metastone_jax.model import create_model
    from metastone_jax.sample import sampler
    from metastone_jax.sample.draw import draw
    from metastone_jax.sample.processors import SamplingParams, process_logits, sample
    from metastone_jax.sprm.steps import StepTokens

    def mask_then_draw(logits, seen, keys, params, forced=None):
        assert forced is None
        return sample(process_logits(logits, seen, params), keys, params)

    params = SamplingParams(temperature=0.6, top_p=0.95, repetition_penalty=1.05,
                            max_new_tokens=args.new_tokens)  # fmt: skip
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((128, 16000)).astype(np.float32) * 0.45)
    seen = jnp.asarray(rng.random((128, 16000)) < 0.01)
    keys = jax.random.split(jax.random.PRNGKey(0), 128)
    fns = {name: jax.jit(lambda x, s, k, f=f: f(x, s, k, params))
           for name, f in (("mask", mask_then_draw), ("rejection", draw))}  # fmt: skip
    alone = {name: [] for name in fns}
    for _ in range(10):
        for name, fn in fns.items():
            jax.block_until_ready(fn(logits, seen, keys))
            t0 = time.perf_counter()
            for _ in range(5):
                jax.block_until_ready(fn(logits, seen, keys))
            alone[name].append((time.perf_counter() - t0) / 5 * 1e3)
    a, b = np.median(alone["mask"]), np.median(alone["rejection"])
    print(f"jax {jax.__version__}, {os.cpu_count()} CPU threads")
    print(f"draw alone at [128, 16000], median of 10 rounds: mask {a:.2f} ms, rejection "
          f"{b:.2f} ms: {a / b:.2f}x")  # fmt: skip

    cfg = ModelConfig(vocab_size=16000, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2,
                      d_ff=1408, qkv_bias=True, max_len=512, compute_dtype="float32")  # fmt: skip
    model = create_model(cfg, seed=0)
    prompts = rng.integers(10, cfg.vocab_size, (4, 64)).tolist()
    step = StepTokens(step_ids=(7,), think_open=None, think_close=None)
    g = args.new_tokens
    times = {"mask": [], "rejection": []}
    for _ in range(args.rounds):
        for name, fn in (("mask", mask_then_draw), ("rejection", draw)):
            sampler.draw = fn
            sampler._jitted.cache_clear()  # the draw is traced into the loop
            run = lambda: sampler.generate(model, prompts, k=32, params=params, step=step,  # noqa: E731
                                           seeds=list(range(4)))  # fmt: skip
            run()  # compile
            t0 = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t0) / g * 1e3)
    sampler.draw = draw
    m, r = np.array(times["mask"]), np.array(times["rejection"])
    print(f"decode, 128 rows x {g} new tokens, ms per step over {args.rounds} alternating rounds:")
    print(f"  mask      {' '.join(f'{t:6.1f}' for t in m)}  (median {np.median(m):.1f})")
    print(f"  rejection {' '.join(f'{t:6.1f}' for t in r)}  (median {np.median(r):.1f})")
    print(f"  ratio of medians: {np.median(m) / np.median(r):.2f}x; rejection faster in "
          f"{int(np.sum(r < m))} of {args.rounds} rounds")  # fmt: skip


if __name__ == "__main__":
    main()
