"""A train step on long rows: peak memory and time of each attention path, side by side.

The model is the 40M Qwen2 shape of train_bench.py (hidden 512, 8 layers, 8 heads of 64, 2 KV
heads, vocab 16,000; random init), fp32, the SFT step with the train config's settings
(scan, remat 'dots', the LM head in chunks of 1,024 positions), AdamW. Each (length, attention)
runs in its own process, so that its peak resident memory (ru_maxrss) is its own; the sides
alternate for --rounds rounds. Per side it prints:
  - peak RSS of the process (weights, optimizer state and XLA's buffers included);
  - XLA's compiled temporaries of the step (memory_analysis().temp_size_in_bytes);
  - the median step time over --steps steps after one warm-up step, and the first loss
    (both sides start from the same weights and batch, so the losses agree);
  - a fingerprint of the compiled step (sha256 of its optimized HLO): equal = one program.
'dense' is the attention of earlier releases (scores per 64-query block over every earlier key,
a [B,T,T] mask); 'flash' the blocked online softmax (metastone_jax/attention/flash.py); 'auto'
the default (on CPU: dense below 2,048 tokens, flash from there).

    .venv/bin/python bench/long_train_bench.py [--lengths 256,8192] [--sides dense,auto]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def one_side(attention: str, seq: int, batch: int, steps: int) -> dict:
    import resource

    import jax
    import jax.numpy as jnp
    import numpy as np
    from common import one_device_train_state

    from metastone_jax.config import ModelConfig
    from metastone_jax.train.state import OptimConfig
    from metastone_jax.train.step import StepConfig, compile_step

    cfg = ModelConfig(
        vocab_size=16000, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, d_ff=1408,
        qkv_bias=True, max_len=max(seq, 4096), compute_dtype="float32", remat="dots",
        attention=attention,
    )  # fmt: skip
    optim = OptimConfig(lr=1e-4, train_sprm=False)
    mesh, graphdef, tx, shardings, fresh = one_device_train_state(cfg, optim, with_ref=False)
    state = fresh()
    tokens = np.random.default_rng(0).integers(10, cfg.vocab_size, (1, batch, seq))
    batch_arrays = {
        "tokens": jnp.asarray(tokens, jnp.int32),
        "valid": jnp.ones((1, batch, seq), bool),
        "loss_mask": jnp.asarray(np.broadcast_to(np.arange(seq) >= seq // 8, (1, batch, seq))),
    }
    step = compile_step(graphdef, StepConfig(kind="sft", logits_chunk=1024), tx, mesh, shardings)
    with jax.set_mesh(mesh):
        compiled = step.jitted.lower(state, batch_arrays).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    program = hashlib.sha256(compiled.as_text().encode()).hexdigest()[:12]
    times, losses = [], []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        state, metrics = step(state, batch_arrays)
        jax.block_until_ready(state)
        if i:
            times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"attention": attention, "seq": seq, "batch": batch, "temp": temp, "rss": rss,
            "step_s": statistics.median(times), "loss0": losses[0], "program": program}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="256,8192")
    parser.add_argument("--batch_tokens", type=int, default=8192, help="rows x length per step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sides", default="dense,auto")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # attention:seq:batch
    args = parser.parse_args()
    if args.one:
        attention, seq, batch = args.one.split(":")
        print(json.dumps(one_side(attention, int(seq), int(batch), args.steps)))
        return
    sides = args.sides.split(",")
    for seq in (int(x) for x in args.lengths.split(",")):
        batch = max(1, args.batch_tokens // seq)
        results = {s: [] for s in sides}
        for _ in range(args.rounds):
            for side in sides:
                cmd = [sys.executable, __file__, f"--one={side}:{seq}:{batch}",
                       f"--steps={args.steps}"]  # fmt: skip
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                results[side].append(json.loads(out.strip().splitlines()[-1]))
        print(f"\n{batch} x {seq} tokens per step, {args.rounds} rounds")
        for side in sides:
            r = results[side]
            rss = max(x["rss"] for x in r) / 2**20
            print(f"  {side:6s} peak RSS {rss:8.0f} MiB  XLA temporaries "
                  f"{r[0]['temp'] / 2**20:8.0f} MiB  step "
                  + " ".join(f"{x['step_s']:.2f}" for x in r)
                  + f" s  loss {r[0]['loss0']:.5f}  program {r[0]['program']}")  # fmt: skip
        base, *others = sides
        for side in others:
            ratio_rss = max(x["rss"] for x in results[base]) / max(x["rss"] for x in results[side])
            best = min(x["step_s"] for x in results[side])
            ratio_t = min(x["step_s"] for x in results[base]) / best
            print(f"  {base}/{side}: peak RSS {ratio_rss:.2f}x, step time (best of rounds) "
                  f"{ratio_t:.2f}x (> 1: {side} faster)")  # fmt: skip


if __name__ == "__main__":
    main()
