"""The evaluation harness: metrics on a hand-made pool, the resumable pool file, the CLI."""

import json
import os

import jax
import numpy as np
import pytest
from test_sample_cli import ckpt  # noqa: F401  (fixture: tiny Qwen2 checkpoint + BPE tokenizer)
from test_tokenizer import bpe_dir  # noqa: F401
from tolerances import score_tol, sprm_head_terms

from metastone_jax.answers import extract_final_answer
from metastone_jax.evaluate.harness import beam_split, question_seed, read_pool, sample_pool
from metastone_jax.evaluate.metrics import (
    METHODS,
    Z95,
    candidate_score,
    method_accuracy,
    pool_metrics,
    question_accuracy,
    summarize,
    tokens_per_question,
)
from metastone_jax.main import main
from metastone_jax.sample import engine
from metastone_jax.sample.engine import EngineConfig

# ----------------------------------------------------------------------------------------------
# Metrics against hand computation
# ----------------------------------------------------------------------------------------------


def cand(answer, correct, steps, tokens):
    return {"answer": answer, "correct": correct, "step_scores": steps, "tokens": tokens}


# Q1 (gold "2"; c0 has no answer), M=4. Scores per aggregation (geomean, mean, min, last, product):
#   c0 [.6,.6]  .600 .600 .6 .6 .36   c1 [.9,.5] .671 .700 .5 .5 .45
#   c2 [.95,.4] .616 .675 .4 .4 .38   c3 [.3,.9] .520 .600 .3 .9 .27
# Q2 (gold "7"), M=5: d0 has no counted step (score 0 whatever the aggregation), so d1 with one
# tiny step beats it; d4 is left over at k=2 and k=4 (floor(5/k) groups).
Q1 = {"id": "q1", "candidates": [
    cand(None, False, [0.6, 0.6], 10), cand("2", True, [0.9, 0.5], 20),
    cand("2", True, [0.95, 0.4], 30), cand("3", False, [0.3, 0.9], 40),
]}  # fmt: skip
Q2 = {"id": "q2", "candidates": [
    cand("7", True, [], 1), cand("8", False, [0.001], 2), cand("8", False, [0.2], 3),
    cand("7", True, [0.7], 4), cand("7", True, [0.9], 5),
]}  # fmt: skip
# Per-question accuracy by hand: {k: {method: (Q1, Q2)}}.
EXPECTED = {
    2: {
        "random": (0.5, 0.5),  # c0 F, c2 T | d0 T, d2 F
        "vote": (1.0, 0.5),  # c1 (c0's None never wins), c2 | ties go to the first: d0 T, d2 F
        "weighted_vote": (1.0, 0.5),  # c1 (.671 > .6), c2 | d1 (.001 > 0) F, d3 T
        "sprm_geomean": (1.0, 0.5),
        "sprm_mean": (1.0, 0.5),
        "sprm_min": (0.5, 0.5),  # c0 (.6 > .5) F, c2 T
        "sprm_last": (0.0, 0.5),  # c0 (.6 > .5) F, c3 (.9 > .4) F
        "sprm_product": (1.0, 0.5),
        "oracle": (1.0, 1.0),
    },
    4: {
        "random": (0.0, 1.0),
        "vote": (1.0, 1.0),  # "2" x2 | "7" and "8" tie, "7" came first
        "weighted_vote": (1.0, 1.0),
        "sprm_geomean": (1.0, 1.0),  # c1 | d3
        "sprm_mean": (1.0, 1.0),
        "sprm_min": (0.0, 1.0),  # c0
        "sprm_last": (0.0, 1.0),  # c3
        "sprm_product": (1.0, 1.0),
        "oracle": (1.0, 1.0),
    },
}


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("method", METHODS)
def test_metrics_match_hand_computation(k, method):
    want = EXPECTED[k][method]
    assert question_accuracy(Q1, k, method) == want[0]
    assert question_accuracy(Q2, k, method) == want[1]
    m = method_accuracy([Q1, Q2], k, method)
    assert m["mean"] == pytest.approx(np.mean(want))
    assert m["n_questions"] == 2
    assert m["n_groups"] == {2: 4, 4: 2}[k]
    # 95% interval: mean +- 1.96 * sample std / sqrt(n), clipped to [0, 1].
    half = Z95 * np.std(want, ddof=1) / np.sqrt(2)
    lo, hi = max(0.0, np.mean(want) - half), min(1.0, np.mean(want) + half)
    assert m["ci95"] == pytest.approx([lo, hi])


