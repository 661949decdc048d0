"""One random Qwen2 in both formats, so a bench runs identical weights on each side."""

from __future__ import annotations

import os
import tempfile


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
