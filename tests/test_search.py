"""Test-time scaling strategies on a tiny model: beam search, votes, pruning, selection forms."""

import numpy as np
import pytest
from flax import nnx
from test_sampler import CFG, PROMPTS, SCORE_TERMS, STEP
from tolerances import geomean_score_tol

from metastone_jax.model import create_model
from metastone_jax.sample import sampler
from metastone_jax.sample.processors import SamplingParams
from metastone_jax.sample.search import SearchConfig, run
from metastone_jax.sprm.steps import StepTokens

PARAMS = SamplingParams(temperature=1.0, max_new_tokens=24, stop_ids=(1,))


class LastTokenTokenizer:
    """Decodes a candidate to "answer is <last token>", so votes are over last tokens."""

    def decode(self, ids):
        return f"answer is {ids[-1]}" if ids else ""


@pytest.fixture(scope="module")
def model():
    return create_model(CFG, seed=1)


@pytest.fixture(scope="module")
def constant_model():
    """SPRM head with zero output layer: every step scores sigmoid(0) = 0.5."""
    m = create_model(CFG, seed=1)
    state = nnx.state(m)
    state["sprm"]["fc2"]["kernel"].set_value(np.zeros((2 * CFG.d_model, 1), np.float32))
    state["sprm"]["fc2"]["bias"].set_value(np.zeros((1,), np.float32))
    nnx.update(m, state)
    return m


def test_beam_width_one_equals_best_of_one(model):
    beam = run(model, PROMPTS, search=SearchConfig(strategy="beam", beam_width=1, expansions=1),
               params=PARAMS, step=STEP, seeds=[3, 4, 5])  # fmt: skip
    best = run(model, PROMPTS, search=SearchConfig(k=1), params=PARAMS, step=STEP,
               seeds=[3, 4, 5])  # fmt: skip
    np.testing.assert_array_equal(beam.candidates.tokens, best.candidates.tokens)
    # Beam rounds decode from their own caches: sums in other orders, then the geometric mean.
    tol = geomean_score_tol(SCORE_TERMS, best.candidates.step_scores)
    np.testing.assert_allclose(beam.scores, best.scores, rtol=0, atol=tol)
    assert beam.stats["beam_rounds"] > 2  # it really advanced step by step


def test_beam_with_constant_scores_keeps_the_first_beams(constant_model):
    # Most tokens are step tokens and nothing stops early, so at every ranking each candidate
    # has scored steps and the same running score 0.5 (none sits at "no step yet" = 0).
    step = StepTokens(step_ids=(2, 3, 4, 5, 8, 9, 10, 11), think_open=None, think_close=None)
    params = SamplingParams(temperature=1.0, max_new_tokens=24)
    # "min" is exactly 0.5 for any number of steps (a geometric mean may round differently).
    config = SearchConfig(strategy="beam", beam_width=2, expansions=3, aggregation="min")
    beam = run(constant_model, PROMPTS, search=config, params=params, step=step, seeds=[0, 1, 2])
    kept_per_prompt = beam.stats["beam_kept"]  # [prompt][round] -> the beams kept
    assert all(len(rounds) > 3 for rounds in kept_per_prompt)
    # All scores tie at 0.5, so every round keeps the two lowest rows (ties go to the lower
    # index): 0 and 1, or 0 and 3 once beam 0 has finished and its duplicates (rows 1, 2) are
    # out of the ranking...
    for rounds in kept_per_prompt:
        for kept in rounds:
            assert kept in ([0, 1], [0, 3])
    assert sum(kept == [0, 1] for rounds in kept_per_prompt for kept in rounds) > 10
    # ...and row 0 is always child 0 of row 0, which keeps its key: it is best-of-k's first
    # candidate with the same seeds.
    plain = sampler.generate(constant_model, PROMPTS, k=6, params=params, step=step,
                             seeds=[0, 1, 2])  # fmt: skip
    np.testing.assert_array_equal(beam.candidates.tokens[:, 0], plain.tokens[:, 0])
    ok = beam.candidates.finish != sampler.PRUNED
    assert np.allclose(beam.scores[ok & (beam.candidates.step_mask.sum(-1) > 0)], 0.5)


def test_best_of_k_selects_the_highest_geomean(model):
    result = run(model, PROMPTS, search=SearchConfig(k=6), params=PARAMS, step=STEP)
    c = result.candidates
    for i in range(len(PROMPTS)):
        manual = []
        for j in range(6):
            s = c.step_scores[i, j][c.step_mask[i, j]]
            manual.append(float(np.exp(np.log(np.maximum(s, 1e-10)).mean())) if len(s) else 0.0)
        np.testing.assert_allclose(result.scores[i], manual, rtol=1e-5)
        assert result.selected[i] == int(np.argmax(manual))


