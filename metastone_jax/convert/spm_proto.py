"""The few fields of a SentencePiece ``.model`` (a ``ModelProto``) that tokenizer export needs.

Read straight from the protobuf wire format, so neither protobuf nor sentencepiece's generated
``sentencepiece_model_pb2`` (which pins a protobuf runtime version) is needed. Field numbers and
proto2 defaults are those of sentencepiece_model.proto; unknown fields are skipped.
"""

from __future__ import annotations

import dataclasses
import struct

# SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# TrainerSpec.ModelType
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


@dataclasses.dataclass(frozen=True)
class Piece:
    text: str
    score: float
    kind: int  # NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED or BYTE


@dataclasses.dataclass(frozen=True)
class SpmModel:
    """Pieces in id order plus the trainer and normalizer settings that change encoding."""

    pieces: tuple[Piece, ...]
    model_type: str = "unigram"
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    denormalizer_charsmap: bytes = b""

    def special_id(self, i: int) -> int | None:
        """`i` if it names a piece (SentencePiece marks an unset special id with -1)."""
        return i if 0 <= i < len(self.pieces) else None


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 64 bits")


def _fields(buf: bytes):
    """Yields (field number, wire type, value): an int for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire in (_FIXED32, _FIXED64):
            size = 4 if wire == _FIXED32 else 8
            value, pos = buf[pos : pos + size], pos + size
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported wire type {wire} (field {number})")
        if pos > len(buf):
            raise ValueError(f"field {number} runs past the end of its message")
        yield number, wire, value


def _signed(value: int) -> int:
    """An int32 varint (negative values are sign-extended to 64 bits on the wire)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _piece(buf: bytes) -> Piece:
    text, score, kind = "", 0.0, NORMAL
    for number, wire, value in _fields(buf):
        if number == 1 and wire == _LEN:
            text = value.decode("utf-8")
        elif number == 2 and wire == _FIXED32:
            (score,) = struct.unpack("<f", value)
        elif number == 3 and wire == _VARINT:
            kind = value
    return Piece(text, score, kind)


_TRAINER_FIELDS = {  # number -> (name, convert)
    3: ("model_type", lambda v: MODEL_TYPES.get(v, f"type {v}")),
    24: ("treat_whitespace_as_suffix", bool),
    35: ("byte_fallback", bool),
    40: ("unk_id", _signed),
    41: ("bos_id", _signed),
    42: ("eos_id", _signed),
    43: ("pad_id", _signed),
}
_NORMALIZER_FIELDS = {
    1: ("normalizer_name", lambda v: v.decode("utf-8")),
    2: ("precompiled_charsmap", bytes),
    3: ("add_dummy_prefix", bool),
    4: ("remove_extra_whitespaces", bool),
    5: ("escape_whitespaces", bool),
}


def parse_spm_model(data: bytes, where: str = "<bytes>") -> SpmModel:
    """The pieces and settings of a serialized ``ModelProto``; `where` names it in errors."""
    pieces: list[Piece] = []
    settings: dict = {}
    try:
        for number, wire, value in _fields(data):
            if wire != _LEN:
                continue
            if number == 1:
                pieces.append(_piece(value))
            elif number in (2, 3):
                table = _TRAINER_FIELDS if number == 2 else _NORMALIZER_FIELDS
                for n, _, v in _fields(value):
                    if n in table:
                        name, convert = table[n]
                        settings[name] = convert(v)
            elif number == 5:  # denormalizer_spec: only its rules matter (decoding)
                for n, _, v in _fields(value):
                    if n == 2:
                        settings["denormalizer_charsmap"] = bytes(v)
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(f"{where}: not a SentencePiece model ({e})") from None
    if not pieces:
        raise ValueError(f"{where}: not a SentencePiece model (no pieces)")
    return SpmModel(pieces=tuple(pieces), **settings)


def read_spm_model(path: str) -> SpmModel:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    return parse_spm_model(data, where=path)