def test_pool_metrics_tokens_and_interval():
    out = pool_metrics([Q1, Q2], [2, 4])
    assert set(out) == {2, 4} and set(out[2]["methods"]) == set(METHODS)
    assert out[2]["methods"]["sprm_geomean"]["mean"] == 0.75
    assert out[2]["methods"]["sprm_geomean"]["ci95"] == pytest.approx([0.75 - Z95 * 0.25, 1.0])
    # k x mean tokens per candidate, averaged over questions: Q1 25, Q2 3.
    assert out[2]["tokens_per_question"] == pytest.approx(2 * 14)
    assert tokens_per_question([Q1, Q2], 4) == pytest.approx(4 * 14)
    assert summarize([1.0]) == {"mean": 1.0, "ci95": [0.0, 1.0], "n_questions": 1}
    assert summarize([0.0, 0.0, 0.0])["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="q1.*4 candidates, need at least k=5"):
        method_accuracy([Q1, Q2], 5, "random")
    with pytest.raises(ValueError, match="unknown method"):
        question_accuracy(Q1, 2, "sprm_median")


def test_candidate_score_matches_sprm_aggregate():
    from metastone_jax.sprm.aggregation import aggregate

    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, (6, 5)).astype(np.float32)
    scores[0, 2] = 0.0  # product -> 0, geomean clamps
    mask = rng.uniform(size=(6, 5)) < 0.7
    mask[1] = False  # no counted step -> 0
    for how in ("geomean", "mean", "min", "last", "product"):
        want = np.asarray(aggregate(scores, mask, how))
        got = [candidate_score(s[m].tolist(), how) for s, m in zip(scores, mask, strict=True)]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
    assert beam_split(2) == (1, 2) and beam_split(8) == (2, 4) and beam_split(32) == (8, 4)
    assert beam_split(6) == (1, 6) and beam_split(1) == (1, 1)


# ----------------------------------------------------------------------------------------------
# The pool file: resume after a kill or a smaller --limit reproduces an uninterrupted run
# ----------------------------------------------------------------------------------------------

