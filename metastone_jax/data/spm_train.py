"""Train a SentencePiece tokenizer for from-scratch models (the synthetic task, small sweeps).

    tok = train_sentencepiece(texts, "out/tok", vocab_size=512, chat_template=TEMPLATE)
    tok = load_tokenizer("out/tok")    # the same tokenizer, later

Settings and why:
- The step text ".\\n\\n" and the think tags are user-defined symbols: always exactly one piece,
  wherever they occur, so the step mask (docs/method.md section 2) is a single-id comparison.
- Identity normalization, no extra-whitespace removal and no dummy prefix: SentencePiece's
  defaults (NFKC, whitespace collapsing, newline -> space, a leading "▁") would change the
  text, and "\\n" must survive. ``byte_fallback`` covers characters outside the vocabulary, so
  ``decode(encode(x)) == x`` for any text without the U+2581 "▁" character (SentencePiece's
  space marker, which decodes to a space).
- ``split_digits``: every digit is its own piece, which arithmetic tasks learn more easily.
- ``num_threads=1``: training is then deterministic for a fixed input.
Ids: 0 ``<pad>``, 1 ``<unk>``, 2 ``<s>`` (BOS), 3 ``</s>`` (EOS), then the user-defined symbols,
then the 256 byte pieces, then learned pieces. ``vocab_size`` is an upper bound (a small corpus
may yield fewer pieces) and must exceed 4 + the symbols + 256 + the distinct characters kept.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence

import sentencepiece as spm
from etils import epath

from metastone_jax import files
from metastone_jax.data.tokenizer import load_tokenizer
from metastone_jax.data.tokenizer_base import (
    CHAT_TEMPLATE_DIR,
    CHAT_TEMPLATE_FILE,
    SPM_MODEL,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    Tokenizer,
)

SPECIAL_PIECES = {
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
}
MODEL_TYPES = ("bpe", "unigram", "char", "word")
# Files in out_dir that load_tokenizer would prefer over what we write.
_CONFLICTS = (TOKENIZER_JSON, CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_DIR)


def train_sentencepiece(
    texts: Iterable[str],
    out_dir: str,
    *,
    vocab_size: int,
    step_text: str = ".\n\n",
    think_tags: Sequence[str] = ("<think>", "</think>"),
    model_type: str = "bpe",
    chat_template: str | None = None,
) -> Tokenizer:
    """Train on ``texts`` (one training sentence each; newlines inside are kept) and write
    ``out_dir/tokenizer.model`` + ``tokenizer_config.json`` (special token strings,
    ``add_bos_token``, and ``chat_template`` if given). Returns ``load_tokenizer(out_dir)``.

    ``out_dir`` may be local or gs://. A new ``out_dir`` is written as a whole (files.staged_dir:
    a temporary directory renamed into place, or uploaded with tokenizer.model last); into an
    existing one (a model directory) the two files are written each atomically. For a gs://
    ``out_dir`` the returned tokenizer is loaded from its local copy (files.local_copy:
    load_tokenizer reads local paths).
    """
    symbols = [step_text, *think_tags]
    if not all(isinstance(s, str) and s for s in symbols) or len(set(symbols)) != len(symbols):
        raise ValueError(f"step_text and think_tags must be distinct non-empty strings: {symbols}")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    out_dir = os.fspath(out_dir)
    remote = files.is_remote(out_dir)
    out_dir = out_dir if remote else os.path.abspath(out_dir)
    out = epath.Path(out_dir)
    conflicts = [f for f in _CONFLICTS if (out / f).exists()]
    if conflicts:
        raise ValueError(f"{out_dir} already has {conflicts}, which load_tokenizer would use")

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # an upper bound: tiny corpora may not fill it
            model_type=model_type,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            user_defined_symbols=symbols,
            byte_fallback=True,
            split_digits=True,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            pad_piece=SPECIAL_PIECES["pad_token"],
            unk_piece=SPECIAL_PIECES["unk_token"],
            bos_piece=SPECIAL_PIECES["bos_token"],
            eos_piece=SPECIAL_PIECES["eos_token"],
            max_sentence_length=1 << 24,  # the default (4192 bytes) silently drops long traces
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training for {out_dir} failed: {e}") from None
    _check_symbols(model.getvalue(), symbols)

    config = {**SPECIAL_PIECES, "add_bos_token": True, "add_eos_token": False}
    if chat_template is not None:
        config["chat_template"] = chat_template
    config_text = json.dumps(config, indent=2, ensure_ascii=False)
    if out.exists():  # e.g. a model directory: replace our two files, each atomically
        files.write_text(out / TOKENIZER_CONFIG, config_text)
        files.write_bytes(out / SPM_MODEL, model.getvalue())
    else:
        with files.staged_dir(out_dir, last=(SPM_MODEL,)) as tmp:
            _write_files(tmp, model.getvalue(), config_text)
    return load_tokenizer(files.local_copy(out_dir))  # a gs:// one: read from a local copy


def _write_files(directory: str, model: bytes, config_text: str) -> None:
    with open(os.path.join(directory, SPM_MODEL), "wb") as f:
        f.write(model)
    with open(os.path.join(directory, TOKENIZER_CONFIG), "w", encoding="utf-8") as f:
        f.write(config_text)


def _check_symbols(model_proto: bytes, symbols: Sequence[str]) -> None:
    """Each symbol must be exactly one piece, alone and between other text."""
    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    for s in symbols:
        piece = sp.piece_to_id(s)
        for text in (s, f"a{s}b", f"1{s}{s}2"):
            if sp.encode(text).count(piece) != text.count(s) or sp.id_to_piece(piece) != s:
                raise ValueError(
                    f"{s!r} is not a single piece in {text!r}: {sp.encode_as_pieces(text)}"
                )
