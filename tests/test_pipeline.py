"""Batching (determinism, epochs, per-process slices, resume) and SFT/prompt token batches."""

import json
import re

import numpy as np
import pytest

from metastone_jax.data.builders import prepare_synthetic
from metastone_jax.data.pipeline import BatchIterator, prompt_batch, sft_batch
from metastone_jax.data.tokenizer_base import Tokenizer

PAD, EOS = 0, 1


class CharTokenizer(Tokenizer):
    """One token per character, id = ord(c); PAD 0, EOS 1 (control characters never occur)."""

    def __init__(self, chat_template=None, pad=PAD):
        self._template, self._pad = chat_template, pad

    def encode(self, text, *, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, *, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)

    def token_to_id(self, token):
        return ord(token) if len(token) == 1 else None

    def id_to_token(self, i):
        return chr(i)

    vocab_size = 256
    bos_id = None
    eos_ids = (EOS,)
    special_tokens = {}

    @property
    def pad_id(self):
        return self._pad

    @property
    def chat_template(self):
        return self._template


# "<u>" + content + "<a>" for one user message: a prompt of len(content) + 6 characters.
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<a>{% endif %}"
)


def record(rid, content, solution="", answer=""):
    messages = json.dumps([{"role": "user", "content": content}])
    return {
        "id": rid,
        "prompt": content,
        "messages": messages,
        "answer": answer,
        "solution": solution,
    }


class CountingSource(list):
    """A list of records that remembers which indices were read."""

    def __init__(self, n):
        super().__init__({"id": str(i)} for i in range(n))
        self.read = []

    def __getitem__(self, i):
        self.read.append(i)
        return super().__getitem__(i)


def ids(batch):
    return [int(r["id"]) for r in batch]


def stream(it, steps):
    return [ids(next(it)) for _ in range(steps)]


def test_deterministic_per_seed():
    src = CountingSource(23)
    a = stream(BatchIterator(src, global_batch=4, seed=3, process_index=0, process_count=1), 12)
    b = stream(BatchIterator(src, global_batch=4, seed=3, process_index=0, process_count=1), 12)
    c = stream(BatchIterator(src, global_batch=4, seed=4, process_index=0, process_count=1), 12)
    assert a == b and a != c
    # Defaults come from jax: one process here.
    assert stream(BatchIterator(src, global_batch=4, seed=3), 12) == a


def test_epochs_are_the_seeded_permutations():
    n, batch, seed = 7, 3, 11
    it = BatchIterator(
        CountingSource(n), global_batch=batch, seed=seed, process_count=1, process_index=0
    )
    flat = [i for b in stream(it, 7) for i in b]  # 21 positions = 3 whole epochs
    for e in range(3):
        epoch = flat[e * n : (e + 1) * n]
        assert sorted(epoch) == list(range(n))  # every record exactly once per epoch
        assert epoch == np.random.default_rng([seed, e]).permutation(n).tolist()
    assert it.step == 7


def test_processes_split_the_global_batch():
    single = CountingSource(10)
    whole = stream(
        BatchIterator(single, global_batch=6, seed=0, process_index=0, process_count=1), 5
    )
    parts = []
    for p in range(2):
        src = CountingSource(10)
        parts.append(
            stream(BatchIterator(src, global_batch=6, seed=0, process_index=p, process_count=2), 5)
        )
        assert sorted(src.read) == sorted(i for b in parts[p] for i in b)  # reads only its rows
        assert all(len(b) == 3 for b in parts[p])
    assert [a + b for a, b in zip(*parts, strict=True)] == whole


def test_state_restore_resumes_exactly():
    src = CountingSource(9)
    it = BatchIterator(src, global_batch=4, seed=2, process_index=0, process_count=1)
    stream(it, 5)
    state = json.loads(json.dumps(it.state()))
    assert state == {"step": 5, "seed": 2, "size": 9}
    expected = stream(it, 4)

    resumed = BatchIterator(src, global_batch=4, seed=2, process_index=1, process_count=2)
    resumed.restore(state)
    assert resumed.step == 5
    # Process 1 of 2 now gets the second half of the same global batches.
    assert stream(resumed, 4) == [b[2:] for b in expected]

    with pytest.raises(ValueError, match=r"seed=2 size=9.*seed=7 size=9"):
        BatchIterator(src, global_batch=4, seed=7, process_count=1, process_index=0).restore(state)
    with pytest.raises(ValueError, match=r"seed=2 size=9.*seed=2 size=8"):
        BatchIterator(
            CountingSource(8), global_batch=4, seed=2, process_count=1, process_index=0
        ).restore(state)


def test_bad_batch_split():
    with pytest.raises(ValueError, match="global_batch=6 is not divisible by process_count=4"):
        BatchIterator(CountingSource(8), global_batch=6, seed=0, process_index=0, process_count=4)


def test_reads_builder_source(tmp_path):
    def make(split, n, seed):
        yield from ({"prompt": f"p{i}", "answer": str(i)} for i in range(n))

    src = prepare_synthetic(make, name="t", splits={"train": 5}, seed=0, data_dir=str(tmp_path))
    it = BatchIterator(src["train"], global_batch=5, seed=1, process_index=0, process_count=1)
    assert sorted(r["answer"] for r in next(it)) == ["0", "1", "2", "3", "4"]


