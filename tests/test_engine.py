"""The paged, continuously batched engine against the static sampler, and its scheduling:
candidates equal whatever the slots, page size, queue order or preemptions; pages return."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import logit_bound, logprob_tol, score_tol, sprm_head_terms, transformer_terms

from metastone_jax.attention import segment_kv
from metastone_jax.config import ModelConfig
from metastone_jax.model import create_model
from metastone_jax.sample import engine, sampler
from metastone_jax.sample.engine import EngineConfig
from metastone_jax.sample.processors import SamplingParams
from metastone_jax.sprm.steps import StepTokens

# As tests/test_sampler.py: 0 pad, 1 eos, 5 step token, 6 <think>, 7 </think>.
CFG = ModelConfig(
    vocab_size=12, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
    max_len=160, compute_dtype="float32", pad_token_id=0, eos_token_id=1,
)  # fmt: skip
STEP = StepTokens(step_ids=(5,), think_open=6, think_close=7)
PROMPTS = [[2, 3, 4, 6], [3, 8, 9, 10, 2, 5, 6, 4, 4, 2, 3, 8, 9, 6], [4, 6], [9, 2, 6]]
SEEDS = [11, 12, 13, 14]
K = 8
# Both sides compute the same sums in other orders (attention over pages vs one cache, a
# prefill vs token by token): bounds as in test_sampler.py, attention over at most max_len.
SCORE_TERMS = transformer_terms(CFG, CFG.max_len, n_layers=CFG.n_layers - 1, lm_head=False)
SCORE_TERMS += sprm_head_terms(CFG.d_model)


@pytest.fixture(scope="module")
def model():
    return create_model(CFG, seed=0)


def _assert_same(a, b, model, params):
    for name in ("tokens", "length", "finish", "step_index", "step_mask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    n_logit = transformer_terms(CFG, CFG.max_len)
    tol = params.max_new_tokens * logprob_tol(n_logit, CFG.vocab_size, logit_bound(model))
    np.testing.assert_allclose(a.logprob, b.logprob, rtol=0, atol=tol)
    tol = score_tol(SCORE_TERMS, a.step_scores)
    np.testing.assert_allclose(a.step_scores, b.step_scores, rtol=0, atol=tol)


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=40, stop_ids=(1,), think_budget=12)
# Stopping at </think> (7) keeps candidates long enough to hold steps, their lengths spread.
SAMPLED = SamplingParams(
    temperature=1.0, top_p=0.95, top_k=10, repetition_penalty=1.05, max_new_tokens=40,
    stop_ids=(7,),
)  # fmt: skip


@pytest.fixture(scope="module")
def static_runs(model):
    return {
        p: sampler.generate(model, PROMPTS, k=K, params=p, step=STEP, seeds=SEEDS)
        for p in (GREEDY, SAMPLED)
    }


def test_greedy_equals_the_static_sampler(model, static_runs):
    """Token for token, finish reasons and log-probs included (fp32); this random model's
    greedy text holds no step token, the sampled test below compares step scores."""
    ref = static_runs[GREEDY]
    got, stats = engine.generate(
        model, PROMPTS, k=K, params=GREEDY, step=STEP, seeds=SEEDS,
        engine=EngineConfig(slots=6, page_size=8), return_stats=True,
    )  # fmt: skip
    assert {sampler.LENGTH, sampler.STOPPED} <= set(ref.finish.ravel().tolist())
    assert (ref.tokens == STEP.think_close).any()  # the thinking budget forced </think>
    _assert_same(got, ref, model, GREEDY)
    assert stats.tokens == int(ref.length.sum())


@pytest.mark.parametrize(
    "config, order",
    [
        (EngineConfig(slots=1, page_size=16), None),
        (EngineConfig(slots=7, page_size=4), None),
        (EngineConfig(slots=16, page_size=16), None),  # every candidate at once
        (EngineConfig(slots=7, page_size=4), [3, 1, 0, 2]),
        # A pool of 16 pages of 4 tokens: 3 slots at 40 new tokens cannot all fit.
        (EngineConfig(slots=3, page_size=4, pages=16), None),
    ],
    ids=["S1", "S7-page4", "S-all", "S7-reordered", "preempting"],
)
def test_sampled_candidates_do_not_depend_on_the_schedule(model, static_runs, config, order):
    ref = static_runs[SAMPLED]  # the static sampler draws with the same keys
    got, stats = engine.generate(model, PROMPTS, k=K, params=SAMPLED, step=STEP, seeds=SEEDS,
                                 engine=config, order=order, return_stats=True)  # fmt: skip
    assert len(set(ref.length.ravel())) > 3  # lengths differ: slots free up at other times
    assert ref.step_mask.sum() > 15  # step scores are compared
    _assert_same(got, ref, model, SAMPLED)
    if config.pages:
        assert stats.preemptions > 0
        assert stats.peak_pages <= config.pages


def test_candidates_are_unchanged_when_the_tail_shrinks_at_every_chance(
    model, static_runs, monkeypatch
):
    """The tail's rows move into fewer slots (`Engine._maybe_shrink`) whenever they fit: here
    at every chance, as the smaller slot counts are compiled ahead (`EngineConfig.precompile`;
    the measured rule, `shrink_cost`, would rarely pay for a compilation on this tiny model);
    the candidates stay the static sampler's."""
    seen = []
    original = engine.Engine._maybe_shrink

    def shrink(self):
        live = sum(r is not None for r in self.slot_req)
        tail = live and not (self.queue or self.resumes)
        shrunk = original(self)
        if tail:
            seen.append((live, len(self.slot_req)))
        return shrunk

    monkeypatch.setattr(engine.Engine, "_maybe_shrink", shrink)
    ref = static_runs[SAMPLED]
    got, stats = engine.generate(model, PROMPTS, k=K, params=SAMPLED, step=STEP, seeds=SEEDS,
                                 engine=EngineConfig(slots=12, page_size=16, precompile=True),
                                 return_stats=True)  # fmt: skip
    assert stats.resizes >= 2  # 12 slots, then 10, then 8 as the candidates end
    assert seen
    for live, after in seen:  # at each harvest of the tail: the smallest size holding its rows
        assert after == min(n for n in engine.slot_sizes(12) if n >= live)
    _assert_same(got, ref, model, SAMPLED)


