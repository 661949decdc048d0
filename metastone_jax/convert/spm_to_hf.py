"""A SentencePiece BPE model as an HF ``tokenizer.json`` that encodes every text to the same ids.

How SentencePiece BPE encodes (bpe_model.cc), and its counterpart here:
- The text is normalized: with the identity rule and no dummy prefix or whitespace cleanup
  (data/spm_train.py), only " " -> "▁" -> a ``Replace`` normalizer.
- It is cut into characters, a user-defined symbol being one frozen unit (longest match, left to
  right) -> user-defined symbols are added tokens (not special), control pieces (``<s>``,
  ``</s>``, ``<pad>``, which our tokenizer also maps from text) special added tokens; both are
  matched leftmost-longest before the model runs.
- Adjacent units merge while any pair forms a piece, the highest-scoring piece first (the
  leftmost pair among equals) -> a BPE model whose merges are every split of every piece into
  two pieces, ranked by the merged piece's score (distinct in a BPE model: minus the merge order;
  see `bpe_merges` for the splits of one piece).
- A character outside the vocabulary becomes its UTF-8 byte pieces -> ``byte_fallback``.
BOS/EOS follow ``add_bos_token``/``add_eos_token`` (a ``TemplateProcessing`` post-processor), as
``SentencePieceTokenizer.encode(add_special_tokens=True)`` does. Models with other settings are
refused (NotConvertible) with the setting named, rather than exported to a tokenizer that would
differ.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from metastone_jax.convert.spm_proto import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    SpmModel,
    read_spm_model,
)
from metastone_jax.data.tokenizer_base import SPM_MODEL, TOKENIZER_CONFIG, TOKENIZER_JSON

SPACE_MARK = "\u2581"  # "▁", SentencePiece's escaped space
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# The tokenizer class transformers builds straight from tokenizer.json (v4 and v5), without
# re-deriving normalizer or pre-tokenizer from a model-specific recipe.
TOKENIZER_CLASS = "PreTrainedTokenizerFast"


class NotConvertible(ValueError):
    """A readable SentencePiece model that tokenizer.json cannot reproduce exactly."""


def check_convertible(model: SpmModel, where: str) -> None:
    """Raises NotConvertible naming the first setting for which the export would not be exact."""
    problem = _settings_problem(model) or _pieces_problem(model) or _symbols_problem(model)
    if problem:
        raise NotConvertible(
            f"{where}: cannot export this SentencePiece model as tokenizer.json with the same "
            f"ids: {problem}"
        )


def _settings_problem(model: SpmModel) -> str | None:
    required = {
        "model_type": (model.model_type, "bpe"),
        "byte_fallback": (model.byte_fallback, True),
        "add_dummy_prefix": (model.add_dummy_prefix, False),
        "remove_extra_whitespaces": (model.remove_extra_whitespaces, False),
        "escape_whitespaces": (model.escape_whitespaces, True),
        "treat_whitespace_as_suffix": (model.treat_whitespace_as_suffix, False),
        "a normalization rule": (bool(model.precompiled_charsmap), False),
        "a denormalization rule": (bool(model.denormalizer_charsmap), False),
    }
    for name, (value, want) in required.items():
        if value != want:
            return f"{name} is {value!r}, expected {want!r} (as data/spm_train.py trains it)"
    return None


def _pieces_problem(model: SpmModel) -> str | None:
    texts = [p.text for p in model.pieces]
    if len(set(texts)) != len(texts):
        return "it has duplicate pieces"
    unused = [p.text for p in model.pieces if p.kind == UNUSED]
    if unused:
        return f"it has unused pieces {unused[:5]}"
    unk = model.special_id(model.unk_id)
    if unk is None or model.pieces[unk].kind != UNKNOWN:
        return f"unk_id {model.unk_id} is not an unknown piece"
    present = {p.text for p in model.pieces if p.kind == BYTE}
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in present]
    if missing:
        return f"byte pieces {missing[:5]} are missing"
    seen: dict[float, str] = {}
    for p in model.pieces:
        if p.kind == NORMAL and len(p.text) > 1:
            if p.score in seen:  # SentencePiece breaks the tie by position, BPE ranks cannot
                return f"pieces {seen[p.score]!r} and {p.text!r} share the score {p.score}"
            seen[p.score] = p.text
    return None


def _symbols_problem(model: SpmModel) -> str | None:
    """Symbols matched in text must not overlap one another: SentencePiece matches user-defined
    symbols inside the text between control pieces, tokenizer.json matches both in one pass;
    without overlaps the two agree. SentencePiece matches them after " " -> "▁", so neither may
    appear in one."""
    symbols = [p.text for p in model.pieces if p.kind in (CONTROL, USER_DEFINED)]
    for s in symbols:
        if " " in s or SPACE_MARK in s:
            return f"symbol {s!r} holds a space"
        for t in symbols:
            overlap = any(s.endswith(t[:k]) for k in range(1, len(t)))
            if s != t and (t in s or overlap):
                return f"symbols {s!r} and {t!r} overlap"
    return None


def bpe_merges(model: SpmModel) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, the highest-scoring piece first;
    the splits of one piece by their left piece's id, then the right's.

    SentencePiece gives the splits of one piece one score and takes the leftmost; BPE ranks them.
    The two could differ only if two overlapping splits of one piece were the best pairs at
    once, which merging up from characters does not seem to produce: reversing this order
    changed no ids on 30,000 random texts (a 3,000-piece model, checked when this was written),
    and tests/test_spm_to_hf.py checks this order on random texts."""
    ids = {p.text: i for i, p in enumerate(model.pieces) if p.kind == NORMAL}
    ranked = []
    for text, i in ids.items():
        for k in range(1, len(text)):
            left, right = text[:k], text[k:]
            if left in ids and right in ids:
                ranked.append((-model.pieces[i].score, i, ids[left], ids[right], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def build_tokenizer(model: SpmModel, *, add_bos: bool, add_eos: bool, where: str):
    """A ``tokenizers.Tokenizer`` with the same ids as ``SentencePieceTokenizer`` for `model`."""
    check_convertible(model, where)
    vocab = {p.text: i for i, p in enumerate(model.pieces)}
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=bpe_merges(model),
            unk_token=model.pieces[model.unk_id].text,
            byte_fallback=True,
            fuse_unk=False,
        )
    )
    tok.normalizer = normalizers.Replace(" ", SPACE_MARK)
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()]
    )

    def added(kind: int, special: bool) -> list:
        return [
            AddedToken(p.text, special=special, normalized=False)
            for p in model.pieces
            if p.kind == kind
        ]

    tok.add_special_tokens(added(CONTROL, True))
    tok.add_tokens(added(USER_DEFINED, False))

    template = _bos_eos_template(model, add_bos=add_bos, add_eos=add_eos)
    if template is not None:
        tok.post_processor = template
    return tok


