"""Shared bench helpers: best-of timing, the matmul roofline, one random Qwen2 in both formats."""

from __future__ import annotations

import os
import tempfile
import time


def best_time(fn, repeat: int = 1) -> float:
    """The fastest of `repeat` calls of fn(), in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_roofline(n: int = 2048, repeat: int = 5) -> float:
    """FLOP/s of a large fp32 jnp.dot on this machine (the practical compute roof)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    return 2 * n**3 / best_time(lambda: dot(a, b).block_until_ready(), repeat)


def qwen2_both_ways(*, vocab: int, hidden: int, layers: int, prefix: str) -> tuple[str, str, str]:
    """Makes a random Qwen2 (ff = 11/4 d, head_dim 64, 2 kv heads, untied) with transformers,
    converts it HF -> JAX (ours) and back JAX -> HF (theirs). Returns (tmp dir, our checkpoint,
    their HF directory); the caller removes the tmp dir."""
    import torch
    import transformers

    from metastone_jax.convert.hf import hf_to_jax, jax_to_hf

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        eos_token_id=None,
    )
    tmp = tempfile.mkdtemp(prefix=prefix)
    transformers.Qwen2ForCausalLM(config).save_pretrained(os.path.join(tmp, "hf"))
    ckpt, back = os.path.join(tmp, "ckpt"), os.path.join(tmp, "back")
    hf_to_jax(os.path.join(tmp, "hf"), ckpt, progress=False)
    jax_to_hf(ckpt, back, progress=False)
    return tmp, ckpt, back


def one_device_train_state(cfg, optim, *, with_ref: bool, seed: int = 0):
    """A train step's pieces for ModelConfig `cfg` on one device: (mesh, graphdef, tx, the
    state's shardings, fresh_state()), fresh_state() a new TrainState from the same weights
    each call (the compiled step donates its state)."""
    import jax
    from flax import nnx

    from metastone_jax.model import create_model
    from metastone_jax.sharding import make_mesh
    from metastone_jax.train.state import (
        init_train_state,
        make_optimizer,
        pure_params,
        state_shardings,
    )

    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    model = create_model(cfg, seed=seed, mesh=mesh)
    graphdef, params = nnx.graphdef(model), pure_params(model)
    tx = make_optimizer(optim)

    def init(p):
        return init_train_state(p, tx, seed=0, with_ref=with_ref)

    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    shardings = state_shardings(jax.eval_shape(init, params), param_shardings, mesh)
    init_jit = jax.jit(init, out_shardings=shardings)
    return mesh, graphdef, tx, shardings, lambda: init_jit(params)
