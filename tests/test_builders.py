"""tfds builders: the benchmark files, verl parquet, synthetic tasks, errors and rebuild rules."""

import functools
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metastone_jax.data.builders import Source, prepare_math_file, prepare_synthetic


def _raw_lines(path):
    with open(path, encoding="utf-8") as f:
        return [(n, json.loads(line)) for n, line in enumerate(f, start=1) if line.strip()]


def _by_id(src):
    return {rec["id"]: rec for rec in (src[i] for i in range(len(src)))}


def _user(text):
    return [{"role": "user", "content": text}]


def test_aime24(shared_dir, tmp_path):
    path = os.path.join(shared_dir, "data", "aime24.jsonl")
    raw = _raw_lines(path)
    src = prepare_math_file(path, str(tmp_path))
    assert isinstance(src, Source) and src.name == "aime24"
    assert len(src) == len(raw) == 30
    recs = _by_id(src)
    for lineno, row in [raw[0], raw[13], raw[-1]]:
        rec = recs[f"aime24:{lineno}"]
        assert all(isinstance(v, str) for v in rec.values())
        assert rec["prompt"] == row["prompt"]
        assert rec["answer"] == str(row["answer"])  # ints in the file
        assert json.loads(rec["messages"]) == _user(row["prompt"])
        assert rec["solution"] == ""


def test_math500(shared_dir, tmp_path):
    path = os.path.join(shared_dir, "data", "math500.jsonl")
    raw = [row for _, row in _raw_lines(path)]
    src = prepare_math_file(path, str(tmp_path))
    assert len(src) == len(raw) == 500
    recs = _by_id(src)
    assert len(recs) == 500  # unique_id is the id
    for row in (raw[0], raw[250], raw[499]):
        rec = recs[row["unique_id"]]
        assert rec["prompt"] == row["problem"]
        assert rec["solution"] == row["solution"]
        assert rec["answer"] == row["answer"]
        assert json.loads(rec["messages"]) == _user(row["problem"])
    # Batched reads agree with single reads and keep the requested order.
    assert src.__getitems__([7, 3]) == [src[7], src[3]]
    assert src[-1] == src[499]
    with pytest.raises(IndexError):
        src[500]


def test_verl_parquet(tmp_path):
    msg = pa.struct([("role", pa.string()), ("content", pa.string())])
    table = pa.table(
        {
            "data_source": ["math", "math"],
            "prompt": [
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}],
                [{"role": "user", "content": "2*3?"}],
            ],
            "reward_model": [
                {"style": "rule", "ground_truth": "2"},
                {"style": "rule", "ground_truth": "6"},
            ],
            "extra_info": [{"index": 0, "split": "train"}, {"index": 1, "split": "train"}],
            "response": ["<think>1+1=2.\n\n</think>2", None],
        },
        schema=pa.schema(
            [
                ("data_source", pa.string()),
                ("prompt", pa.list_(msg)),
                (
                    "reward_model",
                    pa.struct([("style", pa.string()), ("ground_truth", pa.string())]),
                ),
                ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())])),
                ("response", pa.string()),
            ]
        ),
    )
    path = tmp_path / "train.parquet"
    pq.write_table(table, path)
    src = prepare_math_file(str(path), str(tmp_path / "data"))
    assert len(src) == 2
    r0, r1 = src[0], src[1]
    assert r0 == {
        "id": "train:0",
        "prompt": "1+1?",  # the last user message
        "messages": r0["messages"],
        "answer": "2",
        "solution": "<think>1+1=2.\n\n</think>2",
    }
    assert json.loads(r0["messages"]) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+1?"},
    ]
    assert (r1["id"], r1["prompt"], r1["answer"], r1["solution"]) == ("train:1", "2*3?", "6", "")


