"""Named model presets: a tiny test model, the demo model, and the released MetaStone-S1 sizes."""

from __future__ import annotations

from metastone_jax.config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # Tiny model for unit tests: GQA (4 heads / 2 kv heads), q/k/v bias, fp32 compute.
    "tiny": ModelConfig(
        vocab_size=128,
        d_model=64,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        d_ff=128,
        qkv_bias=True,
        max_len=256,
        compute_dtype="float32",
    ),
    # The end-to-end demo policy: small enough to train on a 2-core laptop CPU.
    "demo": ModelConfig(
        vocab_size=512,
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        d_ff=384,
        qkv_bias=True,
        max_len=512,
        compute_dtype="float32",
    ),
    # Shapes from huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B/blob/main/config.json
    # (hidden_size 1536, intermediate_size 8960, 28 layers, 12 heads, 2 kv heads, vocab 151936,
    # rope_theta 10000, rms_norm_eps 1e-6, max_position_embeddings 131072, untied).
    "metastone-s1-1.5b": ModelConfig(
        vocab_size=151936,
        d_model=1536,
        n_layers=28,
        n_heads=12,
        n_kv_heads=2,
        d_ff=8960,
        qkv_bias=True,
        rope_theta=10000.0,
        rms_eps=1e-6,
        max_len=131072,
        param_dtype="bfloat16",
        bos_token_id=151646,
        eos_token_id=151643,
    ),
    # Shapes from huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-7B/blob/main/config.json
    # (hidden_size 3584, intermediate_size 18944, 28 layers, 28 heads, 4 kv heads, vocab 152064,
    # rope_theta 10000, rms_norm_eps 1e-6, max_position_embeddings 131072, untied).
    "metastone-s1-7b": ModelConfig(
        vocab_size=152064,
        d_model=3584,
        n_layers=28,
        n_heads=28,
        n_kv_heads=4,
        d_ff=18944,
        qkv_bias=True,
        rope_theta=10000.0,
        rms_eps=1e-6,
        max_len=131072,
        param_dtype="bfloat16",
        bos_token_id=151646,
        eos_token_id=151643,
    ),
    # Shapes from huggingface.co/Qwen/QwQ-32B/blob/main/config.json
    # (hidden_size 5120, intermediate_size 27648, 64 layers, 40 heads, 8 kv heads, vocab 152064,
    # rope_theta 1e6, rms_norm_eps 1e-5, max_position_embeddings 40960, untied).
    "metastone-s1-32b": ModelConfig(
        vocab_size=152064,
        d_model=5120,
        n_layers=64,
        n_heads=40,
        n_kv_heads=8,
        d_ff=27648,
        qkv_bias=True,
        rope_theta=1000000.0,
        rms_eps=1e-5,
        max_len=40960,
        param_dtype="bfloat16",
        bos_token_id=151643,
        eos_token_id=151645,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """The preset called `name`; a ValueError lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}"
        ) from None
