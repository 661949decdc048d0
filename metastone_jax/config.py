"""ModelConfig: the frozen, hashable description of a Qwen2/Llama backbone with LM and SPRM heads.

It is static under `jax.jit` (hashable, compared by value), validated on construction, and
round-trips through HF `config.json` dicts (`from_hf_config` / `to_hf_config`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")
# Attention of cacheless forwards (training, prefill): "dense" (a [B,T,S] mask, scores per
# 64-query block), "flash" (blocked online softmax in XLA, memory linear in the length),
# "splash" (the Pallas TPU kernel), "auto" (splash on TPU, else flash from
# FLASH_MIN_LENGTH tokens, dense below: see layers.attention_impl).
ATTENTION_IMPLS = ("auto", "dense", "flash", "splash")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent rope scaling (HF `rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"

    def __post_init__(self):
        if self.rope_type != "llama3":
            raise ValueError(f"rope_scaling.rope_type: expected 'llama3', got {self.rope_type!r}")
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"rope_scaling.{name}: expected > 0, got {getattr(self, name)}")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                "rope_scaling.high_freq_factor: expected > low_freq_factor "
                f"({self.low_freq_factor}), got {self.high_freq_factor}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Backbone + heads. Shapes: V vocab, D d_model, L n_layers, H n_heads, K n_kv_heads."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    head_dim: int | None = None  # None: d_model // n_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_eps: float = 1e-6
    qkv_bias: bool = False
    tie_embeddings: bool = False
    max_len: int = 4096
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    sprm_head: bool = True
    scan_layers: bool = True
    remat: str = "none"
    attention: str = "auto"
    arch: str = "qwen2"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_len")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name}: expected a positive int, got {value!r}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"ModelConfig.n_heads: expected a divisor of d_model={self.d_model}, "
                    f"got {self.n_heads} (or set head_dim explicitly)"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(
                f"ModelConfig.head_dim: expected a positive even int, got {self.head_dim!r}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_kv_heads: expected a divisor of n_heads={self.n_heads}, "
                f"got {self.n_kv_heads}"
            )
        if self.rope_theta <= 0:
            raise ValueError(f"ModelConfig.rope_theta: expected > 0, got {self.rope_theta}")
        if self.rms_eps <= 0:
            raise ValueError(f"ModelConfig.rms_eps: expected > 0, got {self.rms_eps}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(
                    f"ModelConfig.{name}: expected one of {DTYPES}, got {getattr(self, name)!r}"
                )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"ModelConfig.remat: expected one of {REMAT_POLICIES}, got {self.remat!r}"
            )
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(
                f"ModelConfig.attention: expected one of {ATTENTION_IMPLS}, got {self.attention!r}"
            )
        if self.arch not in ARCHITECTURES:
            raise ValueError(
                f"ModelConfig.arch: expected one of {tuple(ARCHITECTURES)}, got {self.arch!r}"
            )
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    # --- derived quantities -------------------------------------------------------------------
    @property
    def param_jnp_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def compute_jnp_dtype(self):
        return jnp.dtype(self.compute_dtype)

    @property
    def sprm_param_count(self) -> int:
        """Linear(D, 2D) + Linear(2D, 1) = 2D^2 + 4D + 1 (docs/method.md section 1)."""
        d = self.d_model
        return 2 * d * d + 4 * d + 1 if self.sprm_head else 0

    def replace(self, **changes) -> ModelConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(
                f"ModelConfig: unknown field(s) {sorted(unknown)}; valid: {field_names()}"
            )
        if "head_dim" not in changes and self.head_dim == self.d_model // self.n_heads:
            changes["head_dim"] = None  # stays derived from the new d_model / n_heads
        return dataclasses.replace(self, **changes)

    # --- HF config.json -----------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> ModelConfig:
        """Builds a config from a HF `config.json` dict (Qwen2 or Llama; either rope style)."""
        arch = _hf_arch(hf)
        rope_theta, rope_scaling = _hf_rope(hf)
        try:
            kwargs = dict(
                vocab_size=hf["vocab_size"],
                d_model=hf["hidden_size"],
                n_layers=hf["num_hidden_layers"],
                n_heads=hf["num_attention_heads"],
                n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                d_ff=hf["intermediate_size"],
            )
        except KeyError as e:
            raise ValueError(f"HF config: missing required key {e.args[0]!r}") from None
        if hf.get("use_sliding_window"):
            raise ValueError("HF config: use_sliding_window=true is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"HF config: hidden_act: expected 'silu', got {hf['hidden_act']!r}")
        if hf.get("mlp_bias"):
            raise ValueError("HF config: mlp_bias=true is not supported")
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim == kwargs["d_model"] // kwargs["n_heads"]:
            head_dim = None
        qkv_bias = True if arch == "qwen2" else bool(hf.get("attention_bias", False))
        dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        kwargs.update(
            head_dim=head_dim,
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
            qkv_bias=qkv_bias,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_len=int(hf.get("max_position_embeddings", 4096)),
            param_dtype=dtype if dtype in DTYPES else "float32",
            arch=arch,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        """A `config.json` dict that transformers (4.4x and 5.x) loads as this architecture."""
        out: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.arch]],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "intermediate_size": self.d_ff,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_len,
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "tie_word_embeddings": self.tie_embeddings,
            "torch_dtype": self.param_dtype,
            "attention_dropout": 0.0,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id)
            if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.rope_scaling is not None:
            out["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        if self.arch == "qwen2":
            out.update(use_sliding_window=False, sliding_window=None)
        else:
            out.update(attention_bias=self.qkv_bias, mlp_bias=False)
        return out


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig)]


def _hf_arch(hf: Mapping[str, Any]) -> str:
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type in ARCHITECTURES:
        return model_type
    for arch, cls_name in ARCHITECTURES.items():
        if cls_name in archs:
            return arch
    raise ValueError(
        f"HF config: unsupported architecture (model_type={model_type!r}, architectures={archs}); "
        f"supported: {sorted(ARCHITECTURES.values())}"
    )


def _hf_rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """Reads rope theta and scaling from either the legacy keys or the `rope_parameters` block."""
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or {}
    if params.get("rope_type", "default") != "default":
        scaling = params
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"HF config: rope type {rope_type!r} is not supported (default, llama3)")
    return theta, RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def model_config_from_dict(
    values: Mapping[str, Any], *, where: str = "config.model"
) -> ModelConfig:
    """Builds a ModelConfig from a (ConfigDict-like) mapping; unknown keys list the valid ones."""
    values = dict(values)
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {field_names()}")
    scaling = values.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, RopeScaling):
        values["rope_scaling"] = RopeScaling(**dict(scaling))
    return ModelConfig(**values)