def test_candidates_are_unchanged_across_chunks_and_segments(model, static_runs, monkeypatch):
    """Every candidate in a slot: the XLA path's working set, here in chunks of 8 tokens and
    segments of at most 20 steps (a segment's tokens in three chunks read by three loops, the
    rows' earlier tokens read from pages by the next), prompts read per block of 8 rows."""
    monkeypatch.setattr(segment_kv, "TAIL_CHUNK", 8)
    # Programs compiled with other chunks stay out of (and these out of) the shared cache.
    monkeypatch.setattr(engine, "_compiled", functools.lru_cache(engine._compiled.__wrapped__))
    ref = static_runs[SAMPLED]
    conf = EngineConfig(slots=len(PROMPTS) * K, page_size=8, segment_steps=20)
    got, stats = engine.generate(model, PROMPTS, k=K, params=SAMPLED, step=STEP, seeds=SEEDS,
                                 engine=conf, return_stats=True)  # fmt: skip
    assert stats.segments >= 2
    _assert_same(got, ref, model, SAMPLED)


def test_pages_are_shared_owned_once_and_all_returned(model, monkeypatch):
    """After every segment: each page's holder count is the number of tables (up to their
    tokens) and resident prompts that list it, the free pages are exactly those nobody holds,
    and a question's full prompt pages are in its fresh candidates' tables; at the end all are
    free."""
    seen = {"checks": 0}
    original = engine.Engine._harvest

    def checked(self, results, bar):
        table, kv_len = jax.device_get((self.state.cache.page_table, self.state.cache.kv_len))
        page = self.layout.page_size
        holders = np.zeros(self.layout.pages, int)
        for s, req in enumerate(self.slot_req):
            if req is None:
                continue
            n_cols = -(-int(kv_len[s]) // page)
            np.add.at(holders, table[s, :n_cols], 1)
            full = len(PROMPTS[req.question]) // page
            q_pages = self.questions[req.question].pages
            if q_pages and table[s, 0] == q_pages[0]:  # fresh (a resumed one has its own)
                assert table[s, :full].tolist() == q_pages[:full]
        for q in self.questions.values():
            np.add.at(holders, np.asarray(q.pages, int), 1)
        np.testing.assert_array_equal(holders, self.refs)
        assert len(set(self.free)) == len(self.free)
        assert sorted(self.free) == np.flatnonzero(holders == 0).tolist()
        seen["checks"] += 1
        return original(self, results, bar)

    monkeypatch.setattr(engine.Engine, "_harvest", checked)
    eng = engine.Engine(
        model, PROMPTS, k=K, params=SAMPLED, step=STEP, seeds=SEEDS,
        engine=EngineConfig(slots=5, page_size=4), limits=None, pad_id=None, score_steps=True,
        keep_features=False, order=None, on_question=None, progress=False,
    )  # fmt: skip
    eng.run()
    assert seen["checks"] > 5
    assert sorted(eng.free) == list(range(eng.layout.pages))


def test_a_tight_pool_with_partial_prompt_pages_admits_what_fits(model):
    """Candidates admitted together each take their partial prompt page after the admission
    loop: the loop counts them (a pool of 20 pages of 4 tokens, prompts of 6 tokens)."""
    prompts = [[2, 3, 4, 8, 9, 6], [3, 8, 9, 10, 2, 6], [4, 4, 2, 3, 9, 6], [9, 2, 3, 4, 8, 6]]
    limits = np.random.default_rng(0).integers(1, 41, (4, 3))
    params = dataclasses.replace(SAMPLED, stop_ids=())
    ref = sampler.generate(model, prompts, k=3, params=params, step=STEP, seeds=SEEDS,
                           limits=limits)  # fmt: skip
    got, stats = engine.generate(
        model, prompts, k=3, params=params, step=STEP, seeds=SEEDS, limits=limits,
        engine=EngineConfig(slots=5, page_size=4, pages=20), return_stats=True,
    )  # fmt: skip
    assert stats.preemptions > 0 and stats.peak_pages <= 20
    _assert_same(got, ref, model, params)


def test_questions_are_reported_in_order_and_limits_hold(model):
    limits = np.array([[40, 3, 10, 1] * (K // 4)] * len(PROMPTS))
    reported = []
    got = engine.generate(
        model, PROMPTS, k=K, params=SAMPLED, step=STEP, seeds=SEEDS, limits=limits,
        engine=EngineConfig(slots=3, page_size=8), order=[2, 0, 3, 1],
        on_question=lambda q, c: reported.append((q, c.tokens[0].copy())),
    )  # fmt: skip
    assert [q for q, _ in reported] == [0, 1, 2, 3]
    for q, tokens in reported:
        np.testing.assert_array_equal(tokens, got.tokens[q])
    assert (got.length <= limits).all() and (got.length[:, 3] == 1).all()
    assert (got.length[got.finish == sampler.LENGTH] == limits[got.finish == sampler.LENGTH]).all()
    assert (got.finish[got.length < limits] == sampler.STOPPED).all()
    assert (got.finish == sampler.LENGTH).sum() >= len(PROMPTS) * K // 4  # the caps of 1


class _Bar:
    """tqdm's stand-in: records the postfix the engine's progress bar shows."""

    shown: list[str] = []

    def __init__(self, *args, **kwargs):
        pass

    def update(self, n=1):
        pass

    def set_postfix_str(self, text, refresh=True):
        _Bar.shown.append(text)

    def close(self):
        pass


def test_the_progress_bar_counts_the_tokens_still_decoding(model, monkeypatch):
    """The bar's slot occupancy is the tokens decoded so far over the slot-steps so far,
    those of candidates still running included (it counted only finished candidates' tokens:
    25% after a first segment in which every slot decoded). 4 slots, 8 candidates capped at
    2, 6, ..., 6 tokens, no stop id: segments of 2 steps (candidate 0 ends: 8 tokens, 2 of
    them finished), 4 (1-3 end: 24 tokens) and 6, the queue empty (4 ends after 2, 5-7 after
    6): 100%, 100%, then 44 tokens over 48 slot-steps."""
    _Bar.shown = []
    monkeypatch.setattr(engine, "tqdm", _Bar)
    limits = np.array([[2] + [6] * 7])
    params = dataclasses.replace(SAMPLED, stop_ids=(), max_new_tokens=8)
    got, stats = engine.generate(
        model, PROMPTS[:1], k=8, params=params, step=STEP, seeds=SEEDS[:1], limits=limits,
        engine=EngineConfig(slots=4, page_size=8), progress=True, return_stats=True,
    )  # fmt: skip
    np.testing.assert_array_equal(got.length, limits)
    assert (stats.segments, stats.steps, stats.slot_steps) == (3, 12, 48)
    occupancy = [int(s.split("occupancy ")[1].split("%")[0]) for s in _Bar.shown]
    assert occupancy == [100, 100, round(100 * 44 / 48)]
    assert stats.tokens == 44


@pytest.mark.parametrize(
    "config, match",
    [
        (EngineConfig(page_size=12), "page_size=12 does not divide the model's max_len=160"),
        (EngineConfig(slots=8, pages=4, page_size=16), "pages=4 is fewer than slots=8"),
        (EngineConfig(slots=2, page_size=4, pages=10), "cannot hold one sequence"),
        (EngineConfig(attention_impl="flash", page_size=16), "attention_impl"),
    ],
)
def test_bad_settings_fail_before_compiling(model, config, match, monkeypatch):
    monkeypatch.setattr(engine, "_compiled", lambda *a, **k: pytest.fail("compiled"))
    with pytest.raises(ValueError, match=match):
        engine.generate(model, PROMPTS, k=K, params=SAMPLED, step=STEP, engine=config)


def test_a_prompt_over_the_budget_names_it(model):
    long = [[2] * 130]
    with pytest.raises(ValueError, match="prompt 0 has 130 tokens; with max_new_tokens=40"):
        engine.generate(model, long, k=1, params=SAMPLED, step=STEP)


@pytest.mark.parametrize("slots", [7, 8, 100, 256])
def test_the_tail_shrinks_through_sizes_the_live_rows_fill_to_four_fifths(slots):
    sizes = engine.slot_sizes(slots)
    assert sizes[-1] == slots and sizes == sorted(set(sizes))
    assert sizes[0] == min(slots, engine.MIN_SLOTS)
    for small, big in zip(sizes, sizes[1:], strict=False):
        # live rows that no longer fit `small` number > small, so they fill big to > small/big
        assert 5 * small >= 4 * big


def test_the_default_page_size_divides_max_len():
    """64 tokens, or the largest power of two below that divides max_len (160 -> 32)."""
    for max_len, page in [(160, 32), (4096, 64), (100, 4)]:
        cfg = dataclasses.replace(CFG, max_len=max_len)
        layout = engine.plan_layout(cfg, EngineConfig(), [4], 8, n_candidates=2, n_questions=1)
        assert layout.page_size == page and max_len % page == 0


def test_decode_weights_are_the_models_laid_out_major_and_made_once_per_parameters():
    """The CPU decode copy (`Transformer.decode_weights`): each Linear out-major, in bf16 the
    same product as the stacked kernel's up to one bf16 rounding of the f32-accumulated sums
    (their orders differ); reused while the model's arrays are the same, remade after an
    update."""
    from flax import nnx

    from metastone_jax.layers import Linear

    cfg = dataclasses.replace(CFG, param_dtype="bfloat16", compute_dtype="bfloat16")
    model = create_model(cfg, seed=0)
    weights = engine.decode_weights(model)
    assert engine.decode_weights(model) is weights
    block = nnx.merge(nnx.split(model.blocks)[0],
                      jax.tree.map(lambda a: a[0], nnx.state(model.blocks)))  # fmt: skip
    out_major = nnx.merge(weights.graphdef, weights.layers[0])
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        ref, got = getattr(block.attn, name), getattr(out_major.attn, name)
        assert isinstance(got, Linear) and got.out_major
        shape = (5, *ref.kernel.shape[: ref.n_in])
        inp = jax.random.normal(jax.random.key(1), shape, jnp.bfloat16)
        want, have = np.asarray(ref(inp), np.float32), np.asarray(got(inp), np.float32)
        eps = float(jnp.finfo(jnp.bfloat16).eps)
        np.testing.assert_allclose(have, want, rtol=0, atol=eps * np.abs(want).max())
    state = nnx.state(model)
    nnx.update(model, jax.tree.map(lambda a: a + 0, state))
    assert engine.decode_weights(model) is not weights