def test_votes_count_final_answers(model):
    tok = LastTokenTokenizer()
    vote = run(model, PROMPTS, search=SearchConfig(strategy="vote", k=8), params=PARAMS,
               step=STEP, tokenizer=tok)  # fmt: skip
    weighted = run(model, PROMPTS, search=SearchConfig(strategy="weighted_vote", k=8),
                   params=PARAMS, step=STEP, tokenizer=tok)  # fmt: skip
    for i in range(len(PROMPTS)):
        answers = vote.answers[i]
        counts = {a: answers.count(a) for a in answers if a is not None}
        best = max(counts.values())
        first = min(j for j, a in enumerate(answers) if counts.get(a) == best)
        assert vote.selected[i] == first
        totals = {}
        for a, s in zip(weighted.answers[i], weighted.scores[i], strict=True):
            if a is not None:
                totals[a] = totals.get(a, 0.0) + s
        assert weighted.answers[i][weighted.selected[i]] == max(totals, key=totals.get)


def test_early_pruning_drops_candidates_and_reports_savings(model):
    params = SamplingParams(temperature=1.0, max_new_tokens=48)
    config = SearchConfig(k=6, prune_keep=2, prune_min_steps=1)
    result = run(model, PROMPTS, search=config, params=params, step=STEP, seeds=[0, 1, 2])
    pruned = result.candidates.finish == sampler.PRUNED
    assert result.stats["pruned"] == pruned.sum() > 0
    assert result.stats["tokens_saved_estimate"] > 0
    for i in range(len(PROMPTS)):
        assert not pruned[i, result.selected[i]]


def test_thinking_selection_generates_the_answer_after_the_best_thinking(model):
    params = SamplingParams(temperature=1.0, max_new_tokens=40, stop_ids=(1,))
    config = SearchConfig(k=4, selection="thinking")
    result = run(model, PROMPTS, search=config, params=params, step=STEP, seeds=[0, 1, 2])
    c = result.candidates
    continued = 0
    for i in range(len(PROMPTS)):
        sel = result.selected[i]
        assert sel == int(np.argmax(result.scores[i]))
        for j in range(4):
            gen = c.tokens[i, j, : c.length[i, j]].tolist()
            if j != sel and 7 in gen:
                assert gen[-1] == 7  # the other thinkings stop at </think>
        gen = c.tokens[i, sel, : c.length[i, sel]].tolist()
        if 7 in gen and gen.index(7) < len(gen) - 1:
            continued += 1
    assert continued > 0  # some chosen thinking went on into its answer


def test_modes_and_bad_configs():
    assert [SearchConfig.for_mode(m).k for m in ("low", "medium", "high")] == [2, 8, 32]
    for kwargs, match in [
        (dict(strategy="mcts"), "strategy: expected one of"),
        (dict(aggregation="median"), "aggregation: expected one of"),
        (dict(k=0), "k: expected >= 1"),
        (dict(strategy="vote", selection="thinking"), "needs strategy='best_of_k'"),
    ]:
        with pytest.raises(ValueError, match=match):
            SearchConfig(**kwargs)
    with pytest.raises(ValueError, match="mode: expected one of"):
        SearchConfig.for_mode("ultra")


@pytest.mark.parametrize(
    "config",
    [
        SearchConfig(strategy="beam", beam_width=2, expansions=3),
        SearchConfig(k=6, prune_keep=2, prune_min_steps=1),
        SearchConfig(k=4, selection="thinking"),
    ],
    ids=["beam", "pruning", "thinking"],
)
def test_searches_with_a_growing_cache_equal_a_whole_one(model, config, monkeypatch):
    # Searches re-enter the decode loop (paused rows, compacted and gathered caches); a cache
    # of 4 slots per row that grows must give what the whole budget gives.
    params = SamplingParams(temperature=1.0, max_new_tokens=40, stop_ids=(1,))
    out = {}
    for slots in (0, 4):
        monkeypatch.setattr(sampler, "GROW_SLOTS", slots)
        out[slots] = run(model, PROMPTS, search=config, params=params, step=STEP, seeds=[0, 1, 2])
    a, b = out[0], out[4]
    assert a.candidates.length.max() > 8  # the cache grew at least twice
    np.testing.assert_array_equal(a.candidates.tokens, b.candidates.tokens)
    np.testing.assert_array_equal(a.candidates.finish, b.candidates.finish)
    # Attention over 4..40 slots or all of them: sums in other orders, then geometric means.
    tol = geomean_score_tol(SCORE_TERMS, a.candidates.step_scores)
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=tol)
    np.testing.assert_array_equal(a.selected, b.selected)
