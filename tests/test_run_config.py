"""The typed training config (train/run_config.py): every preset types without losing a key, each
field is documented, and structural mistakes fail naming the key."""

from __future__ import annotations

import dataclasses
import re
import types

import pytest

from metastone_jax.configs import meshes
from metastone_jax.configs import train as train_configs
from metastone_jax.train import cli as train_cli
from metastone_jax.train.run_config import TrainConfig
from metastone_jax.train.validate import RULES, validate_train_config

ALL_PRESETS = [("train", p) for p in train_configs.PRESETS] + [
    ("meshes", p) for p in meshes.PRESETS
]


def _preset(file: str, name: str):
    return (train_configs if file == "train" else meshes).get_config(name)


def _typed() -> TrainConfig:
    return TrainConfig.from_config_dict(train_configs.get_config("tiny-grpo"))


@pytest.mark.parametrize("file,name", ALL_PRESETS)
def test_every_preset_types_and_keeps_every_value(file, name):
    config = _preset(file, name)
    typed = TrainConfig.from_config_dict(config)
    assert typed.to_dict() == config.to_dict()  # the ConfigDict's own plain form: nothing lost
    assert TrainConfig.from_config_dict(typed) is typed


def test_every_field_has_a_docstring_line():
    classes = {type(_typed()), *(type(v) for v in vars(_typed()).values())}
    classes |= {type(_typed().data.task)}
    for cls in classes:
        if not dataclasses.is_dataclass(cls):
            continue
        doc = cls.__doc__ or ""
        documented = set(re.findall(r"^\s+(\w+): \S", doc.split("Attributes:")[-1], re.M))
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in documented]
        assert not missing, f"{cls.__name__}: no docstring line for {missing}"


def test_every_validated_key_is_a_typed_field():
    typed = _typed()
    for key in RULES:
        node = typed
        for part in key.split("."):
            assert hasattr(node, part), f"RULES key {key} is not a TrainConfig field"
            node = getattr(node, part)


def test_sections_are_frozen():
    typed = _typed()
    with pytest.raises(dataclasses.FrozenInstanceError):
        typed.rl.k = 3
    with pytest.raises(TypeError):
        typed.model["n_layers"] = 3
    assert isinstance(typed.model, types.MappingProxyType)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d["rl"].update(kk=2), r"^config\.rl\.kk: unknown key; valid keys: \['k', "),
        (lambda d: d["data"]["task"].pop("ops"), r"^config\.data\.task\.ops: missing"),
        (lambda d: d["rl"].update(k="8"), r"^config\.rl\.k='8': expected an int$"),
        (lambda d: d["rl"].update(k=True), r"^config\.rl\.k=True: expected an int$"),
        (lambda d: d["spr"].update(dropout=1), r"^config\.spr\.dropout=1: expected a bool$"),
        (lambda d: d["optim"].update(lr="1e-3"), r"^config\.optim\.lr='1e-3': expected a number$"),
        (lambda d: d.update(mesh=4), r"^config\.mesh=4: expected a section"),
        (lambda d: d.update(extra={}), r"^config\.extra: unknown key"),
    ],
)
def test_structural_mistakes_name_the_key(edit, message):
    plain = train_configs.get_config("tiny-grpo").to_dict()
    edit(plain)
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_config_dict(plain)


def test_ints_are_accepted_as_floats():
    plain = train_configs.get_config("tiny-grpo").to_dict()
    plain["optim"]["lr"] = 1
    typed = TrainConfig.from_config_dict(plain)
    assert typed.optim.lr == 1.0 and isinstance(typed.optim.lr, float)


def test_validation_returns_the_typed_config():
    typed = validate_train_config(train_configs.get_config("tiny-sft"))
    assert isinstance(typed, TrainConfig) and typed.kind == "sft"


def test_train_command_refuses_a_config_file_with_an_unknown_key(tmp_path):
    """A user's config file (a copy of a preset plus a typo) fails before anything is built, in
    one line naming the key."""
    path = tmp_path / "mine.py"
    path.write_text(
        "from metastone_jax.configs import train\n\n"
        "def get_config(arg=None):\n"
        "    c = train.get_config('tiny-sft')\n"
        "    c.rl.temprature = 0.7\n"
        "    return c\n"
    )
    with pytest.raises(SystemExit) as e:
        train_cli.main([f"--config={path}", f"--workdir={tmp_path / 'run'}"])
    text = str(e.value)
    assert "config.rl.temprature: unknown key" in text and "\n" not in text
    assert not (tmp_path / "run").exists()


def test_the_released_grpo_preset_is_the_recipe_docs_method_states():
    """docs/method.md section 4: 32 prompts x 8 per step, prompts up to 1024 and responses up
    to 8192 tokens, 4 mini-batches, actor AdamW at 1e-6 clipped at 1.0 on a constant schedule,
    temperature 0.6; the SPR loss on."""
    c = TrainConfig.from_config_dict(train_configs.get_config("grpo-1.5b"))
    assert (c.kind, c.data.batch_size, c.rl.k) == ("grpo", 32, 8)
    assert (c.data.max_prompt_len, c.rl.max_new_tokens, c.rl.mini_batches) == (1024, 8192, 4)
    assert (c.optim.lr, c.optim.clip_norm, c.optim.schedule) == (1e-6, 1.0, "constant")
    assert c.rl.temperature == 0.6 and c.spr.coef > 0
