"""HF ``tokenizer.json`` (tokenizers library) with the directory's chat template and tokens."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

from metastone_jax.data.tokenizer_base import (
    SPECIAL_TOKEN_NAMES,
    TOKENIZER_JSON,
    Tokenizer,
    _as_id_list,
    _DirConfig,
    _unique,
)


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (``tokenizer.json``) plus ``tokenizer_config.json`` settings.

    ``encode(add_special_tokens=True)`` runs the tokenizer.json post-processor (e.g. a
    Llama-style ``TemplateProcessing`` that prepends BOS), like transformers' fast tokenizers.
    """

    def __init__(
        self,
        tokenizer,
        *,
        special_tokens: Mapping[str, str | None] | None = None,
        chat_templates: Mapping[str, str] | None = None,
        extra_eos_ids: Iterable[int] = (),
        pad_id: int | None = None,
        source: str = "<in-memory tokenizer>",
        template_origin: str | None = None,
    ):
        """``tokenizer``: a ``tokenizers.Tokenizer`` (named special tokens missing from its
        vocabulary are added to it, as transformers does); ``special_tokens``: name -> token
        string (``bos_token``, ``eos_token``, ...); ``chat_templates``: name -> jinja source
        (``"default"`` is used); ``extra_eos_ids`` extend ``eos_ids``; ``pad_id`` is used when
        no ``pad_token`` is set; ``source``/``template_origin`` name files in error messages."""
        self._tok = tokenizer
        self._special = {n: None for n in SPECIAL_TOKEN_NAMES}
        self._special.update(special_tokens or {})
        self._templates = dict(chat_templates or {})
        self._source = source
        self._origin = template_origin or source
        # transformers adds named special tokens missing from the vocabulary as special tokens.
        missing = [
            t for t in self._special.values() if t is not None and tokenizer.token_to_id(t) is None
        ]
        if missing:
            tokenizer.add_special_tokens(
                [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)]
            )
        self._bos_id = self._id_of("bos_token")
        self._eos_ids = _unique([self._id_of("eos_token"), *extra_eos_ids])
        self._pad_id = self._id_of("pad_token")
        if self._pad_id is None:
            self._pad_id = pad_id

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> HFTokenizer:
        """Load ``path/tokenizer.json`` with ``tokenizer_config.json``, ``chat_template.jinja``
        and ``generation_config.json`` (each optional except tokenizer.json)."""
        directory = os.fspath(path)
        tok_path = os.path.join(directory, TOKENIZER_JSON)
        if not os.path.isfile(tok_path):
            raise ValueError(f"{tok_path} not found")
        try:
            backend = _Backend.from_file(tok_path)
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"cannot load {tok_path}: {e}") from e
        cfg = _DirConfig(directory)
        return cls(
            backend,
            special_tokens=cfg.special_tokens,
            chat_templates=cfg.templates,
            extra_eos_ids=cfg.generation_eos_ids,
            pad_id=cfg.generation_pad_id,
            source=directory,
            template_origin=cfg.template_origin,
        )

    def _id_of(self, name: str) -> int | None:
        token = self._special.get(name)
        return None if token is None else self._tok.token_to_id(token)

    def __repr__(self) -> str:
        return f"HFTokenizer({self._source!r})"

    def _template_origin(self) -> str:
        return self._origin

    def _resolve_template(self, chat_template: str | None) -> str | None:
        if chat_template is None:
            return self.chat_template
        return self._templates.get(chat_template, chat_template)

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        i = int(i)
        return None if i < 0 else self._tok.id_to_token(i)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    @property
    def chat_template(self) -> str | None:
        return self._templates.get("default")

    @property
    def chat_templates(self) -> dict[str, str]:
        """All named templates (``"default"``, ``"tool_use"``, ...)."""
        return dict(self._templates)

    @property
    def special_tokens(self) -> dict[str, str | None]:
        return dict(self._special)


# ---------------------------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------------------------
