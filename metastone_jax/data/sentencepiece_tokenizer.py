"""SentencePiece ``.model`` behind the tokenizer interface."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

import sentencepiece

from metastone_jax.data.tokenizer_base import Tokenizer, _as_id_list, _unique


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; BOS/EOS/PAD ids come from the model (``None`` where unset).

    Control pieces written as text (a template's ``<s>``) map to their ids; the text between
    them is encoded piece by piece, each part with SentencePiece's leading-space marker (the
    older transformers behaviour). ``decode`` keeps control pieces unless
    ``skip_special_tokens``; plain SentencePiece drops them silently.
    """

    def __init__(
        self,
        model_file: str | os.PathLike,
        chat_template: str | None = None,
        *,
        add_bos: bool = True,
        add_eos: bool = False,
        extra_eos_ids: Sequence[int] = (),
        pad_id: int | None = None,
        template_origin: str | None = None,
    ):
        self.model_file = os.fspath(model_file)
        if not os.path.isfile(self.model_file):
            raise ValueError(f"{self.model_file}: SentencePiece model not found")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=self.model_file)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.model_file}: cannot load SentencePiece model ({e})") from None

        def opt(i: int) -> int | None:
            return i if i >= 0 else None

        self._bos, self._eos = opt(self._sp.bos_id()), opt(self._sp.eos_id())
        self._pad = opt(self._sp.pad_id())
        self._pad = self._pad if self._pad is not None else pad_id
        self._eos_ids = _unique([self._eos, *extra_eos_ids])
        self._add_bos, self._add_eos = add_bos, add_eos
        self._chat_template = chat_template
        self._origin = template_origin or self.model_file
        n = self._sp.get_piece_size()
        self._control = {self._sp.id_to_piece(i): i for i in range(n) if self._sp.is_control(i)}
        pieces = sorted(self._control, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, pieces)) + ")") if pieces else None

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_file!r})"

    def _template_origin(self) -> str:
        return self._origin

    @property
    def processor(self):
        """The underlying ``sentencepiece.SentencePieceProcessor``."""
        return self._sp

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        parts = self._split.split(text) if self._split else [text]
        for part in parts:
            if part in self._control:
                ids.append(self._control[part])
            elif part:
                ids.extend(self._sp.encode(part))
        if add_special_tokens:
            if self._add_bos and self._bos is not None:
                ids.insert(0, self._bos)
            if self._add_eos and self._eos is not None:
                ids.append(self._eos)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        control_ids = set(self._control.values())
        out, run = [], []
        for i in _as_id_list(ids):
            if i in control_ids:
                out.append(self._sp.decode(run))
                run = []
                if not skip_special_tokens:
                    out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)  # returns the unk id for unknown pieces
        return i if self._sp.id_to_piece(i) == token else None

    def id_to_token(self, i: int) -> str | None:
        return self._sp.id_to_piece(i) if 0 <= i < self._sp.get_piece_size() else None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    @property
    def pad_id(self) -> int | None:
        return self._pad

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def special_tokens(self) -> dict[str, str | None]:
        def piece(i: int | None) -> str | None:
            return None if i is None else self._sp.id_to_piece(i)

        unk = self._sp.unk_id()
        return {
            "bos_token": piece(self._bos),
            "eos_token": piece(self._eos),
            "pad_token": piece(self._pad),
            "unk_token": piece(unk if unk >= 0 else None),
        }
