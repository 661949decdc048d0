"""Top-p over row blocks vs over the whole [N, V] batch, alone and in the decode loop.

`top_p_mask` finds the nucleus cut by ~33 masked passes over the logits. Over the sampler
bench's [128, 16000] f32 logits (8 MiB, plus as much of probabilities) each pass rereads them
from memory; over blocks of 32 rows (`TOP_P_BLOCK_ELEMENTS`) the block stays in cache. Prints,
same inputs on both sides (the masks and the sampled tokens are checked equal):
  - `top_p_mask` alone at [128, 16000] and at the demo's [256, 512] (one block either way);
  - the sampler bench's decode (a random Qwen2-shaped model d=512 L=8 V=16000, 4 prompts x 32
    candidates, T 0.6, top-p 0.85, repetition penalty 1.05, 64 new tokens), blocked and not,
    in alternating rounds (this shared 2-core VM varies by +-10% call to call).

    .venv/bin/python bench/top_p_bench.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import time

from common import best_time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new_tokens", type=int, default=64)
    args = parser.parse_args()

    import jax
    import numpy as np

    from metastone_jax.config import ModelConfig
    from metastone_jax.model import create_model
    from metastone_jax.sample import processors, sampler
    from metastone_jax.sample.processors import SamplingParams
    from metastone_jax.sprm.steps import StepTokens

    default = processors.TOP_P_BLOCK_ELEMENTS

    def timed_mask(logits, elements):
        processors.TOP_P_BLOCK_ELEMENTS = elements
        fn = jax.jit(lambda x: processors.top_p_mask(x, 0.95))
        out = fn(logits).block_until_ready()
        return best_time(lambda: fn(logits).block_until_ready(), 20), out

    print(f"jax {jax.__version__}, {os.cpu_count()} CPU threads")
    print("top_p_mask alone (fastest of 20):")
    for n, v in ((128, 16000), (256, 512)):
        logits = jax.random.normal(jax.random.PRNGKey(0), (n, v)) * 3.3
        t_blocks, a = timed_mask(logits, default)
        t_whole, b = timed_mask(logits, 0)
        assert np.array_equal(np.asarray(a), np.asarray(b))
        processors.TOP_P_BLOCK_ELEMENTS = default
        rows = processors._block_rows(n, v)
        note = " (the same single block: noise)" if rows == n else ""
        print(f"  [{n}, {v}]: blocks of {rows} rows {t_blocks * 1e3:6.2f} ms, one block "
              f"{t_whole * 1e3:6.2f} ms: {t_whole / t_blocks:4.2f}x{note}")  # fmt: skip

    cfg = ModelConfig(vocab_size=16000, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2,
                      d_ff=1408, qkv_bias=True, max_len=512, compute_dtype="float32")  # fmt: skip
    model = create_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    prompts = rng.integers(10, cfg.vocab_size, (4, 64)).tolist()
    g = args.new_tokens
    # top-p 0.85: the decode loop's draw uses the exact mask when the cut is wider than
    # `draw.REJECTION_MAX_DROP` (at 0.95 it samples the nucleus by rejection, no mask).
    params = SamplingParams(temperature=0.6, top_p=0.85, repetition_penalty=1.05,
                            max_new_tokens=g)  # fmt: skip
    step = StepTokens(step_ids=(7,), think_open=None, think_close=None)

    def run():
        return sampler.generate(model, prompts, k=32, params=params, step=step,
                                seeds=list(range(4)))  # fmt: skip

    times, tokens = {default: [], 0: []}, {}
    for _ in range(args.rounds):
        for elements in (default, 0):
            processors.TOP_P_BLOCK_ELEMENTS = elements
            sampler._jitted.cache_clear()  # the block size is read at trace time
            tokens.setdefault(elements, run().tokens)  # compile (and the tokens, once)
            t0 = time.perf_counter()
            run()
            times[elements].append((time.perf_counter() - t0) / g * 1e3)
    processors.TOP_P_BLOCK_ELEMENTS = default
    assert np.array_equal(tokens[default], tokens[0]), "the two paths sampled different tokens"
    blocks, whole = np.array(times[default]), np.array(times[0])
    print(f"decode, 128 rows x {g} new tokens, ms per step over {args.rounds} alternating rounds:")
    print(f"  blocks    {' '.join(f'{t:6.1f}' for t in blocks)}  (median {np.median(blocks):.1f})")
    print(f"  one block {' '.join(f'{t:6.1f}' for t in whole)}  (median {np.median(whole):.1f})")
    print(f"  ratio of medians: {np.median(whole) / np.median(blocks):.2f}x; blocks faster in "
          f"{int(np.sum(blocks < whole))} of {args.rounds} rounds")  # fmt: skip


if __name__ == "__main__":
    main()
