"""Model + mesh config: `metastone-jax info --config=<preset>` (or, from the repository root,
--config=configs/model.py:<preset>) with overrides `--config.model.x=y`.

Presets: tiny, demo, metastone-s1-1.5b, metastone-s1-7b, metastone-s1-32b.
Mesh sizes are per axis of ('data', 'fsdp', 'tensor'); one may be -1 (the remaining devices). Set
them with --mesh=data:N,fsdp:N,tensor:N (missing axes 1) or one at a time, --config.mesh.fsdp=N.
"""

import dataclasses

from ml_collections import ConfigDict, config_dict

from metastone_jax.presets import PRESETS as MODELS
from metastone_jax.presets import get_preset

PRESETS = tuple(MODELS)


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