# Many ids stand in for ".\n\n" in this vocabulary, so that random text has scored steps.
STEP_IDS = range(10, 300)
QUESTIONS = ["What is 12 + 30?", "2 * 3?", "Name a prime.", "What is 7 - 5?", "Is 9 odd?"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "toy.jsonl"
    with open(path, "w") as f:
        for i, q in enumerate(QUESTIONS):
            f.write(json.dumps({"id": f"t{i}", "prompt": q, "answer": str(i)}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def loaded(ckpt):  # noqa: F811
    from metastone_jax.checkpoint import load_params_checkpoint
    from metastone_jax.data.builders import read_records
    from metastone_jax.data.tokenizer import load_tokenizer
    from metastone_jax.sample.processors import SamplingParams
    from metastone_jax.sprm.steps import StepTokens

    tok = load_tokenizer(os.path.join(ckpt, "hf"))
    model, _ = load_params_checkpoint(ckpt)
    # The CLI test's step ids and settings, so that both share compiled sampler programs.
    step = StepTokens.from_tokenizer(tok, step_text=list(STEP_IDS))
    params = SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.05,
                            max_new_tokens=12, stop_ids=tuple(tok.eos_ids))  # fmt: skip
    return model, tok, step, params, read_records


# Fewer slots than candidates: slots are refilled as candidates end.
ENGINE = EngineConfig(slots=4, page_size=8)


def pool(loaded, records, path, samples=3):
    model, tok, step, params, _ = loaded
    return sample_pool(model, tok, records, samples=samples, sampling=params, step=step,
                       out_path=str(path), engine=ENGINE, seed=7, progress=False)  # fmt: skip


def test_pool_resume_reproduces_an_uninterrupted_run(loaded, bench, tmp_path, monkeypatch):
    records = loaded[-1](bench)
    full = pool(loaded, records, tmp_path / "a" / "candidates.jsonl")
    reference = (tmp_path / "a" / "candidates.jsonl").read_bytes()
    assert [e["id"] for e in full] == ["t0", "t1", "t2", "t3", "t4"]
    for i, e in enumerate(full):
        assert e["seed"] == question_seed(7, i) and e["answer"] == str(i)
        assert len(e["candidates"]) == 3
        for c in e["candidates"]:
            assert set(c) == {"text", "answer", "correct", "grade", "step_scores", "tokens",
                              "finish"}  # fmt: skip
            assert 1 <= c["tokens"] <= 12 and c["finish"] in ("stop", "length")
            assert all(0.0 <= s <= 1.0 for s in c["step_scores"])
    assert any(c["step_scores"] for e in full for c in e["candidates"])

    # Interrupted by a smaller --limit, then run in full.
    b = tmp_path / "b" / "candidates.jsonl"
    assert len(pool(loaded, records[:2], b)) == 2
    assert pool(loaded, records, b) == full
    assert b.read_bytes() == reference

    # Killed in the middle of writing question t3: the torn line is dropped and rewritten.
    c = tmp_path / "c" / "candidates.jsonl"
    c.parent.mkdir()
    lines = reference.splitlines(keepends=True)
    c.write_bytes(b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    os.link(tmp_path / "a" / "candidates.meta.json", tmp_path / "c" / "candidates.meta.json")
    assert [e["id"] for e in read_pool(str(c))] == ["t0", "t1", "t2"]
    assert pool(loaded, records, c) == full
    assert c.read_bytes() == reference
    ids = [json.loads(line)["id"] for line in c.read_bytes().splitlines()]
    assert len(ids) == len(set(ids)) == 5

    # A finished pool is read back, not sampled again; other settings are refused.
    monkeypatch.setattr(engine, "generate", lambda *a, **kw: pytest.fail("sampled again"))
    assert pool(loaded, records, c) == full
    with pytest.raises(ValueError, match="was sampled with samples=3, now 4"):
        pool(loaded, records, c, samples=4)


def test_pool_resumed_with_other_weights_is_refused(loaded, bench, tmp_path):
    """The pool's meta holds the weights' fingerprint: another checkpoint (here one weight
    moved) cannot resume it; a pool from before fingerprints resumes and gains one."""
    from flax import nnx

    model, tok, step, params, read_records = loaded
    records = read_records(bench)[:2]
    out = tmp_path / "candidates.jsonl"
    first = pool(loaded, records, out)
    meta_path = tmp_path / "candidates.meta.json"
    fingerprint = json.loads(meta_path.read_text())["policy"]
    graphdef, state = nnx.split(model)
    other = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))  # a copy
    other.embed[...] = other.embed[...].at[0, 0].add(1.0)  # the first value: always sampled
    with pytest.raises(ValueError, match=f"was sampled with policy='{fingerprint}', now '"):
        pool((other, tok, step, params, read_records), records, out)
    legacy = json.loads(meta_path.read_text())
    del legacy["policy"]
    meta_path.write_text(json.dumps(legacy))
    assert pool(loaded, records, out) == first
    assert json.loads(meta_path.read_text())["policy"] == fingerprint


def test_params_fingerprint_is_the_same_on_a_mesh_and_tells_weights_apart():
    from flax import nnx

    from metastone_jax.checkpoint import params_fingerprint
    from metastone_jax.config import ModelConfig
    from metastone_jax.model import create_model
    from metastone_jax.sharding import make_mesh, state_shardings

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_len=32)  # fmt: skip
    single = create_model(cfg, seed=0)
    graphdef, state = nnx.split(single)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
    assert len(sharded.embed[...].sharding.device_set) > 1
    assert params_fingerprint(sharded) == params_fingerprint(single)
    assert params_fingerprint(create_model(cfg, seed=1)) != params_fingerprint(single)
    single.sprm.fc2.bias[...] = single.sprm.fc2.bias[...] + 1.0  # the head alone moved
    assert params_fingerprint(sharded) != params_fingerprint(single)