def test_synthetic_builds_once_per_key(tmp_path):
    produced = []

    def make_examples(split, n, seed, offset=0):
        for i in range(n):
            produced.append(split)
            yield {"prompt": f"{split} {seed} q{i + offset}", "answer": str(i * seed)}

    kw = dict(name="toy", splits={"train": 12, "test": 3}, data_dir=str(tmp_path))
    out = prepare_synthetic(make_examples, seed=5, **kw)
    assert sorted(out) == ["test", "train"]
    assert (len(out["train"]), len(out["test"])) == (12, 3)
    rec = out["train"][4]
    assert rec == {
        "id": "toy/train/4",
        "prompt": "train 5 q4",
        "messages": json.dumps(_user("train 5 q4")),
        "answer": "20",
        "solution": "",
    }
    assert out["test"][2]["prompt"] == "test 5 q2"
    assert len(produced) >= 15

    before = len(produced)
    again = prepare_synthetic(make_examples, seed=5, **kw)
    assert again["train"][0]["prompt"] == "train 5 q0"
    # Reused: at most the one-record probe per split was generated, not the 15 records.
    assert len(produced) - before <= 2
    assert again["train"][11] == out["train"][11]

    other = prepare_synthetic(make_examples, seed=6, **kw)
    assert other["train"][4]["answer"] == "24"
    # Same name and seed but a changed task (its first records differ): rebuilt.
    shifted = prepare_synthetic(functools.partial(make_examples, offset=100), seed=5, **kw)
    assert shifted["train"][4]["prompt"] == "train 5 q104"
    assert shifted["train"].data_dir != out["train"].data_dir


def test_synthetic_knobs_that_leave_the_first_records_equal_still_rebuild(tmp_path):
    def make_examples(split, n, seed, late=0):  # `late` changes records after the first only
        for i in range(n):
            yield {"prompt": f"{split} q{i}", "answer": str(i + (late if i else 0))}

    kw = dict(name="toy", splits={"train": 4}, seed=0, data_dir=str(tmp_path))
    base = prepare_synthetic(functools.partial(make_examples, late=0), **kw)["train"]
    changed = prepare_synthetic(functools.partial(make_examples, late=7), **kw)["train"]
    assert base[0] == changed[0]
    assert (base[3]["answer"], changed[3]["answer"]) == ("3", "10")
    assert changed.data_dir != base.data_dir


def test_synthetic_concurrent_build_reuses_the_winner(tmp_path):
    # While this build runs, a second one of the same dataset finishes first (as another
    # process on the same file system would); the first build's rename then fails.
    kw = dict(name="race", splits={"train": 5}, seed=0, data_dir=str(tmp_path))
    nested = {}

    def make_examples(split, n, seed):
        for i in range(n):
            if i == 3 and not nested:
                nested["started"] = True
                nested["out"] = prepare_synthetic(make_examples, **kw)
            yield {"prompt": f"q{i}", "answer": str(i)}

    out = prepare_synthetic(make_examples, **kw)
    assert nested["out"]["train"].data_dir == out["train"].data_dir
    assert [out["train"][i]["prompt"] for i in range(5)] == [f"q{i}" for i in range(5)]
    assert not [d for _, dirs, _ in os.walk(tmp_path) for d in dirs if "incomplete" in d]


def test_synthetic_failure_leaves_nothing_and_retry_works(tmp_path):
    def broken(split, n, seed):
        for i in range(n):
            if i == 7:
                raise RuntimeError("generator crashed")
            yield {"prompt": f"q{i}", "answer": "a"}

    def fixed(split, n, seed):
        for i in range(n):
            yield {"prompt": f"q{i}", "answer": "a"}

    kw = dict(name="flaky", splits={"train": 10}, seed=0, data_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="generator crashed"):
        prepare_synthetic(broken, **kw)
    leftovers = [f for _, _, files in os.walk(tmp_path) for f in files if "array_record" in f]
    assert leftovers == []
    out = prepare_synthetic(fixed, **kw)
    assert len(out["train"]) == 10 and out["train"][9]["prompt"] == "q9"


