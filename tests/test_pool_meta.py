"""A pool's meta is written with its first entry: a run that fails validation (or is killed)
before sampling leaves nothing behind, and a meta beside no entries does not bind a re-run."""

import json

import pytest
from test_evaluate import bench, evaluate_cli, loaded, pool  # noqa: F401  (fixtures, helpers)
from test_sample_cli import ckpt  # noqa: F401  (fixture: tiny Qwen2 checkpoint + BPE tokenizer)
from test_tokenizer import bpe_dir  # noqa: F401

from metastone_jax.evaluate.harness import read_pool
from metastone_jax.sample import engine

# About 200 tokens in the fixture's BPE vocabulary (5 per "word "): with max_new_tokens=400 it
# is past the model's max_len=512; with 12 it fits.
LONG = "word " * 40


def test_overlong_prompt_leaves_nothing_and_the_corrected_rerun_samples(capsys, ckpt, tmp_path):  # noqa: F811
    """The issue's run: evaluate with one over-long question fails naming it and writes nothing;
    the re-run with a smaller budget, into the same --out, samples every question."""
    bench_path = tmp_path / "bench.jsonl"
    questions = ["What is 12 + 30?", LONG, "2 * 3?"]
    bench_path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": q, "answer": str(i)})
                                  + "\n" for i, q in enumerate(questions)))  # fmt: skip
    out = tmp_path / "out"
    too_long = (r"question 'q1' \(index 1\): the prompt has \d+ tokens; with "
                r"max_new_tokens=400 that exceeds the model's max_len=512")  # fmt: skip
    with pytest.raises(SystemExit, match=too_long):
        evaluate_cli(capsys, ckpt, bench_path, out, "--modes=low", "--samples=3",
                     "--max_new_tokens=400")  # fmt: skip
    assert not out.exists()
    evaluate_cli(capsys, ckpt, bench_path, out, "--modes=low", "--samples=3")  # 12 new tokens
    meta = json.loads((out / "candidates.meta.json").read_text())
    assert meta["sampling"]["max_new_tokens"] == 12 and meta["samples"] == 3
    assert [e["id"] for e in read_pool(str(out / "candidates.jsonl"))] == ["q0", "q1", "q2"]
    assert (out / "metrics.json").exists()


def test_a_meta_beside_no_entries_binds_nothing(loaded, bench, tmp_path, monkeypatch):  # noqa: F811
    records = loaded[-1](bench)  # 5 questions
    out, meta = tmp_path / "candidates.jsonl", tmp_path / "candidates.meta.json"
    real_generate = engine.generate

    def killed(*args, **kwargs):
        raise RuntimeError("killed")

    # Killed before its first question is done: no entry, so no meta either.
    monkeypatch.setattr(engine, "generate", killed)
    with pytest.raises(RuntimeError, match="killed"):
        pool(loaded, records, out)
    assert list(tmp_path.iterdir()) == []

    # An earlier run's meta beside an empty pool (killed between the two writes, or left by a
    # version that wrote the meta first) is replaced: a run with other settings proceeds.
    meta.write_text(json.dumps({"samples": 99, "seed": 1, "sampling": {"max_new_tokens": 200}}))
    out.write_text("")

    def killed_after_two_questions(*args, on_question, **kwargs):
        done = []

        def report(q, cands):
            if len(done) == 2:
                raise RuntimeError("killed")
            done.append(q)
            on_question(q, cands)

        return real_generate(*args, on_question=report, **kwargs)

    monkeypatch.setattr(engine, "generate", killed_after_two_questions)
    with pytest.raises(RuntimeError, match="killed"):
        pool(loaded, records, out)
    stored = json.loads(meta.read_text())
    assert stored["samples"] == 3 and stored["seed"] == 7
    assert stored["sampling"]["max_new_tokens"] == 12 and "policy" in stored
    assert [e["id"] for e in read_pool(str(out))] == ["t0", "t1"]

    # Beside entries the meta binds again: other settings are refused, the same ones resume.
    monkeypatch.setattr(engine, "generate", real_generate)
    with pytest.raises(ValueError, match="was sampled with samples=3, now 4"):
        pool(loaded, records, out, samples=4)
    assert [e["id"] for e in pool(loaded, records, out)] == ["t0", "t1", "t2", "t3", "t4"]
