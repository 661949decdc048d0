"""The tokenizer interface and the model-directory files both implementations read."""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from metastone_jax.data.chat_template import ChatTemplateError, render_chat_template

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
GENERATION_CONFIG = "generation_config.json"
SPM_MODEL = "tokenizer.model"

# Named special tokens that transformers passes to chat templates (when set).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def _as_id_list(ids: Any) -> list[int]:
    """Accept an int, a sequence of ints, or a 1-D numpy/jax array; return ``list[int]``."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


class Tokenizer(abc.ABC):
    """Text <-> token ids, plus chat-template rendering.

    Ids are plain Python ints; ``encode`` returns ``list[int]`` and ``decode`` accepts any 1-D
    int sequence (list, tuple, numpy or jax array).
    """

    @abc.abstractmethod
    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds BOS/EOS as the tokenizer defines."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens are kept unless ``skip_special_tokens``."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of one vocabulary token (piece), or ``None`` if absent."""

    @abc.abstractmethod
    def id_to_token(self, i: int) -> str | None:
        """Vocabulary token (piece) of id ``i``, or ``None`` if out of range."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, added/special tokens included (ids are in ``[0, vocab_size)``)."""

    @property
    @abc.abstractmethod
    def bos_id(self) -> int | None: ...

    @property
    @abc.abstractmethod
    def eos_ids(self) -> tuple[int, ...]:
        """Ids that end generation (may be empty)."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int | None: ...

    @property
    @abc.abstractmethod
    def chat_template(self) -> str | None: ...

    @property
    @abc.abstractmethod
    def special_tokens(self) -> dict[str, str | None]:
        """Named special token strings (``bos_token``, ``eos_token``, ...) for chat templates."""

    @property
    def eos_id(self) -> int | None:
        """First of ``eos_ids``, or ``None``."""
        return self.eos_ids[0] if self.eos_ids else None

    def _template_origin(self) -> str:
        """Where the chat template comes from (or was looked for), for error messages."""
        return repr(self)

    def _resolve_template(self, chat_template: str | None) -> str | None:
        return chat_template if chat_template is not None else self.chat_template

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **extra: Any,
    ) -> str:
        """Render ``messages`` with the chat template to text (does not tokenize).

        ``chat_template``: jinja source (or, for :class:`HFTokenizer`, a template name) to use
        instead of the default. ``**extra`` become template variables (e.g. ``tools=[...]``).
        """
        template = self._resolve_template(chat_template)
        if template is None:
            raise ValueError(f"no chat template: {self._template_origin()}")
        try:
            return render_chat_template(
                template,
                messages,
                add_generation_prompt=add_generation_prompt,
                special_tokens=self.special_tokens,
                **extra,
            )
        except ValueError as e:
            if isinstance(e, ChatTemplateError) or chat_template is not None:
                raise
            raise ValueError(f"{self._template_origin()}: {e}") from e

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **extra
    ) -> list[int]:
        """``encode(apply_chat_template(messages, ...))`` without extra special tokens.

        The template itself emits BOS etc. (as in transformers' ``apply_chat_template``).
        """
        text = self.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, **extra
        )
        return self.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------------------------------------
# Config files
# ---------------------------------------------------------------------------------------------


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON in {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"malformed {path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _token_str(value: Any, key: str, path: str) -> str | None:
    """A special token given as a string or AddedToken dict ``{"content": ...}``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{path}: {key} must be a string or {{'content': ...}}, got {value!r}")


def _load_chat_templates(
    directory: str, config: Mapping, config_path: str
) -> tuple[dict[str, str], str]:
    """Named chat templates and where the default one comes from (a file path, or a note that
    there is none). ``chat_template.jinja`` and ``additional_chat_templates/`` win."""
    templates: dict[str, str] = {}
    raw = config.get("chat_template")
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):
        for entry in raw:
            if not (
                isinstance(entry, Mapping)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)
            ):
                raise ValueError(
                    f"{config_path}: chat_template list entries must be "
                    f"{{'name': str, 'template': str}}, got {entry!r}"
                )
            templates[entry["name"]] = entry["template"]
    elif raw is not None:
        raise ValueError(f"{config_path}: chat_template must be a string or a list, got {raw!r}")
    extra_dir = os.path.join(directory, CHAT_TEMPLATE_DIR)
    if os.path.isdir(extra_dir):
        for name in sorted(os.listdir(extra_dir)):
            if name.endswith(".jinja"):
                templates[name[: -len(".jinja")]] = _read_text(os.path.join(extra_dir, name))
    jinja_file = os.path.join(directory, CHAT_TEMPLATE_FILE)
    if os.path.isfile(jinja_file):
        templates["default"] = _read_text(jinja_file)
        return templates, jinja_file
    if "default" in templates:
        return templates, config_path
    if templates:
        return templates, (
            f"{config_path} has no template named 'default' (has {sorted(templates)}); "
            "pass chat_template=<name>"
        )
    return templates, (
        f"{directory} has no chat_template in {TOKENIZER_CONFIG} and no {CHAT_TEMPLATE_FILE}"
    )


class _DirConfig:
    """What ``tokenizer_config.json``, ``chat_template.jinja`` and ``generation_config.json``
    in a model directory say (all optional)."""

    def __init__(self, directory: str):
        self.config_path = os.path.join(directory, TOKENIZER_CONFIG)
        config = _read_json(self.config_path) if os.path.isfile(self.config_path) else {}
        self.config = config
        self.special_tokens = {
            name: _token_str(config.get(name), name, self.config_path)
            for name in SPECIAL_TOKEN_NAMES
        }
        self.add_bos_token: bool | None = config.get("add_bos_token")
        self.add_eos_token: bool | None = config.get("add_eos_token")
        self.templates, self.template_origin = _load_chat_templates(
            directory, config, self.config_path
        )
        self.generation_eos_ids: tuple[int, ...] = ()
        self.generation_pad_id: int | None = None
        gen_path = os.path.join(directory, GENERATION_CONFIG)
        if os.path.isfile(gen_path):
            gen = _read_json(gen_path)
            eos = gen.get("eos_token_id")
            eos = [] if eos is None else [eos] if isinstance(eos, int) else eos
            if not (isinstance(eos, list) and all(isinstance(i, int) for i in eos)):
                raise ValueError(f"{gen_path}: eos_token_id must be an int or list of ints")
            self.generation_eos_ids = tuple(eos)
            pad = gen.get("pad_token_id")
            self.generation_pad_id = pad if isinstance(pad, int) else None

    @property
    def chat_template(self) -> str | None:
        return self.templates.get("default")


def _unique(ids: Iterable[int | None]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(i for i in ids if i is not None))


# ---------------------------------------------------------------------------------------------
# HF tokenizer.json
# ---------------------------------------------------------------------------------------------
