"""The repository's config files (configs/*.py), loaded by path: they are not a package."""

import importlib.util
import os

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def config_module(name: str):
    """configs/<name>.py as a module (its get_config, PRESETS, ...)."""
    spec = importlib.util.spec_from_file_location(
        f"configs_{name}", os.path.join(CONFIGS, f"{name}.py")
    )
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