def _bos_eos_template(model: SpmModel, *, add_bos: bool, add_eos: bool):
    """Prepends BOS / appends EOS to each sequence (None when neither is added)."""
    ends = {"bos": model.special_id(model.bos_id) if add_bos else None,
            "eos": model.special_id(model.eos_id) if add_eos else None}  # fmt: skip
    named = {k: (model.pieces[i].text, i) for k, i in ends.items() if i is not None}
    if not named:
        return None

    def sequence(part: str, type_id: int) -> list[str]:
        bos = [f"{named['bos'][0]}:{type_id}"] if "bos" in named else []
        eos = [f"{named['eos'][0]}:{type_id}"] if "eos" in named else []
        return [*bos, f"{part}:{type_id}", *eos]

    return processors.TemplateProcessing(
        single=sequence("$A", 0),
        pair=sequence("$A", 0) + sequence("$B", 1),
        special_tokens=list(named.values()),
    )


def _read_config(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read as JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


# Keys of the source config that would mislead transformers: another tokenizer file or class
# code, the unknown token (see hf_tokenizer_config), special tokens the model does not have.
_DROPPED_CONFIG_KEYS = ("tokenizer_file", "auto_map", "unk_token", "bos_token", "eos_token",
                        "pad_token")  # fmt: skip


def hf_tokenizer_config(model: SpmModel, config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` (the source directory's tokenizer_config.json) for transformers' fast tokenizer:
    BOS/EOS/PAD as the model names them (as our tokenizer does), BOS/EOS flags as our tokenizer
    reads them (BOS by default), no decode-time space cleanup.

    No ``unk_token``: transformers would make it a special token matched in text, so "<unk>"
    would encode to its id, where SentencePiece (and our tokenizer) encode the characters. Byte
    fallback leaves the model's unknown piece unused."""
    out = {k: v for k, v in config.items() if k not in _DROPPED_CONFIG_KEYS}
    out.update(_special_tokens(model))
    add_bos = config.get("add_bos_token")
    out.update(
        tokenizer_class=TOKENIZER_CLASS,
        add_bos_token=True if add_bos is None else bool(add_bos),
        add_eos_token=bool(config.get("add_eos_token")),
        clean_up_tokenization_spaces=False,
    )
    return out


def _special_tokens(model: SpmModel) -> dict[str, str]:
    names = {"bos_token": model.bos_id, "eos_token": model.eos_id, "pad_token": model.pad_id}
    return {
        name: model.pieces[i].text for name, i in names.items() if model.special_id(i) is not None
    }


def needs_conversion(directory: str) -> bool:
    """A SentencePiece model without a tokenizer.json (what `train` writes), from which
    transformers would build a tokenizer by its own recipe, not with SentencePiece's ids."""
    has = lambda name: os.path.isfile(os.path.join(directory, name))
    return has(SPM_MODEL) and not has(TOKENIZER_JSON)


def hf_tokenizer_files(src_dir: str) -> dict[str, str]:
    """File name -> text of tokenizer.json, tokenizer_config.json and special_tokens_map.json
    for the SentencePiece model in `src_dir` (with its tokenizer_config.json, if any)."""
    model_path = os.path.join(src_dir, SPM_MODEL)
    model = read_spm_model(model_path)
    config = hf_tokenizer_config(model, _read_config(os.path.join(src_dir, TOKENIZER_CONFIG)))
    tok = build_tokenizer(
        model, add_bos=config["add_bos_token"], add_eos=config["add_eos_token"], where=model_path
    )
    as_json = lambda content: json.dumps(content, indent=2, ensure_ascii=False)
    return {
        TOKENIZER_JSON: tok.to_str(pretty=True),
        TOKENIZER_CONFIG: as_json(config),
        SPECIAL_TOKENS_MAP: as_json(_special_tokens(model)),
    }
