"""Training attention, forward + backward: the blocked online-softmax kernel
(attention/flash.py) vs today's causal-blocked dense attention (layers.Attention: 64-query
blocks, each against all earlier keys, with an explicit [B,T,S] mask), in one run.

One row, 8 query heads over 2 KV heads, head_dim 64, fp32, causal. For each length: XLA's
compiled memory analysis of the gradient program (temporaries: what the attention holds beyond
its inputs and outputs) and the fastest of --repeat calls, both sides, and the ratios.

    .venv/bin/python bench/attention_bench.py [--lengths 1024,4096,8192 --repeat 3]
"""

from __future__ import annotations

import argparse
import os
import types

from common import best_time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="1024,4096,8192")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--block", type=int, default=512)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from metastone_jax import layers
    from metastone_jax.attention.flash import flash_attention

    kh, g, hd = 2, 4, 64
    scale = hd**-0.5
    # What layers.Attention's attention methods read of the module.
    this = types.SimpleNamespace(scale=scale, _attend=lambda *a: layers.Attention._attend(this, *a))

    def dense(q, k, v, seg):
        """layers.Attention's training path: causal query blocks, each with its mask slice."""
        t = q.shape[3]
        causal = jnp.arange(t)[None, None, :] <= jnp.arange(t)[None, :, None]
        mask = causal & (seg > 0)[:, None, :]
        return layers.Attention._attend_causal_blocks(this, q, k, v, mask)  # [B,T,H,hd]

    def flash(q, k, v, seg):
        out = flash_attention(q, k, v, seg, seg, scale=scale, block_q=args.block,
                              block_k=args.block)  # fmt: skip
        return out.transpose(0, 3, 1, 2, 4).reshape(q.shape[0], q.shape[3], -1, hd)

    def measure(fn, q, k, v, seg, w):
        """(temporary bytes, fastest seconds) of fn's gradient program."""
        loss = lambda q, k, v: jnp.sum(fn(q, k, v, seg) * w)  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
        jax.block_until_ready(compiled(q, k, v))
        secs = best_time(lambda: jax.block_until_ready(compiled(q, k, v)), args.repeat)
        return compiled.memory_analysis().temp_size_in_bytes, secs

    print(f"1 row, {kh * g} heads / {kh} KV heads, head_dim {hd}, fp32, causal; flash blocks "
          f"{args.block}; jax {jax.__version__}, {os.cpu_count()} CPU threads")  # fmt: skip
    for t in [int(x) for x in args.lengths.split(",")]:
        key = jax.random.split(jax.random.PRNGKey(t), 4)
        q = jax.random.normal(key[0], (1, kh, g, t, hd), jnp.float32)
        k = jax.random.normal(key[1], (1, kh, t, hd), jnp.float32)
        v = jax.random.normal(key[2], (1, kh, t, hd), jnp.float32)
        w = jax.random.normal(key[3], (1, t, kh * g, hd), jnp.float32)
        seg = jnp.ones((1, t), jnp.int32)
        row = {name: measure(fn, q, k, v, seg, w) for name, fn in (("dense", dense),
                                                                    ("flash", flash))}  # fmt: skip
        (td, sd), (tf, sf) = row["dense"], row["flash"]
        print(f"T={t:6d}: temporaries dense {td / 2**20:9.1f} MiB, flash {tf / 2**20:7.1f} MiB "
              f"({td / tf:.1f}x less); fwd+bwd dense {sd * 1e3:8.1f} ms, flash "
              f"{sf * 1e3:8.1f} ms (flash / dense time {sf / sd:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
