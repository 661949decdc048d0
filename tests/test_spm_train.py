"""SentencePiece training: single-piece step/think tokens, round trips, loading, determinism."""

import os
import random

import pytest

from metastone_jax.data.sentencepiece_tokenizer import SentencePieceTokenizer
from metastone_jax.data.spm_train import train_sentencepiece
from metastone_jax.data.tokenizer import load_tokenizer

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)
SPECIAL = (".\n\n", "<think>", "</think>")


def corpus(seed=0, n=300):
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        a, b, c = rng.randint(0, 99), rng.randint(0, 99), rng.randint(2, 9)
        texts.append(
            f"What is ({a}+{b})*{c}?\n<think>{a}+{b}={a + b}.\n\n{a + b}*{c}={(a + b) * c}."
            f"\n\n</think>The answer is \\boxed{{{(a + b) * c}}}."
        )
    return texts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("spm") / "tok"
    return out, train_sentencepiece(corpus(), str(out), vocab_size=400, chat_template=TEMPLATE)


def test_special_strings_are_single_pieces_in_context(trained):
    _, tok = trained
    for s in SPECIAL:
        sid = tok.token_to_id(s)
        assert sid is not None and tok.encode(s) == [sid]
        for text in (f"x{s}y", f"12{s}", f"}}{s}{s} ", f"\\boxed{{14}}{s}7", f" {s}\n"):
            ids = tok.encode(text)
            assert ids.count(sid) == text.count(s), (text, [tok.id_to_token(i) for i in ids])
    ids = tok.encode("<think>3+4=7.\n\n7*2=14.\n\n</think>The answer is \\boxed{14}.")
    pieces = [tok.id_to_token(i) for i in ids]
    assert pieces[0] == "<think>" and pieces.count(".\n\n") == 2 and "</think>" in pieces
    # Digits are split (so "14" is two pieces) and never merge with the step text.
    i = pieces.index("*")
    assert pieces[i : i + 6] == ["*", "2", "=", "1", "4", ".\n\n"]


@pytest.mark.parametrize(
    "text",
    [
        "<think>3+4=7.\n\n7*2=14.\n\n</think>The answer is \\boxed{14}.",
        "  two leading spaces,\ttab, trailing space \n",
        "\n\n\nnewlines only at the start.\n\n\n",
        "unseen chars: é, ü, 中文, emoji 🙂, ∑_{k=1}^n k",
        "..\n\n.\n\n\n<think></think><think>",
        "",
    ],
)
def test_round_trip(trained, text):
    _, tok = trained
    assert tok.decode(tok.encode(text)) == text


def test_loads_from_directory(trained):
    out, tok = trained
    assert sorted(os.listdir(out)) == ["tokenizer.model", "tokenizer_config.json"]
    assert not [f for f in os.listdir(out.parent) if f.startswith(".tok.tmp")]
    loaded = load_tokenizer(str(out))
    assert isinstance(loaded, SentencePieceTokenizer)
    assert loaded.vocab_size == tok.vocab_size <= 400
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (0, 2, 3)
    assert [loaded.id_to_token(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert loaded.encode("1+1", add_special_tokens=True)[0] == loaded.bos_id
    ids = loaded.encode_chat([{"role": "user", "content": "What is 2+3?"}])
    assert ids[0] == loaded.bos_id and loaded.eos_id in ids
    assert ids[-2:] == [loaded.token_to_id("<think>"), loaded.token_to_id("\n")]
    assert loaded.decode(ids) == "<s><|user|>What is 2+3?</s><|assistant|><think>\n"
    assert (
        loaded.decode(ids, skip_special_tokens=True) == "<|user|>What is 2+3?<|assistant|><think>\n"
    )


def test_deterministic(tmp_path):
    a = train_sentencepiece(corpus(1, 150), str(tmp_path / "a"), vocab_size=350)
    b = train_sentencepiece(corpus(1, 150), str(tmp_path / "b"), vocab_size=350)
    pieces = [a.id_to_token(i) for i in range(a.vocab_size)]
    assert pieces == [b.id_to_token(i) for i in range(b.vocab_size)]
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (
        tmp_path / "b" / "tokenizer.model"
    ).read_bytes()
    assert a.chat_template is None


def test_errors_and_existing_dir(tmp_path):
    with pytest.raises(ValueError, match="Vocabulary size is smaller"):
        train_sentencepiece(corpus(n=20), str(tmp_path / "small"), vocab_size=100)
    assert not (tmp_path / "small").exists()
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    tok = train_sentencepiece(corpus(n=50), str(model_dir), vocab_size=320, model_type="unigram")
    assert (model_dir / "config.json").read_text() == "{}"  # other files are kept
    assert tok.decode(tok.encode("1.\n\n2")) == "1.\n\n2"
    (model_dir / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json"):
        train_sentencepiece(corpus(n=50), str(model_dir), vocab_size=320)