def test_synthetic_bad_records(tmp_path):
    def short(split, n, seed):
        yield {"prompt": "p", "answer": "a"}

    with pytest.raises(ValueError, match="generated 1, asked 2"):
        prepare_synthetic(short, name="s", splits={"train": 2}, seed=0, data_dir=str(tmp_path))

    def no_answer(split, n, seed):
        yield from [{"prompt": "p"}] * n

    with pytest.raises(ValueError, match="'answer'"):
        prepare_synthetic(no_answer, name="s", splits={"train": 1}, seed=0, data_dir=str(tmp_path))


@pytest.mark.parametrize(
    "bad, expected",
    [
        ('{"prompt": "q3", "answer": ', "not valid JSON"),
        ('{"prompt": "q3"}', "missing key 'answer'"),
        ('{"prompt": "q3", "answer": [3]}', "'answer' must be a string or an int"),
        ('["prompt", "answer"]', "expected a JSON object"),
    ],
)
def test_malformed_line(tmp_path, bad, expected):
    path = tmp_path / "bad.jsonl"
    good = ['{"prompt": "q1", "answer": 1}', '{"prompt": "q2", "answer": "2"}']
    path.write_text("\n".join([*good, bad, '{"prompt": "q4", "answer": 4}']) + "\n")
    with pytest.raises(ValueError) as e:
        prepare_math_file(str(path), str(tmp_path / "data"))
    assert str(path) in str(e.value) and "line 3" in str(e.value) and expected in str(e.value)
    # Nothing half-built is reused once the file is fixed.
    path.write_text("\n".join(good) + "\n")
    assert len(prepare_math_file(str(path), str(tmp_path / "data"))) == 2


def test_unknown_format(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,answer\n")
    with pytest.raises(ValueError, match=r"data\.csv.*\.jsonl.*\.parquet"):
        prepare_math_file(str(path), str(tmp_path / "data"))
    first = tmp_path / "weird.jsonl"
    first.write_text('{"question": "q", "label": 1}\n')
    with pytest.raises(ValueError, match=r"weird\.jsonl, line 1: unknown row format"):
        prepare_math_file(str(first), str(tmp_path / "data"))


def _array_record_files(data_dir):
    return {
        os.path.join(root, f): os.stat(os.path.join(root, f)).st_mtime_ns
        for root, _, files in os.walk(data_dir)
        for f in files
        if "array_record" in f
    }


def test_reuse_and_rebuild_on_change(tmp_path):
    path = tmp_path / "probs.jsonl"
    data_dir = str(tmp_path / "data")
    path.write_text('{"prompt": "a", "answer": 1}\n{"prompt": "b", "answer": 2}\n')
    first = prepare_math_file(str(path), data_dir)
    files = _array_record_files(data_dir)
    assert len(first) == 2 and len(files) == 1

    second = prepare_math_file(str(path), data_dir)  # unchanged: reused, not rewritten
    assert second.data_dir == first.data_dir
    assert _array_record_files(data_dir) == files

    with open(path, "a") as f:
        f.write('{"prompt": "c", "answer": 3}\n')
    third = prepare_math_file(str(path), data_dir)
    assert third.data_dir != first.data_dir
    assert len(third) == 3 and third[2]["prompt"] == "c" and third[2]["id"] == "probs:3"
    assert len(_array_record_files(data_dir)) == 2


def test_synthetic_task_is_a_prefix_stream_and_checks_its_answers():
    from metastone_jax.data.synthetic import make_examples

    knobs = dict(min_ops=3, max_ops=4, max_operand=9, reflect=0.25)
    short = list(make_examples("train", 20, 0, **knobs))
    assert short == list(make_examples("train", 200, 0, **knobs))[:20]  # the demo relies on it
    for rec in short:  # the written steps end at the answer, corrections included
        steps = rec["solution"].split("<think>")[1].split("</think>")[0].split(".\n\n")[:-1]
        assert steps[-1].rsplit("=", 1)[1] == rec["answer"]
        assert rec["solution"].endswith(f"\\boxed{{{rec['answer']}}}.")