def test_extra_head_pool_equals_sampling_with_that_head(loaded, bench, tmp_path):
    """Another head on the same backbone scores the same candidates from the kept features: the
    same pool as sampling again with that head in the loop (the released-code shape)."""
    from flax import nnx

    from metastone_jax.sprm.head import SPRMHead

    model, tok, step, params, read_records = loaded
    records = read_records(bench)
    other = SPRMHead(model.cfg.d_model, rngs=nnx.Rngs(123))
    graphdef, state = nnx.split(model)
    with_other = nnx.merge(graphdef, state)
    with_other.sprm = other
    ref = sample_pool(with_other, tok, records, samples=3, sampling=params, step=step,
                      out_path=str(tmp_path / "ref.jsonl"), engine=ENGINE, seed=7,
                      progress=False)  # fmt: skip
    main_path, extra_path = tmp_path / "main.jsonl", tmp_path / "other.jsonl"
    main = sample_pool(model, tok, records, samples=3, sampling=params, step=step,
                       out_path=str(main_path), engine=ENGINE, seed=7, progress=False,
                       extra_heads={str(extra_path): other})  # fmt: skip
    assert main == pool(loaded, records, tmp_path / "alone.jsonl")  # the main pool unchanged
    extra = read_pool(str(extra_path))
    n_scores = 0
    for e, r in zip(extra, ref, strict=True):
        for c, cr in zip(e["candidates"], r["candidates"], strict=True):
            assert {**c, "step_scores": None} == {**cr, "step_scores": None}
            # The same features; the head's D + 2D terms batched otherwise than in the loop.
            tol = score_tol(sprm_head_terms(model.cfg.d_model), cr["step_scores"])
            np.testing.assert_allclose(c["step_scores"], cr["step_scores"], rtol=0, atol=tol)
            n_scores += len(c["step_scores"])
    assert n_scores > 10
    # The heads differ, so the scores do too (the extra pool is not the main one copied).
    assert [c["step_scores"] for e in extra for c in e["candidates"]] != [
        c["step_scores"] for e in main for c in e["candidates"]
    ]
    # The extra pool lost (or cut short) resumes alone; the main pool is not rewritten.
    main_bytes = main_path.read_bytes()
    lines = extra_path.read_bytes().splitlines(keepends=True)
    extra_path.write_bytes(b"".join(lines[:2]))
    sample_pool(model, tok, records, samples=3, sampling=params, step=step,
                out_path=str(main_path), engine=ENGINE, seed=7, progress=False,
                extra_heads={str(extra_path): other})  # fmt: skip
    assert read_pool(str(extra_path)) == extra and main_path.read_bytes() == main_bytes
    # A head over another feature width is refused before anything is sampled.
    wrong = SPRMHead(model.cfg.d_model + 1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"other.jsonl: expected an SPRM head over d_model="):
        sample_pool(model, tok, records, samples=3, sampling=params, step=step,
                    out_path=str(tmp_path / "x.jsonl"), engine=ENGINE, seed=7, progress=False,
                    extra_heads={str(extra_path): wrong})  # fmt: skip


