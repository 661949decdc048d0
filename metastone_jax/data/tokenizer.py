"""Tokenizers behind one interface: HF ``tokenizer.json`` and SentencePiece ``.model``.

Both render chat templates with jinja2 the way transformers does (sandboxed environment,
``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, ``tojson``, ``raise_exception``,
``strftime_now``), so a prompt rendered here matches ``apply_chat_template(..., tokenize=False)``.

    tok = load_tokenizer("/path/to/model_dir")
    ids = tok.encode_chat([{"role": "user", "content": "1+1?"}])  # list[int]
    text = tok.decode(ids, skip_special_tokens=True)
"""

from __future__ import annotations

import os

from metastone_jax.data.chat_template import ChatTemplateError, render_chat_template
from metastone_jax.data.hf_tokenizer import HFTokenizer
from metastone_jax.data.sentencepiece_tokenizer import SentencePieceTokenizer
from metastone_jax.data.tokenizer_base import (
    SPM_MODEL,
    TOKENIZER_JSON,
    Tokenizer,
    _DirConfig,
)

__all__ = [
    "ChatTemplateError",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "render_chat_template",
]


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a model directory or a ``.model`` file.

    A directory with ``tokenizer.json`` gives :class:`HFTokenizer`; one with ``tokenizer.model``
    (or a ``.model`` file) gives :class:`SentencePieceTokenizer`, which also takes the chat
    template, ``add_bos_token``/``add_eos_token`` and EOS ids from the directory's
    ``tokenizer_config.json``/``chat_template.jinja``/``generation_config.json`` if present.
    """
    p = os.fspath(path)
    if os.path.isdir(p):
        if os.path.isfile(os.path.join(p, TOKENIZER_JSON)):
            return HFTokenizer.from_dir(p)
        model_file = os.path.join(p, SPM_MODEL)
        if os.path.isfile(model_file):
            return _sentencepiece_from_dir(p, model_file)
        raise ValueError(f"no tokenizer in {p}: looked for {TOKENIZER_JSON} and {SPM_MODEL}")
    if os.path.isfile(p) and p.endswith(".model"):
        return _sentencepiece_from_dir(os.path.dirname(p) or ".", p)
    if os.path.exists(p):
        raise ValueError(
            f"not a tokenizer: {p} (expected a directory with {TOKENIZER_JSON} or {SPM_MODEL}, "
            "or a .model file)"
        )
    raise ValueError(
        f"{p} does not exist (expected a directory with {TOKENIZER_JSON} or {SPM_MODEL}, "
        "or a .model file)"
    )


def _sentencepiece_from_dir(directory: str, model_file: str) -> SentencePieceTokenizer:
    cfg = _DirConfig(directory)
    return SentencePieceTokenizer(
        model_file,
        cfg.chat_template,
        add_bos=True if cfg.add_bos_token is None else bool(cfg.add_bos_token),
        add_eos=bool(cfg.add_eos_token),
        extra_eos_ids=cfg.generation_eos_ids,
        pad_id=cfg.generation_pad_id,
        template_origin=cfg.template_origin,
    )
