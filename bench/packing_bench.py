"""GRPO step on heavy-tailed rollouts: padded rows vs packed rows, side by side in one run.

Rollouts as the issue sets them: prompts of 16 to --prompt tokens (left-padded to --prompt in the
padded layout), responses lognormal with median a quarter of the cap G (--max_new), sigma 0.7,
capped at G, with step tokens and think tags. The same rollouts go through the GRPO (+ SPR)
step twice: as padded rows [N, P + G] (train/rollout.py pack_rollouts' layout) and packed into
rows of --width tokens (default P + G) by first-fit decreasing (data/packing.py, one
micro-batch). The model is the demo preset's shape widened (d_model 256, 4 layers, vocab
4096), fp32, remat 'dots', LM head in chunks of 256, one device. Prints:
  - tokens processed per useful token (positions run through the step / real tokens) for both;
  - the losses and metrics of one step on each (same weights, same rollouts: they must agree);
  - the median step time of each over --steps steps (alternating rounds) and the ratio.

    .venv/bin/python bench/packing_bench.py [--rollouts 64 --max_new 1024 --width 1088]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def rollouts(rng, n: int, prompt: int, g: int, vocab: int):
    """Padded GRPO rows [n, prompt + g] with heavy-tailed response lengths."""
    import numpy as np

    from metastone_jax.planning.occupancy import draw_lengths

    lengths = draw_lengths(rng, n, g)
    width = prompt + g
    tokens = rng.integers(10, vocab, (n, width)).astype(np.int32)
    valid = np.zeros((n, width), bool)
    response = np.zeros((n, width), bool)
    for i, n_gen in enumerate(lengths):
        p = int(rng.integers(16, prompt + 1))
        valid[i, prompt - p : prompt + n_gen] = True
        response[i, prompt : prompt + n_gen] = True
        tokens[i, prompt] = 6  # <think>
        steps = rng.random(n_gen) < 0.05  # a step token now and then
        tokens[i, prompt + 1 : prompt + n_gen][steps[1:]] = 5
        if n_gen > 4:
            tokens[i, prompt + n_gen - 2] = 7  # </think>
    rewards = rng.integers(0, 2, n).astype(np.float32)
    return {
        "tokens": tokens, "valid": valid, "response_mask": response,
        "response_start": np.full((n,), prompt, np.int32),
        "advantages": rng.normal(size=n).astype(np.float32), "labels": rewards,
        "include": np.ones(n, bool),
    }, lengths  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rollouts", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--max_new", type=int, default=1024)
    parser.add_argument(
        "--width", type=int, default=0, help="packed row (data.pack_tokens); 0: P + G"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    args.width = args.width or args.prompt + args.max_new

    import jax
    import numpy as np
    from common import one_device_train_state

    from metastone_jax.config import ModelConfig
    from metastone_jax.data.packing import tokens_per_useful
    from metastone_jax.sprm.steps import StepTokens
    from metastone_jax.train.rollout import pack_for_training, split_micro
    from metastone_jax.train.state import OptimConfig
    from metastone_jax.train.step import StepConfig, compile_step, rollout_logprobs_fn

    step_tokens = StepTokens(step_ids=(5,), think_open=6, think_close=7)
    cfg = ModelConfig(
        vocab_size=4096, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=768,
        qkv_bias=True, max_len=4096, compute_dtype="float32", remat="dots",
    )  # fmt: skip
    rng = np.random.default_rng(0)
    rows, lengths = rollouts(rng, args.rollouts, args.prompt, args.max_new, cfg.vocab_size)
    padded = split_micro(rows, 1)
    packed = pack_for_training(padded, args.width, step=step_tokens)
    useful = int(rows["valid"].sum())
    print(f"{args.rollouts} rollouts, responses lognormal median {args.max_new // 4} (mean "
          f"{lengths.mean():.0f}, max {lengths.max()}) capped at {args.max_new}; "
          f"{useful} real tokens")  # fmt: skip
    for name, b in (("padded", padded), ("packed", packed)):
        print(f"  {name}: {b['tokens'].shape[1]} rows x {b['tokens'].shape[2]} tokens, "
              f"{tokens_per_useful(b):.3f} tokens processed per useful token")  # fmt: skip

    optim = OptimConfig(lr=1e-5, train_sprm=True)
    mesh, graphdef, tx, shardings, fresh = one_device_train_state(cfg, optim, with_ref=True)
    step_cfg = StepConfig(kind="grpo", step=step_tokens, logits_chunk=256, sprm_dropout=False)
    step = compile_step(graphdef, step_cfg, tx, mesh, shardings)
    logprobs = rollout_logprobs_fn(graphdef, mesh, temperature=1.0, logits_chunk=256)
    batches = {}
    for name, b in (("padded", padded), ("packed", packed)):
        state = fresh()
        old, ref = logprobs(state.params, state.ref_params, b)
        batches[name] = {**b, "old_logp": np.asarray(old), "ref_logp": np.asarray(ref) - 0.05}
    first = {}
    times = {"padded": [], "packed": []}
    for _ in range(args.rounds):
        for name in ("padded", "packed"):
            state = fresh()
            new, metrics = step(state, batches[name])  # compiles on the first round
            jax.block_until_ready(new)
            first.setdefault(name, jax.device_get(metrics))
            for _ in range(args.steps):
                state = fresh()
                jax.block_until_ready(state)
                t0 = time.perf_counter()
                new, metrics = step(state, batches[name])
                jax.block_until_ready(new)
                times[name].append(time.perf_counter() - t0)
    keys = ("loss", "policy_loss", "kl", "entropy", "spr_loss", "spr_steps", "tokens")
    for name in ("padded", "packed"):
        m = first[name]
        print(f"  {name}: " + ", ".join(f"{k} {float(m[k]):.6g}" for k in keys if k in m)
              + f"; step {statistics.median(times[name]):.3f} s (median of "
              f"{len(times[name])})")  # fmt: skip
    ratio = statistics.median(times["padded"]) / statistics.median(times["packed"])
    print(f"  packed step {ratio:.2f}x faster than padded (median times)")


if __name__ == "__main__":
    main()
