"""Model + mesh config: `--config=configs/model.py:<preset>` with overrides `--config.model.x=y`.

Presets: tiny, demo, metastone-s1-1.5b, metastone-s1-7b, metastone-s1-32b.
Mesh sizes are per axis of ('data', 'fsdp', 'tensor'); one may be -1 (the remaining devices).
"""

import dataclasses

from ml_collections import ConfigDict, config_dict

from metastone_jax.presets import get_preset


def get_config(arg: str | None = None) -> ConfigDict:
    preset = get_preset(arg or "demo")
    model = {}
    for field in dataclasses.fields(preset):
        value = getattr(preset, field.name)
        if field.name == "head_dim" and value == preset.d_model // preset.n_heads:
            value = None  # stays derived when d_model or n_heads is overridden
        if value is None:  # typed placeholders so that --config.model.x=... can set them
            value = config_dict.placeholder(dict if field.name == "rope_scaling" else int)
        elif dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        model[field.name] = value
    return ConfigDict(
        {
            "preset": arg or "demo",
            "model": model,
            "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
            "seed": 0,
        }
    )