def test_pool_errors(loaded, tmp_path):
    records = [{"id": "long", "prompt": "word " * 600, "answer": "1"}]
    with pytest.raises(ValueError, match="question 'long' .*exceeds the model's max_len=512"):
        pool(loaded, records, tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="'a' occurs more than once"):
        pool(loaded, [{"id": "a", "prompt": "x", "answer": "1"}] * 2, tmp_path / "y.jsonl")
    read_records = loaded[-1]
    with pytest.raises(ValueError, match="toy.csv: unknown format '.csv'"):
        read_records(str(tmp_path / "toy.csv"))
    with pytest.raises(ValueError, match="none.jsonl: no such file"):
        read_records(str(tmp_path / "none.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "candidates": []}\nnot json\n{"id": "b", "candidates": []}\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 2: not a pool entry"):
        read_pool(str(bad))
    bad.write_text('{"id": "a", "candidates": []}\n{"id": "a", "candidates": []}\n')
    with pytest.raises(ValueError, match="line 2: question id 'a' seen twice"):
        read_pool(str(bad))


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def evaluate_cli(capsys, ckpt, bench, out, *extra):  # noqa: F811
    step = ",".join(map(str, STEP_IDS))
    main(["metastone-jax", "evaluate", f"--ckpt={ckpt}", f"--benchmark={bench}",
          f"--out={out}", "--max_new_tokens=12", f"--step_ids={step}", "--temperature=1.0",
          "--slots=4", "--page_size=8", "--no_progress",
          *extra])  # fmt: skip
    return capsys.readouterr().out


def test_cli_table_json_and_beam(capsys, ckpt, bench, tmp_path):  # noqa: F811
    text = evaluate_cli(capsys, ckpt, bench, tmp_path / "e", "--modes=low", "--ks=3",
                        "--samples=3", "--limit=3")  # fmt: skip
    assert "toy.jsonl: 3 questions, 3 samples each, strategy best_of_k" in text
    assert text.splitlines()[2].split()[:2] == ["low", "2"]
    assert text.splitlines()[3].split()[:2] == ["k=3", "3"]
    report = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert report["modes"]["low"]["selection"] == "sprm_geomean"
    assert report["modes"]["low"]["pass@1"] == report["pool"]["2"]["methods"]["sprm_geomean"]
    assert report["pool"]["3"]["methods"]["oracle"]["n_groups"] == 3  # floor(3/3) x 3 questions
    entries = read_pool(str(tmp_path / "e" / "candidates.jsonl"))
    assert len(entries) == 3 and all(len(e["candidates"]) == 3 for e in entries)
    # Same pool, another strategy: nothing is sampled again and --json prints the report.
    args = ["--modes=low", "--samples=3", "--limit=3", "--strategy=vote", "--json"]
    out = json.loads(evaluate_cli(capsys, ckpt, bench, tmp_path / "e", *args))
    assert out["modes"]["low"]["pass@1"] == report["pool"]["2"]["methods"]["vote"]
    text = evaluate_cli(capsys, ckpt, bench, tmp_path / "beam", "--modes=low",
                        "--strategy=beam", "--limit=2")  # fmt: skip
    assert "strategy beam (pass@1 by beam search)" in text
    beam = json.loads((tmp_path / "beam" / "metrics.json").read_text())
    assert beam["modes"]["low"]["selection"] == "beam 1x2"
    assert beam["modes"]["low"]["pass@1"]["n_questions"] == 2
    lines = (tmp_path / "beam" / "beam_k2.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["t0", "t1"]
    for line in lines:
        e = json.loads(line)
        sel = e["selected"]
        assert sel["answer"] == extract_final_answer(sel["text"])
        assert 1 <= sel["tokens"] <= 12 and sel["tokens"] <= e["tokens"] <= 2 * 12
        assert e["correct"] is False and e["answer"] == e["id"][1:]  # an untrained model


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--samples=8"],
            "samples=8 is fewer than the largest k=32 \\(high\\): sample at least 32",
        ),
        (["--modes=low", "--ks=4"], "samples=None is fewer than the largest k=4"),
        (["--modes=low,extreme", "--samples=2"], "mode: expected one of \\('low', 'medium'"),
        (["--samples=32", "--strategy=mcts"], "--strategy: expected one of"),
        (["--modes=", "--samples=2"], "nothing to evaluate"),
        (["--ks=2,x", "--samples=2"], "--ks: expected comma-separated integers"),
        (["--samples=32", "--limit=0"], "limit: expected >= 1"),
    ],
)
def test_cli_bad_arguments(capsys, ckpt, bench, tmp_path, args, message):  # noqa: F811
    with pytest.raises(SystemExit, match="metastone-jax evaluate: " + message):
        evaluate_cli(capsys, ckpt, bench, tmp_path, *args)


def test_cli_missing_files(capsys, ckpt, bench, tmp_path):  # noqa: F811
    with pytest.raises(SystemExit, match="--ckpt: .*nope: no such directory"):
        evaluate_cli(capsys, str(tmp_path / "nope"), bench, tmp_path, "--samples=32")
    with pytest.raises(SystemExit, match="--benchmark: .*none.jsonl: no such file"):
        evaluate_cli(capsys, ckpt, str(tmp_path / "none.jsonl"), tmp_path, "--samples=32")
    with pytest.raises(SystemExit, match="not a params checkpoint"):
        evaluate_cli(capsys, str(tmp_path), bench, tmp_path / "o", "--samples=32")
