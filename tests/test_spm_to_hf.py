"""SentencePiece model -> tokenizer.json: the same ids as our SentencePiece tokenizer (which runs
the sentencepiece library) for many random texts; the proto reader against sentencepiece's own
view of the model; unconvertible models refused with the setting named."""

import dataclasses
import os
import random

import pytest
import sentencepiece as spm

from metastone_jax.convert.spm_proto import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    USER_DEFINED,
    parse_spm_model,
    read_spm_model,
)
from metastone_jax.convert.spm_to_hf import NotConvertible, build_tokenizer, hf_tokenizer_files
from metastone_jax.data.sentencepiece_tokenizer import SentencePieceTokenizer
from metastone_jax.data.spm_train import train_sentencepiece
from metastone_jax.data.tokenizer import HFTokenizer

SYMBOLS = (".\n\n", "<think>", "</think>", "<s>", "</s>", "<pad>", "<unk>", "<0x41>", "▁")
# Characters beyond the training text: combining marks, other scripts, astral emoji, odd
# whitespace (no-break space, ideographic space, CR, tab), the NUL and DEL controls.
ODD_CHARS = "\u0301é中文🙂∑\u00a0\u3000\r\t\x00\x7f𝔘ß"


def corpus(seed=0, n=400):
    rng = random.Random(seed)
    words = ["start", "subtract", "add", "what", "result", "answer", "the", "is", "boxed"]
    texts = []
    for _ in range(n):
        a, b = rng.randint(-99, 99), rng.randint(0, 99)
        prose = " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
        texts.append(
            f"{prose.capitalize()}? {a}+{b}\n<think>{a}+{b}={a + b}.\n\n{a + b}-{b}={a}.\n\n"
            f"</think>The answer is \\boxed{{{a}}}.  (x_{b}, y^{a})\t{{}}"
        )
    return texts


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("spm") / "tok")
    train_sentencepiece(corpus(), out, vocab_size=600)
    return out


@pytest.fixture(scope="module")
def model(spm_dir):
    return read_spm_model(os.path.join(spm_dir, "tokenizer.model"))


def random_texts(model, n, seed):
    """Texts built from the model's own pieces (so merges compete), the symbols, odd characters
    needing byte fallback, and runs of one piece (overlapping merges of the same piece)."""
    rng = random.Random(seed)
    pieces = [p.text.replace("▁", " ") for p in model.pieces if p.kind == NORMAL]
    units = [*pieces, *SYMBOLS, *ODD_CHARS]
    texts = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.5:
            text = "".join(rng.choice(units) for _ in range(rng.randint(0, 25)))
        elif kind < 0.8:
            text = "".join(chr(rng.randint(1, 0x2FFFF)) for _ in range(rng.randint(0, 12)))
            text = text.encode("utf-8", "ignore").decode("utf-8")  # lone surrogates dropped
        else:
            piece = rng.choice(pieces)
            text = piece * rng.randint(1, 5) + rng.choice(units) + piece[::-1] * rng.randint(1, 3)
        texts.append(text)
    return texts


@pytest.mark.parametrize("add_bos,add_eos", [(True, False), (False, True), (False, False)])
def test_tokenizer_json_gives_sentencepiece_ids_on_random_texts(spm_dir, model, add_bos, add_eos):
    ours = SentencePieceTokenizer(
        os.path.join(spm_dir, "tokenizer.model"), add_bos=add_bos, add_eos=add_eos
    )
    hf = build_tokenizer(model, add_bos=add_bos, add_eos=add_eos, where=spm_dir)
    for text in random_texts(model, 1500, seed=int(add_bos) + 2 * int(add_eos)):
        for special in (False, True):
            want = ours.encode(text, add_special_tokens=special)
            assert hf.encode(text, add_special_tokens=special).ids == want, (text, special)
        ids = ours.encode(text)
        if "▁" not in text:  # SentencePiece decodes its space marker "▁" as a space
            assert hf.decode(ids, skip_special_tokens=False) == ours.decode(ids) == text


