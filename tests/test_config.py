"""ModelConfig validation, hashability, presets, HF config round trips, and configs/model.py."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import pytest
import transformers

from metastone_jax.config import ModelConfig, RopeScaling, model_config_from_dict
from metastone_jax.presets import PRESETS, get_preset
from metastone_jax.sharding import make_mesh

BASE = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"d_model": -16}, r"ModelConfig\.d_model: expected a positive int, got -16"),
        ({"n_layers": 0}, r"ModelConfig\.n_layers: expected a positive int, got 0"),
        ({"vocab_size": -1}, r"ModelConfig\.vocab_size: expected a positive int"),
        ({"d_ff": 2.5}, r"ModelConfig\.d_ff: expected a positive int"),
        ({"n_heads": 3}, r"ModelConfig\.n_heads: expected a divisor of d_model=16, got 3"),
        ({"n_kv_heads": 3}, r"ModelConfig\.n_kv_heads: expected a divisor of n_heads=4, got 3"),
        ({"head_dim": 3}, r"ModelConfig\.head_dim: expected a positive even int, got 3"),
        ({"rope_theta": 0.0}, r"ModelConfig\.rope_theta: expected > 0"),
        ({"compute_dtype": "fp8"}, r"ModelConfig\.compute_dtype: expected one of"),
        ({"remat": "some"}, r"ModelConfig\.remat: expected one of"),
        ({"arch": "mistral"}, r"ModelConfig\.arch: expected one of"),
    ],
)
def test_bad_values_name_field_and_expectation(change, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**BASE, **change})


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown model preset 'nope'; expected one of \['demo'"):
        get_preset("nope")


def test_mesh_that_does_not_divide_device_count():
    with pytest.raises(ValueError, match=r"must equal the device count 8"):
        make_mesh({"data": 3, "fsdp": 1, "tensor": 1})


def test_config_is_hashable_and_static_under_jit():
    cfg = ModelConfig(**BASE)
    assert hash(cfg) == hash(ModelConfig(**BASE)) and cfg == ModelConfig(**BASE)
    traces = []

    def scale(x, c):
        traces.append(c)  # runs once per trace
        return x * c.d_model

    f = jax.jit(scale, static_argnums=1)
    assert float(f(jnp.ones(()), cfg)) == 16.0
    assert float(f(jnp.ones(()), ModelConfig(**BASE))) == 16.0  # equal config: cache hit
    assert float(f(jnp.ones(()), cfg.replace(d_model=32))) == 32.0
    assert len(traces) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 8


def test_replace_rederives_head_dim_and_rejects_unknown_fields():
    cfg = ModelConfig(**BASE)
    assert cfg.head_dim == 4 and cfg.replace(d_model=32).head_dim == 8
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['dmodel'\]"):
        cfg.replace(dmodel=3)


def test_sprm_param_count_matches_paper_formula():
    # docs/method.md section 1: Linear(D,2D) + Linear(2D,1) = 2D^2 + 4D + 1; D=1536 for the
    # 1.5B model.
    assert (
        get_preset("metastone-s1-1.5b").sprm_param_count == 2 * 1536**2 + 4 * 1536 + 1 == 4_724_737
    )


# The public config.json of DeepSeek-R1-Distill-Qwen-1.5B (legacy top-level rope_theta).
R1_DISTILL_QWEN_1_5B = {
    "architectures": ["Qwen2ForCausalLM"],
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "max_position_embeddings": 131072,
    "max_window_layers": 21,
    "model_type": "qwen2",
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


def test_preset_shapes_equal_the_public_hf_config():
    ours = get_preset("metastone-s1-1.5b")
    theirs = ModelConfig.from_hf_config(R1_DISTILL_QWEN_1_5B)
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "head_dim"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert (ours.rope_theta, ours.rms_eps, ours.qkv_bias, ours.tie_embeddings) == (
        theirs.rope_theta,
        theirs.rms_eps,
        theirs.qkv_bias,
        theirs.tie_embeddings,
    )


def test_rope_parameters_block_equals_legacy_rope_theta():
    legacy = dict(R1_DISTILL_QWEN_1_5B)
    new = {k: v for k, v in legacy.items() if k != "rope_theta"}
    new["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    assert ModelConfig.from_hf_config(new) == ModelConfig.from_hf_config(legacy)


LLAMA3 = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
)


@pytest.mark.parametrize(
    "cfg",
    [
        PRESETS["tiny"],
        PRESETS["metastone-s1-32b"],
        ModelConfig(**BASE, arch="llama", tie_embeddings=True, rope_scaling=LLAMA3, rope_theta=5e5),
        ModelConfig(**BASE, arch="llama", qkv_bias=True, head_dim=8),
    ],
    ids=["qwen2-tiny", "qwen2-32b", "llama3-tied", "llama-bias-headdim"],
)
def test_hf_config_round_trip_through_transformers(cfg):
    hf = cfg.to_hf_config()
    klass = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[cfg.arch]
    loaded = klass(**json.loads(json.dumps(hf)))  # as written to and read from config.json
    assert loaded.hidden_size == cfg.d_model and loaded.num_key_value_heads == cfg.n_kv_heads
    # transformers 5 re-serialises rope settings as a `rope_parameters` block.
    back = ModelConfig.from_hf_config(loaded.to_dict())
    keep = dict(param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype)
    expected = cfg.replace(scan_layers=True, remat="none", sprm_head=True, **keep)
    assert back.replace(**keep) == expected
    assert ModelConfig.from_hf_config(hf) == back


def test_real_fixture_config(shared_dir):
    with open(os.path.join(shared_dir, "fixtures", "tiny-llama-bf16", "config.json")) as f:
        cfg = ModelConfig.from_hf_config(json.load(f))
    assert (cfg.arch, cfg.d_model, cfg.n_layers, cfg.n_kv_heads, cfg.d_ff) == (
        "llama",
        128,
        4,
        4,
        344,
    )
    assert (cfg.param_dtype, cfg.qkv_bias, cfg.tie_embeddings) == ("bfloat16", False, False)


@pytest.mark.parametrize(
    "hf, match",
    [
        ({**R1_DISTILL_QWEN_1_5B, "use_sliding_window": True}, "use_sliding_window"),
        ({**R1_DISTILL_QWEN_1_5B, "hidden_act": "gelu"}, "hidden_act"),
        ({k: v for k, v in R1_DISTILL_QWEN_1_5B.items() if k != "hidden_size"}, "hidden_size"),
        ({**R1_DISTILL_QWEN_1_5B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        (
            {**R1_DISTILL_QWEN_1_5B, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
            "gpt2",
        ),
    ],
)
def test_unsupported_hf_configs_fail_clearly(hf, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_config(hf)


def _load_config_file(arg):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "model.py")
    spec = importlib.util.spec_from_file_location("model_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_config_file_presets_rebuild_the_same_model_config():
    for name, preset in PRESETS.items():
        config = _load_config_file(name)
        assert config.preset == name
        assert model_config_from_dict(config.model) == preset


def test_config_file_overrides_and_unknown_keys():
    config = _load_config_file("tiny")
    config.model.n_layers = 5
    config.model.rope_scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    cfg = model_config_from_dict(config.model)
    assert cfg.n_layers == 5 and cfg.rope_scaling.factor == 8.0
    with pytest.raises(
        ValueError, match=r"unknown key\(s\) \['layers'\]; valid keys: \['vocab_size'"
    ):
        model_config_from_dict({**config.model.to_dict(), "layers": 2})