def test_sft_batch_masks():
    tok = CharTokenizer(TEMPLATE)
    recs = [record("r0", "hi", "ok"), record("r1", "x", "abcd")]
    out = sft_batch(recs, tok, seq_len=13)
    # Row 0: "<u>hi<a>" (8) + "ok" (2) + EOS, then 2 PAD.
    row0 = [*map(ord, "<u>hi<a>ok"), EOS, PAD, PAD]
    # Row 1: "<u>x<a>" (7) + "abcd" (4) + EOS, then 1 PAD.
    row1 = [*map(ord, "<u>x<a>abcd"), EOS, PAD]
    np.testing.assert_array_equal(out["tokens"], [row0, row1])
    assert out["tokens"].dtype == np.int32
    np.testing.assert_array_equal(out["valid"], [[1] * 11 + [0] * 2, [1] * 12 + [0]])
    np.testing.assert_array_equal(
        out["loss_mask"], [[0] * 8 + [1] * 3 + [0] * 2, [0] * 7 + [1] * 5 + [0]]
    )
    assert out["valid"].dtype == out["loss_mask"].dtype == np.bool_


def test_sft_batch_truncates_and_rejects_long_prompts():
    tok = CharTokenizer(TEMPLATE)
    rec = record("r7", "hi", "okay")  # prompt 8 tokens
    out = sft_batch([rec], tok, seq_len=10)  # room for "ok" only: EOS dropped
    assert out["tokens"][0].tolist() == [*map(ord, "<u>hi<a>ok")]
    assert out["loss_mask"][0].tolist() == [False] * 8 + [True] * 2
    assert out["valid"][0].all()
    out = sft_batch([rec], tok, seq_len=9)
    assert out["tokens"][0, -1] == ord("o") and out["loss_mask"][0].sum() == 1
    with pytest.raises(ValueError, match=r"'r7'.*prompt is 8 tokens.*seq_len=8"):
        sft_batch([rec], tok, seq_len=8)


def test_sft_batch_without_template_or_pad():
    tok = CharTokenizer(chat_template=None, pad=None)
    out = sft_batch([record("r", "q?", "a")], tok, seq_len=6)
    # Plain prompt text, then "a" + EOS, padded with EOS.
    assert out["tokens"][0].tolist() == [ord("q"), ord("?"), ord("a"), EOS, EOS, EOS]
    assert out["loss_mask"][0].tolist() == [False, False, True, True, False, False]
    assert out["valid"][0].tolist() == [True] * 4 + [False] * 2


class PairTokenizer(CharTokenizer):
    """CharTokenizer that also has one token for "=-" (id 300), as SentencePiece pieces do."""

    def encode(self, text, *, add_special_tokens=False):
        return [300 if p == "=-" else ord(p) for p in re.findall(r"=-|.", text, re.S)]

    def decode(self, ids, *, skip_special_tokens=False):
        return "".join("=-" if i == 300 else chr(i) for i in ids)


def test_sft_batch_leaves_unlearned_spans_out_of_the_loss():
    sol = "5+4=13, wait, 5+4=9."
    recs = [record("r0", "q", sol), record("r1", "q", "no slip")]
    spans = {sol: [(5, 6)], "no slip": []}  # the "3" of "13"
    tok = CharTokenizer(TEMPLATE)
    plain = sft_batch(recs, tok, seq_len=40)
    out = sft_batch(recs, tok, seq_len=40, unlearned=spans.__getitem__)
    np.testing.assert_array_equal(out["tokens"], plain["tokens"])
    dropped = np.argwhere(plain["loss_mask"] & ~out["loss_mask"]).tolist()
    assert dropped == [[0, 7 + 5]]  # the prompt "<u>q<a>" is 7 characters
    assert chr(out["tokens"][0, 7 + 5]) == "3"
    assert not (out["loss_mask"] & ~plain["loss_mask"]).any()  # nothing else changes

    # A span inside a longer token leaves that whole token out: "=-" of "5+4=-1".
    sol = "5+4=-1, wait, 5+4=9."
    pair = PairTokenizer(TEMPLATE)
    out = sft_batch([record("r2", "q", sol)], pair, seq_len=40, unlearned=lambda t: [(4, 5)])
    response = out["tokens"][0, 7:].tolist()
    learned = out["loss_mask"][0, 7:].tolist()
    assert response[:5] == [ord("5"), ord("+"), ord("4"), 300, ord("1")]
    assert learned[:5] == [True, True, True, False, True]
    assert sum(not x for x in learned[: len(sol) - 1]) == 1


def test_sft_batch_unlearned_spans_need_a_tokenizer_that_decodes_back():
    class Lossy(CharTokenizer):
        def decode(self, ids, *, skip_special_tokens=False):
            return super().decode(ids).upper()

    with pytest.raises(ValueError, match=r"'r9'.*does not decode back.*\(1, 2\)"):
        sft_batch([record("r9", "q", "abc")], Lossy(TEMPLATE), seq_len=20,
                  unlearned=lambda t: [(1, 2)])  # fmt: skip


def test_prompt_batch():
    tok = CharTokenizer(TEMPLATE)
    prompts, answers = prompt_batch(
        [record("a", "hi", answer="3"), record("b", "x", answer="4")], tok, max_prompt_len=8
    )
    assert prompts == [[*map(ord, "<u>hi<a>")], [*map(ord, "<u>x<a>")]]
    assert answers == ["3", "4"]
    with pytest.raises(ValueError, match=r"'a'.*prompt is 8 tokens.*max_prompt_len=7"):
        prompt_batch([record("a", "hi")], tok, max_prompt_len=7)
