"""Chat templates rendered with jinja2 the way transformers renders them.

Sandboxed environment, ``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, a ``tojson`` filter
that keeps non-ASCII, ``raise_exception`` and ``strftime_now``; messages are normalised as
transformers does, so the text equals ``apply_chat_template(..., tokenize=False)``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

# Names a message's reasoning may arrive under; templates mostly read the first.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """Raised by a chat template's ``raise_exception(message)``; carries its message."""


# ---------------------------------------------------------------------------------------------
# Chat template rendering
# ---------------------------------------------------------------------------------------------


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's built-in tojson HTML-escapes; transformers' does not, and exposes json.dumps knobs.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """Deep-copy ``value`` into plain JSON-like types (dict/list/tuple/str/int/float/bool/None)."""
    if value is None or isinstance(value, bool | str | int | float):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if callable(getattr(value, "tolist", None)):  # numpy / jax scalars and arrays
        return _plain(value.tolist())
    return str(value)


def _prepare_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copy messages, drop ``None``-valued keys, alias reasoning fields (as transformers)."""
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"chat message {i} must be a dict, got {type(message).__name__}")
        msg = {k: _plain(v) for k, v in message.items() if v is not None}
        reasoning = next((msg[k] for k in _REASONING_KEYS if k in msg), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str | None] | None = None,
    **extra: Any,
) -> str:
    """Render ``template`` over ``messages`` (list of ``{"role", "content", ...}`` dicts).

    Template variables: ``messages``, ``add_generation_prompt``, the named special tokens that
    are set (``bos_token``, ``eos_token``, ...), ``tools``/``documents`` (``None`` by default)
    and ``**extra`` (which overrides the special tokens). ``raise_exception`` in the template
    raises :class:`ChatTemplateError` (a ``ValueError``).
    """
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation")
    variables: dict[str, Any] = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    variables.update({"tools": None, "documents": None})
    variables.update(_plain(extra))
    variables["messages"] = _prepare_messages(messages)
    variables["add_generation_prompt"] = bool(add_generation_prompt)
    try:
        compiled = _compile_template(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"invalid chat template (line {e.lineno}): {e.message}") from e
    return compiled.render(**variables)


# ---------------------------------------------------------------------------------------------
# Interface
# ---------------------------------------------------------------------------------------------
