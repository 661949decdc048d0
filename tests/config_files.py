"""The package's config files (metastone_jax/configs/*.py, the repository's configs/), each
loaded by path as a fresh module, as `--config=` loads it."""

import importlib.util

from metastone_jax import configs


def config_module(name: str):
    """configs/<name>.py as a module (its get_config, PRESETS, ...)."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", configs.path(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_config(preset: str, **sections):
    """configs/train.py:<preset> without a progress bar; each keyword updates a section (a dict)
    or sets a top-level key."""
    config = config_module("train").get_config(preset)
    config.train.progress = False
    for name, values in sections.items():
        if isinstance(values, dict):
            config[name].update(values)
        else:
            config[name] = values
    return config