def test_tokenizer_files_load_as_our_hf_tokenizer_with_the_same_ids(spm_dir, model, tmp_path):
    for name, text in hf_tokenizer_files(spm_dir).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    ours = SentencePieceTokenizer(os.path.join(spm_dir, "tokenizer.model"))
    hf = HFTokenizer.from_dir(str(tmp_path))
    assert (hf.bos_id, hf.eos_ids, hf.pad_id) == (ours.bos_id, ours.eos_ids, ours.pad_id)
    for text in random_texts(model, 200, seed=7):
        assert hf.encode(text, add_special_tokens=True) == ours.encode(
            text, add_special_tokens=True
        )


def test_proto_reader_agrees_with_sentencepiece(spm_dir, model):
    sp = spm.SentencePieceProcessor(model_file=os.path.join(spm_dir, "tokenizer.model"))
    assert len(model.pieces) == sp.get_piece_size()
    kinds = {CONTROL: sp.is_control, UNKNOWN: sp.is_unknown, BYTE: sp.is_byte}
    for i, piece in enumerate(model.pieces):
        assert piece.text == sp.id_to_piece(i) and piece.score == sp.get_score(i)
        for kind, test in kinds.items():
            assert (piece.kind == kind) == test(i), (i, piece)
    user_defined = [p.text for p in model.pieces if p.kind == USER_DEFINED]
    assert user_defined == [".\n\n", "<think>", "</think>"]  # as spm_train defines them
    assert (model.unk_id, model.bos_id, model.eos_id, model.pad_id) == (
        sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()
    )  # fmt: skip
    assert model.model_type == "bpe" and model.byte_fallback
    assert not (model.add_dummy_prefix or model.remove_extra_whitespaces)
    assert model.escape_whitespaces and model.normalizer_name == "identity"


def raw_spm_model(tmp_path, **options) -> str:
    """A model trained with sentencepiece's own defaults plus `options`."""
    prefix = str(tmp_path / "raw")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(n=100)), model_prefix=prefix, vocab_size=400,
        hard_vocab_limit=False, minloglevel=2, num_threads=1, **options,
    )  # fmt: skip
    return prefix + ".model"


@pytest.mark.parametrize(
    "options,setting",
    [
        ({"model_type": "unigram", "byte_fallback": True}, "model_type is 'unigram'"),
        ({"model_type": "bpe"}, "byte_fallback is False"),
        ({"model_type": "bpe", "byte_fallback": True}, "add_dummy_prefix is True"),
    ],
)
def test_unconvertible_models_are_refused_naming_the_setting(tmp_path, options, setting):
    path = raw_spm_model(tmp_path, **options)
    with pytest.raises(NotConvertible) as e:
        build_tokenizer(read_spm_model(path), add_bos=True, add_eos=False, where=path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and setting in message and "\n" not in message


def test_damaged_model_file_is_refused(spm_dir, tmp_path):
    data = open(os.path.join(spm_dir, "tokenizer.model"), "rb").read()
    for damaged in (data[: len(data) // 2], b"not a model at all"):
        with pytest.raises(ValueError, match=r"^x\.model: not a SentencePiece model \("):
            parse_spm_model(damaged, where="x.model")


def _with_piece(model, i, **changes):
    pieces = list(model.pieces)
    pieces[i] = dataclasses.replace(pieces[i], **changes)
    return dataclasses.replace(model, pieces=tuple(pieces))


def test_pieces_that_would_encode_differently_are_refused(model):
    think = next(i for i, p in enumerate(model.pieces) if p.text == "<think>")
    merged = [i for i, p in enumerate(model.pieces) if p.kind == NORMAL and len(p.text) > 1]
    cases = {
        "symbol '<think> ' holds a space": _with_piece(model, think, text="<think> "),
        "symbols '</s>' and '</s>x' overlap": _with_piece(model, think, text="</s>x"),
        "share the score": _with_piece(model, merged[1], score=model.pieces[merged[0]].score),
        "unk_id 1 is not an unknown piece": _with_piece(model, 1, kind=NORMAL),
    }
    for reason, changed in cases.items():
        with pytest.raises(NotConvertible, match=r"^m: cannot export .* same ids: ") as e:
            build_tokenizer(changed, add_bos=True, add_eos=False, where="m")
        assert reason in str(e.value)
